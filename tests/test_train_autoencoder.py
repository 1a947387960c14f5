"""Stage-1 training end to end: real data, sharded step equivalence, resume after a kill."""
import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from ldm_jax.errors import UserError
from ldm_jax.train.run import run
from ldm_jax.train.writers import read_jsonl

ROOT = pathlib.Path(__file__).parents[1]
from configs import autoencoder as ae_configs


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


# Sharded == single-device steps and the partition rules: tests/test_distributed.py.


def _train_cmd(workdir, *overrides):
  return [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/autoencoder.py:smoke",
          f"--workdir={workdir}", *overrides]


def test_resume_after_kill_matches_uninterrupted_run(tfds_dir, tmp_path):
  steps = 24
  overrides = [f"--config.data.data_dir={tfds_dir}", "--config.autoencoder.ch=8",
               "--config.autoencoder.num_groups=8", "--config.discriminator.ndf=8",
               f"--config.train.num_steps={steps}", "--config.train.log_every=1",
               "--config.train.checkpoint_every=8", "--config.train.eval_every=1000",
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
  assert resumed_from < steps, "the run finished before it could be killed"
  done = subprocess.run(_train_cmd(killed, *overrides), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from" in done.stderr

  straight = tmp_path / "straight"
  done = subprocess.run(_train_cmd(straight, *overrides), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]

  def losses(workdir):
    rows = [r for r in read_jsonl(workdir / "autoencoder" / "metrics.jsonl") if "loss" in r]
    by_step = {row["step"]: row for row in rows}
    assert len(by_step) == len(rows), "a step logged twice"  # resume drops the killed rows
    return by_step
  a, b = losses(killed), losses(straight)
  assert sorted(b) == list(range(1, steps + 1))
  assert set(range(resumed_from + 1, steps + 1)) <= set(a)
  for step in range(resumed_from + 1, steps + 1):
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


def test_sigterm_while_a_step_compiles_saves_within_seconds(tfds_dir, tmp_path):
  """The GAN step (loss.disc_start=2) compiles in the background while steps 1-2 run; the
  loop then waits for it, and a SIGTERM during that wait saves step 2 and exits 0 at once."""
  overrides = [f"--config.data.data_dir={tfds_dir}", "--config.autoencoder.ch=16",
               "--config.autoencoder.num_groups=8", "--config.discriminator.ndf=24",
               "--config.train.num_steps=6", "--config.train.log_every=1",
               "--config.train.checkpoint_every=100", "--config.train.eval_every=1000",
               "--config.train.eval_max_examples=64", "--config.train.num_eval_images=4",
               "--config.loss.disc_start=2", "--config.train.async_checkpoint=false",
               "--verbosity=1"]  # INFO: the loop's "waiting for ... to compile" line
  log = tmp_path / "train.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(_train_cmd(tmp_path / "run", *overrides), stdout=f,
                            stderr=subprocess.STDOUT)
  deadline = time.time() + 600
  while "(variant True) to compile" not in log.read_text():
    assert proc.poll() is None, log.read_text()[-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  signalled = time.time()
  assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
  exit_s = time.time() - signalled
  text = log.read_text()
  assert "preempted, saved step" in text, text[-3000:]
  saved = [int(p.name) for p in (tmp_path / "run" / "autoencoder" / "checkpoints").iterdir()
           if p.name.isdigit()]
  assert saved and max(saved) >= 2, saved
  assert exit_s < 15, f"exited {exit_s:.1f}s after SIGTERM"
