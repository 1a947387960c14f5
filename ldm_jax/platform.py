"""Process-wide XLA settings, in one place. Call `configure()` before the first jax computation.

Convolutions on XLA:CPU. jaxlib 0.10 hands every convolution to YNNPACK, whose 3x3 weight
gradient runs at about 5 GFLOP/s; routing convolutions back to XLA's Eigen path made a Flax
UNet train step 2-3x faster on 2 cores with identical gradients (measured 2026-11-25 and again
2026-12-01, see docs/BENCHMARKS.md). YNNPACK stays on for reductions (GroupNorm). The flag
only affects the CPU compiler, and XLA aborts on flags it does not know, so it is applied only
to the jaxlib releases it was measured on, `_MEASURED` = [0.9.2, 0.11): 3x3 convolution
gradients 1.6-1.9x faster on jaxlib 0.9.2, 2.1-2.4x on 0.10.2 (2026-12-01; 0.10.2 was then
the newest jaxlib on the package index). Re-measure on every jaxlib upgrade
(`benchmarks/autoencoder_step.py`) and widen `_MEASURED`.

Persistent compilation cache. Compiled programs are kept on disk and loaded by the next
process that compiles the same program (a restarted run, sample.py on the same workdir):
`$XDG_CACHE_HOME/ldm_jax/jax_cache` (default `~/.cache/ldm_jax/jax_cache`), at most
`_CACHE_MAX_BYTES` (least recently used entries go first). `LDM_JAX_COMPILATION_CACHE=<dir>`
moves it, `LDM_JAX_COMPILATION_CACHE=off` disables it; JAX's own `JAX_COMPILATION_CACHE_DIR`,
when set, wins (the test suite points it at a temporary directory).
"""
import importlib.metadata
import itertools
import os
import sys
from typing import Optional

from ldm_jax.errors import UserError

_CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_MEASURED = ((0, 9, 2), (0, 11, 0))  # [first, end) jaxlib releases the flag was measured on
CACHE_ENV = "LDM_JAX_COMPILATION_CACHE"
_CACHE_OFF = ("0", "off", "false", "no", "none")
_CACHE_MAX_BYTES = 4 * 2 ** 30


def conv_flag_applies(jaxlib_version: str) -> bool:
  """Whether `configure` sets the XLA:CPU convolution flag for this jaxlib release."""
  parts = []
  for piece in jaxlib_version.split(".")[:3]:
    digits = "".join(itertools.takewhile(str.isdigit, piece))
    if not digits:
      break
    parts.append(int(digits))
  if len(parts) < 2:
    return False
  first, end = _MEASURED
  return first <= tuple(parts + [0] * (3 - len(parts))) < end


def compilation_cache_dir(environ=None) -> Optional[str]:
  """The persistent cache directory `configure` uses, or None when it is disabled."""
  environ = os.environ if environ is None else environ
  value = environ.get(CACHE_ENV, "").strip()
  if value.lower() in _CACHE_OFF:
    return None
  if value:
    return os.path.abspath(os.path.expanduser(value))
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ldm_jax", "jax_cache")


def configure(compilation_cache: bool = True) -> None:
  """Sets the XLA flags (before the backend starts) and turns the persistent compilation
  cache on (`compilation_cache=False` or `LDM_JAX_COMPILATION_CACHE=off`: off)."""
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    version = ""
  flags = os.environ.get("XLA_FLAGS", "")
  if conv_flag_applies(version) and "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_CPU_CONV_FLAG}".strip()
  if compilation_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _enable_compilation_cache(compilation_cache_dir())


def _enable_compilation_cache(path: Optional[str]) -> None:
  if path is None:
    return
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    message = (f"cannot create the compilation cache directory {path} ({e.strerror}); "
               f"set {CACHE_ENV} to another directory or to 'off'")
    if os.environ.get(CACHE_ENV, "").strip():  # the user's own choice: an error
      raise UserError(message) from e
    # The default location (e.g. a read-only home): run without the cache, and say so.
    print(f"warning: {message}; compiling without a persistent cache", file=sys.stderr)
    return
  settings = {"jax_compilation_cache_dir": path,
              "jax_compilation_cache_max_size": _CACHE_MAX_BYTES}
  if "jax" in sys.modules:  # jax reads its JAX_* variables when it is imported
    import jax  # pylint: disable=g-import-not-at-top
    for name, value in settings.items():
      jax.config.update(name, value)
  else:
    for name, value in settings.items():
      os.environ.setdefault(name.upper(), str(value))


def quiet_library_logs() -> None:
  """Drops orbax's per-save INFO chatter from the absl log (warnings and errors still show),
  so that training progress stays readable; once orbax reports a full disk, drops the dozens
  of orbax and asyncio error lines that repeat it (every writer thread and pending task says
  it again): the save's DiskFull error is reported in one line instead."""
  import logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  from ldm_jax.errors import DISK_FULL_TEXT  # pylint: disable=g-import-not-at-top

  class _Filter(logging.Filter):
    disk_full = False

    def filter(self, record):
      orbax = "/orbax/" in record.pathname
      if not (orbax or record.name == "asyncio"):
        return True
      if record.levelno < logging.WARNING:
        return not orbax
      if any(text in record.getMessage() for text in DISK_FULL_TEXT):
        self.disk_full = True
      return not self.disk_full

  absl_logging.get_absl_handler().addFilter(_Filter())


def run_once_compiler_options() -> dict:
  """Compiler options for programs that run once (state initialisation): on XLA:CPU the
  threefry-heavy init of even a tiny model took 50-100 s to compile at the default backend
  optimisation level and 10 s at level 0 (measured 2026-11-25, 2 loaded cores); its run time
  does not matter. Other backends keep their defaults."""
  import jax  # pylint: disable=g-import-not-at-top
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
