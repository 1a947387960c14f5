"""Damaged checkpoints: restore falls back to the newest step that restores, with one warning
naming the damaged step; training moves the damaged step aside and saves over it again;
sampling reads without writing; when nothing restores, one error line names the directory.
(The same fall-back in a two-process run: tests/test_distributed_multiprocess.py.)"""
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.checkpoint import DAMAGED, Checkpointer, abstract_like, restore_eval_params
from ldm_jax.errors import UserError


def _state(step):
  return {"params": {"w": jnp.full((64, 64), float(step))},
          "ema_params": {"w": jnp.full((64, 64), -float(step))}}


def _write(directory, steps=(1, 2, 3)):
  ckpt = Checkpointer(str(directory), keep=5, save_every=1, async_save=False)
  for step in steps:
    ckpt.save(step, _state(step), {"step": step}, force=True)
  ckpt.wait()
  ckpt.close()


def _data_files(step_dir):
  files = [p for p in pathlib.Path(step_dir, "state").rglob("*")
           if p.is_file() and p.parent.name == "d"]
  assert files
  return files


def _truncate(step_dir):
  for f in _data_files(step_dir):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _random_bytes(step_dir):
  rng = np.random.default_rng(0)
  for f in _data_files(step_dir):
    f.write_bytes(rng.integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())


def _missing(step_dir):
  for f in _data_files(step_dir):
    f.unlink()


def _missing_meta(step_dir):
  (pathlib.Path(step_dir) / "meta" / "metadata").unlink()


DAMAGE = {"truncated": _truncate, "random_bytes": _random_bytes, "missing": _missing,
          "missing_meta": _missing_meta}


def _abstract():
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = jax.eval_shape(lambda: _state(0))
  return abstract_like(shapes, jax.tree.map(lambda _: one, shapes))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_training_restore_falls_back_and_saves_again(tmp_path, caplog, damage):
  _write(tmp_path)
  DAMAGE[damage](tmp_path / "3")
  ckpt = Checkpointer(str(tmp_path), keep=5, save_every=1, async_save=False)
  with caplog.at_level(logging.WARNING):
    state, meta, step = ckpt.restore_newest(_abstract(), quarantine=True)
  assert step == 2 and meta == {"step": 2}
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), 2.0)
  warned = [r.getMessage() for r in caplog.records if f"{tmp_path}/3 does not restore" in
            r.getMessage()]
  assert len(warned) == 1, caplog.text
  # Nothing is deleted: the damaged step is kept aside, out of orbax's way.
  assert (tmp_path / DAMAGED / "3").is_dir() and not (tmp_path / "3").exists()
  assert ckpt.latest_step() == 2
  ckpt.save(3, _state(30), {"step": 3}, force=True)
  ckpt.wait()
  state, _, step = ckpt.restore_newest(_abstract(), quarantine=True)
  assert step == 3 and float(state["params"]["w"][0, 0]) == 30.0
  ckpt.close()


@pytest.mark.parametrize("damage", ["truncated", "missing_meta"])
def test_sampling_restore_falls_back_without_writing(tmp_path, caplog, damage):
  _write(tmp_path)
  DAMAGE[damage](tmp_path / "3")
  before = sorted(str(p) for p in tmp_path.rglob("*"))
  with caplog.at_level(logging.WARNING):
    params, meta, step = restore_eval_params(str(tmp_path))
  assert step == 2 and meta == {"step": 2}
  np.testing.assert_array_equal(np.asarray(params["w"]), -2.0)
  assert f"{tmp_path}/3" in caplog.text
  assert sorted(str(p) for p in tmp_path.rglob("*")) == before
  # An explicitly requested damaged step is an error naming it, not a silent fall-back.
  with pytest.raises(UserError, match=f"{tmp_path}/3"):
    restore_eval_params(str(tmp_path), step=3)


def test_nothing_restores_is_one_line_naming_the_directory(tmp_path):
  _write(tmp_path, steps=(1, 2))
  for step in (1, 2):
    _truncate(tmp_path / str(step))
  ckpt = Checkpointer(str(tmp_path), keep=5, save_every=1, async_save=False)
  with pytest.raises(UserError) as info:
    ckpt.restore_newest(_abstract(), quarantine=True)
  ckpt.close()
  message = str(info.value)
  assert f"no checkpoint in {tmp_path} restores" in message and "\n" not in message
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # nothing moved when nothing restores
  with pytest.raises(UserError, match="restore"):
    restore_eval_params(str(tmp_path))
