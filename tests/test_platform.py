"""ldm_jax.platform: where the persistent compilation cache goes, how it is turned off, and
which jaxlib releases get the XLA:CPU convolution flag."""
import os
import subprocess
import sys

from ldm_jax import platform


def test_cache_dir_follows_xdg_and_the_override(tmp_path):
  home = os.path.expanduser("~")
  assert platform.compilation_cache_dir({}) == os.path.join(home, ".cache", "ldm_jax",
                                                            "jax_cache")
  assert platform.compilation_cache_dir({"XDG_CACHE_HOME": "/x"}) == "/x/ldm_jax/jax_cache"
  env = {"XDG_CACHE_HOME": "/x", platform.CACHE_ENV: str(tmp_path / "c")}
  assert platform.compilation_cache_dir(env) == str(tmp_path / "c")
  for off in ("off", "0", "OFF", "false"):
    assert platform.compilation_cache_dir({platform.CACHE_ENV: off}) is None


def test_conv_flag_only_for_measured_jaxlib():
  for measured in ("0.10.2", "0.10.0", "0.9.2", "0.10.1.dev20261201", "0.10.2rc1"):
    assert platform.conv_flag_applies(measured), measured
  for other in ("0.11.0", "0.9.1", "0.9.0.1", "0.1.0", "", "nightly"):
    assert not platform.conv_flag_applies(other), other


def test_configure_turns_the_cache_on_in_a_fresh_process(tmp_path):
  """A process without JAX's own variable gets the cache under XDG_CACHE_HOME, and writes
  a compiled program there; LDM_JAX_COMPILATION_CACHE=off leaves JAX's setting alone."""
  code = ("from ldm_jax import platform; platform.configure()\n"
          "import jax, jax.numpy as jnp\n"
          "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
          "jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()\n"
          "print(jax.config.jax_compilation_cache_dir)\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, cwd=root,  # noqa: E731
                                 capture_output=True, text=True, check=True).stdout.strip()
  cache = tmp_path / "ldm_jax" / "jax_cache"
  assert run(env) == str(cache)
  assert any(cache.iterdir())
  assert run(dict(env, **{platform.CACHE_ENV: "off"})) == "None"


def test_unwritable_cache_dir(tmp_path, monkeypatch, capsys):
  """The default location unusable: a warning and no cache; a chosen one: a UserError."""
  import pytest  # pylint: disable=g-import-not-at-top
  from ldm_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  blocker = tmp_path / "file"
  blocker.write_text("")
  monkeypatch.delenv(platform.CACHE_ENV, raising=False)
  platform._enable_compilation_cache(str(blocker / "cache"))  # pylint: disable=protected-access
  assert "compiling without a persistent cache" in capsys.readouterr().err
  monkeypatch.setenv(platform.CACHE_ENV, str(blocker / "cache"))
  with pytest.raises(UserError, match=platform.CACHE_ENV):
    platform._enable_compilation_cache(str(blocker / "cache"))  # pylint: disable=protected-access
