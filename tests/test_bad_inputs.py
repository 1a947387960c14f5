"""Bad input to training is refused before anything compiles, in one line naming the culprit
(issue 11 items 4, 7, 8). Other bad inputs have their tables beside the code they test:
damaged checkpoints tests/test_checkpoint_fallback.py, image files tests/test_data_hardening.py,
converter options tests/test_convert_refusals.py, sample.py flags tests/test_sample_cli.py."""
import math
import pathlib
import subprocess
import sys

import pytest

from ldm_jax.errors import UserError
from ldm_jax.train.run import run

ROOT = pathlib.Path(__file__).parents[1]
from configs import ldm as ldm_configs

NUMBERS = [
    ("ldm.optim.lr", math.nan, r"config\.ldm\.optim\.lr=nan must be a finite number"),
    ("ldm.optim.lr", -1.0, r"config\.ldm\.optim\.lr=-1\.0 must be positive"),
    ("ldm.optim.lr", math.inf, r"config\.ldm\.optim\.lr=inf must be a finite number"),
    ("optim.lr", 0.0, r"config\.optim\.lr=0\.0 must be positive"),
    ("optim.ema_decay", 1.0, r"config\.optim\.ema_decay=1\.0 must be in \[0, 1\)"),
    ("optim.warmup_steps", -5, r"config\.optim\.warmup_steps=-5 must be >= 0"),
    ("loss.kl_weight", -1e-6, r"config\.loss\.kl_weight=-1e-06 must be >= 0"),
    ("ldm.diffusion.beta_end", 1.5, r"config\.ldm\.diffusion\.beta_end=1\.5 must be in \(0, 1\)"),
    ("ldm.train.num_steps", 0, r"config\.ldm\.train\.num_steps=0 must be positive"),
    ("ldm.sample.guidance", math.nan, r"config\.ldm\.sample\.guidance=nan must be a finite"),
    ("ldm.conditioning.drop_prob", 1.0, r"drop_prob=1\.0 must be in \[0, 1\)"),
    ("train.keep_checkpoints", 0, r"config\.train\.keep_checkpoints=0 must be positive"),
]


@pytest.mark.parametrize("key, value, message", NUMBERS, ids=[f"{k}={v}" for k, v, _ in NUMBERS])
def test_numeric_config_values_are_checked_before_anything_compiles(tmp_path, key, value,
                                                                    message):
  config = ldm_configs.get_config("smoke")
  block, name = key.rsplit(".", 1)
  node = config
  for part in block.split("."):
    node = node[part]
  node[name] = value
  with pytest.raises(UserError, match=message) as info:
    run(config, str(tmp_path / "run"))
  assert "\n" not in str(info.value)
  assert not (tmp_path / "run" / "autoencoder").exists()  # nothing trained, nothing written


def test_workdir_that_is_a_file_or_not_writable_is_one_line(tmp_path):
  config = ldm_configs.get_config("smoke")
  afile = tmp_path / "afile"
  afile.write_text("keep me")
  with pytest.raises(UserError, match=f"--workdir={afile} is a file, not a directory"):
    run(config, str(afile))
  assert afile.read_text() == "keep me"
  # /proc refuses new directories even to root (permission bits would not: tests run as root).
  with pytest.raises(UserError, match="--workdir=/proc/ldm_jax_run is not writable"):
    run(config, "/proc/ldm_jax_run")


@pytest.mark.parametrize("override, nearest", [
    ("--config.train.nope=1", "config.train.num_steps"),
    ("--config.trian.num_steps=1", "config.train.num_steps"),
    ("--config.ldm.optim.lrr=1", "config.ldm.optim.lr"),
])
def test_unknown_config_key_is_one_line_with_the_nearest_keys(tmp_path, override, nearest):
  done = subprocess.run(
      [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/ldm.py:smoke",
       f"--workdir={tmp_path}", override], capture_output=True, text=True)
  assert done.returncode == 1
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith(f"error: config.{override[len('--config.'):].split('=')[0]} is "
                              "not a key of this config; nearest: "), done.stderr
  assert nearest in lines[-1]
  assert len(lines) == 1, done.stderr
