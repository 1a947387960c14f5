"""Stage-1 training end to end: real data, sharded step equivalence, resume after a kill."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import sharding
from ldm_jax.errors import UserError
from ldm_jax.train.autoencoder import AutoencoderTask
from ldm_jax.train.run import run
from ldm_jax.train.writers import read_jsonl

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "configs"))
import autoencoder as ae_configs  # noqa: E402


def tiny_config(tfds_dir, **train):
  c = ae_configs.get_config("smoke")
  c.data.data_dir = str(tfds_dir)
  c.autoencoder.update(ch=8, num_groups=8)
  c.discriminator.update(ndf=8)
  c.train.update(batch_size=16, eval_batch_size=64, eval_max_examples=128, num_eval_images=4,
                 async_checkpoint=False)
  c.train.update(**train)
  return c


def test_reconstruction_loss_falls_on_real_data(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir, num_steps=60, log_every=5, eval_every=60, checkpoint_every=60)
  config.loss.disc_start = 40  # the last 20 steps include the GAN terms
  out = run(config, str(tmp_path))
  history = read_jsonl(tmp_path / "autoencoder" / "metrics.jsonl")
  rec = [h["rec_loss"] for h in history if "rec_loss" in h]
  assert rec[-1] < 0.6 * rec[0], rec
  assert any("disc_loss" in h for h in history)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["autoencoder"]["test_examples"] == 128
  assert summary["autoencoder"]["test_psnr"] == pytest.approx(out["autoencoder"]["test_psnr"])
  assert 5.0 < summary["autoencoder"]["test_psnr"] < 60.0
  assert 0.0 < summary["autoencoder"]["test_ssim"] <= 1.0
  assert (tmp_path / "autoencoder" / "reconstructions_0000060.png").exists()
  assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 60
  assert list((tmp_path / "autoencoder").glob("events.out.tfevents.*"))
  # Same command again: the run is complete, nothing retrains, the summary is rewritten.
  again = run(config, str(tmp_path))
  assert again["autoencoder"]["steps"] == 60
  assert len(read_jsonl(tmp_path / "autoencoder" / "metrics.jsonl")) == len(history)


def _train_steps(config, mesh, n, variant):
  task = AutoencoderTask(config)
  abstract = jax.eval_shape(task.init_state, jax.random.key(0))
  # A low FSDP threshold so that most parameters really are split on the fsdp axis.
  shardings = sharding.state_shardings(abstract, mesh, fsdp_min_size=64)
  state = jax.jit(task.init_state, out_shardings=shardings)(jax.random.key(0))
  step = jax.jit(task.make_train_step(variant), in_shardings=(
      shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)))
  rng = np.random.default_rng(0)
  history = []
  for _ in range(n):
    batch = {"image": rng.uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32),
             "label": np.zeros(16, np.int32)}
    state, metrics = step(state, sharding.put_batch(batch, sharding.batch_sharding(mesh)),
                          jax.random.key(1))
    history.append({k: float(v) for k, v in metrics.compute().items()})
  return state, history


def test_sharded_step_equals_single_device(tfds_dir):
  import ml_collections
  config = tiny_config(tfds_dir)
  # Conv biases in front of a GroupNorm and attention key biases get no gradient in exact
  # arithmetic, so Adam's g / (sqrt(v) + eps) turns rounding noise (~1e-9) into +-lr steps
  # that differ with the reduction order; a larger eps keeps such steps below 1% of lr, the
  # absolute tolerance below.
  config.optim.eps = 1e-4
  one = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                           jax.devices()[:1])
  s1, h1 = _train_steps(config, one, 3, True)
  for axes in (dict(data=8, fsdp=1), dict(data=2, fsdp=4)):
    many = sharding.make_mesh(ml_collections.ConfigDict(dict(tensor=1, **axes)))
    s8, h8 = _train_steps(config, many, 3, True)
    if axes["fsdp"] > 1:
      assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(s8.params))
    for a, b in zip(h1, h8):
      for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (axes, k)
    paths = jax.tree_util.tree_leaves_with_path(s1.params)
    for (path, a), b in zip(paths, jax.tree.leaves(s8.params)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5,
                                 atol=0.01 * config.optim.lr, err_msg=f"{axes} {jax.tree_util.keystr(path)}")


def test_fsdp_shards_large_parameters():
  import ml_collections
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
  tree = {"big": jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32),
          "small": jax.ShapeDtypeStruct((128,), jnp.float32)}
  sh = sharding.state_shardings(tree, mesh)
  assert sh["big"].spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  assert sh["small"].spec == jax.sharding.PartitionSpec()


def _train_cmd(workdir, *overrides):
  return [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/autoencoder.py:smoke",
          f"--workdir={workdir}", *overrides]


def test_resume_after_kill_matches_uninterrupted_run(tfds_dir, tmp_path):
  overrides = [f"--config.data.data_dir={tfds_dir}", "--config.autoencoder.ch=8",
               "--config.autoencoder.num_groups=8", "--config.discriminator.ndf=8",
               "--config.train.num_steps=40", "--config.train.log_every=1",
               "--config.train.checkpoint_every=4", "--config.train.eval_every=1000",
               "--config.train.eval_max_examples=64", "--config.train.num_eval_images=4",
               "--config.loss.disc_start=6", "--config.train.async_checkpoint=false"]
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_train_cmd(killed, *overrides), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  ckpts = killed / "autoencoder" / "checkpoints"
  deadline = time.time() + 900
  while not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed_from = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert resumed_from < 40, "the run finished before it could be killed"
  done = subprocess.run(_train_cmd(killed, *overrides), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from" in done.stderr

  straight = tmp_path / "straight"
  done = subprocess.run(_train_cmd(straight, *overrides), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]

  def losses(workdir):
    by_step = {}
    for row in read_jsonl(workdir / "autoencoder" / "metrics.jsonl"):
      if "loss" in row:
        by_step[row["step"]] = row  # the restarted run's rows replace the killed run's
    return by_step
  a, b = losses(killed), losses(straight)
  assert sorted(b) == list(range(1, 41))
  assert set(range(resumed_from + 1, 41)) <= set(a)
  for step in range(resumed_from + 1, 41):
    for key in ("loss", "rec_loss", "kl", "disc_loss"):
      if key in b[step]:
        assert a[step][key] == b[step][key], (step, key)


def test_config_errors_name_the_key(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir)
  config.data.image_size = 30
  with pytest.raises(UserError, match=r"data\.image_size=30 .*f=4"):
    run(config, str(tmp_path))
  config = tiny_config(tfds_dir, batch_size=12)
  with pytest.raises(UserError, match=r"train\.batch_size=12"):
    run(config, str(tmp_path))
  config = tiny_config(tfds_dir)
  config.train.compute_dtype = "float16"
  with pytest.raises(UserError, match=r"train\.compute_dtype='float16'"):
    run(config, str(tmp_path))
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    ae_configs.get_config("huge")
  bad = subprocess.run(_train_cmd(tmp_path / "x", "--config.train.not_a_key=1"),
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "not_a_key" in bad.stderr
