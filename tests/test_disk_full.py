"""A full disk during training (issue 22 item 3): one line naming what was being written and the
checkpoint kept, no temporary checkpoint directory left, older checkpoints intact, and a resume
after space is freed that continues bit-identically. The checkpoint case runs on a real small
filesystem (a tmpfs filled up to just past the first checkpoint); the other write paths
(metrics, sample grids, summary, config) get an injected ENOSPC from the file's write()."""
import builtins
import errno
import fnmatch
import os
import pathlib
import shutil
import subprocess

import jax
import numpy as np
import pytest

from ldm_jax.checkpoint import restore_eval_params
from ldm_jax.errors import UserError
from ldm_jax.train.run import run
from ldm_jax.train.writers import read_jsonl

ROOT = pathlib.Path(__file__).parents[1]
from configs import autoencoder as ae_configs


def _config(tfds_dir):
  c = ae_configs.get_config("smoke")
  c.data.data_dir = str(tfds_dir)
  c.autoencoder.update(ch=8, num_groups=8)
  c.discriminator.update(ndf=8)
  c.loss.disc_start = 1000  # GAN-free: one small program
  c.train.update(num_steps=8, batch_size=8, log_every=1, checkpoint_every=4, eval_every=1000,
                 eval_batch_size=16, eval_max_examples=16, num_eval_images=2,
                 keep_checkpoints=5, async_checkpoint=True)
  return c


def _used(path) -> int:
  st = os.statvfs(path)
  return (st.f_blocks - st.f_bfree) * st.f_frsize


def _free(path) -> int:
  st = os.statvfs(path)
  return st.f_bavail * st.f_frsize


@pytest.fixture
def small_fs(tmp_path):
  """A 64 MiB tmpfs (skipped where this machine does not let the tests mount one)."""
  mount = tmp_path / "fs"
  mount.mkdir()
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if done.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(workdir / "autoencoder" / "metrics.jsonl")
          if "loss" in r}


def test_full_disk_during_a_checkpoint_is_one_line_and_the_resume_is_exact(tfds_dir, small_fs):
  config = _config(tfds_dir)
  # The uninterrupted run, on the same filesystem to measure what the run writes.
  before = _used(small_fs)
  straight = small_fs / "straight"
  run(config, str(straight))
  written = _used(small_fs) - before
  ckpt_size = sum(p.stat().st_size for p in (straight / "autoencoder" / "checkpoints" / "8")
                  .rglob("*") if p.is_file())
  want_losses = _losses(straight)
  want, _, _ = restore_eval_params(str(straight / "autoencoder" / "checkpoints"), 8)
  want = jax.tree.map(np.asarray, want)
  shutil.rmtree(straight)
  assert sorted(want_losses) == list(range(1, 9))

  # Fill the disk so that everything up to half of the step-8 checkpoint fits.
  filler = small_fs / "filler"
  room = written - ckpt_size // 2
  with open(filler, "wb") as f:
    chunk = b"\0" * (1 << 20)
    left = _free(small_fs) - room
    while left > 0:
      f.write(chunk[:min(left, len(chunk))])
      left -= len(chunk)
  workdir = small_fs / "run"
  ckpts = workdir / "autoencoder" / "checkpoints"
  with pytest.raises(UserError) as info:
    run(config, str(workdir))
  assert str(info.value) == (f"no space left on device while writing checkpoint 8 under "
                             f"{ckpts}; step 4 kept")
  assert sorted(p.name for p in ckpts.iterdir()) == ["4"]  # no *.orbax-checkpoint-tmp left
  assert not (workdir / "train.lock").exists()
  restore_eval_params(str(ckpts), 4)  # the older checkpoint is intact

  filler.unlink()  # space freed: the same command resumes at step 4 and ends bit-identical
  run(config, str(workdir))
  got, _, step = restore_eval_params(str(ckpts), 8)
  assert step == 8
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert _losses(workdir) == want_losses


class _FullDisk:
  """A file object whose writes fail as on a full disk (write() names no file)."""

  def __init__(self, f):
    self._f = f

  def write(self, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  def writelines(self, lines):
    self.write("")

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


@pytest.mark.parametrize("pattern, what", [
    ("metrics.jsonl", "autoencoder/metrics.jsonl"),
    ("reconstructions_*.png.tmp.png", "autoencoder/reconstructions_0000008.png"),
    ("summary.json.tmp", "summary.json"),
    ("config.json.tmp", "config.json"),
])
def test_full_disk_on_every_other_write_path_is_one_line(tfds_dir, tmp_path, monkeypatch,
                                                         pattern, what):
  config = _config(tfds_dir)
  real_open = builtins.open

  def full_open(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    if any(m in mode for m in "wax") and fnmatch.fnmatch(os.path.basename(str(file)), pattern):
      return _FullDisk(f)
    return f

  monkeypatch.setattr(builtins, "open", full_open)
  with pytest.raises(UserError) as info:
    run(config, str(tmp_path))
  kept = "autoencoder step 8" if pattern == "summary.json.tmp" else "none"
  if pattern.startswith("reconstructions"):  # the end-of-run grid is drawn before step 8 saves
    kept = "autoencoder step 4"
  assert str(info.value) == (f"no space left on device while writing {tmp_path}/{what} under "
                             f"{tmp_path}; checkpoints kept: {kept}")
  leftovers = [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name]
  assert not leftovers and not (tmp_path / "train.lock").exists()
