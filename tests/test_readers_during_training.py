"""Readers beside a running trainer (issue 22 item 5): sample.py and the checkpoint reads that
sample.py and evaluate make (`restore_eval_params`, the newest step) on a workdir that is being
trained see only complete checkpoints: every read returns the arrays that the step holds once
training is over, and the reader writes nothing."""
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np

from ldm_jax.checkpoint import restore_eval_params
from ldm_jax.errors import UserError
from ldm_jax.evaluation.run import last_step

ROOT = pathlib.Path(__file__).parents[1]


def test_reads_during_training_see_only_complete_checkpoints(tfds_dir, tmp_path):
  workdir = tmp_path / "run"
  ckpts = workdir / "pixel" / "checkpoints"
  cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/pixel.py:smoke",
         f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}",
         "--config.pixel.train.num_steps=12", "--config.pixel.train.checkpoint_every=1",
         "--config.pixel.train.keep_checkpoints=100", "--config.pixel.train.eval_every=1000",
         "--config.pixel.train.async_checkpoint=true"]
  trainer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  seen, sampler = {}, None
  try:
    deadline = time.time() + 900
    while trainer.poll() is None:
      assert time.time() < deadline, "training did not finish"
      try:
        newest = last_step(str(workdir), "pixel")  # evaluate's default step
        params, _, step = restore_eval_params(str(ckpts))
        assert step >= newest
      except UserError as e:
        assert "no checkpoint" in str(e) or "no pixel checkpoint" in str(e), e  # before the first save
        time.sleep(0.05)
        continue
      seen.setdefault(step, jax.tree.map(np.asarray, params))
      time.sleep(0.2)  # leave the trainer its cores
      if sampler is None:  # sample.py once, beside the trainer
        sampler = subprocess.Popen(
            [sys.executable, str(ROOT / "sample.py"), f"--workdir={workdir}",
             "--num_samples=4", "--steps=2", f"--out={tmp_path / 'during.png'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  finally:
    if trainer.poll() is None:
      trainer.kill()
    err = trainer.communicate()[1]
  assert trainer.returncode == 0, err[-3000:]
  sample_err = sampler.communicate(timeout=600)[1]
  assert sampler.returncode == 0 and (tmp_path / "during.png").exists(), sample_err[-3000:]
  assert "does not restore" not in sample_err and "read only" not in sample_err, sample_err[-3000:]
  assert len(seen) >= 3, f"the reader saw only steps {sorted(seen)}"
  for step, params in seen.items():  # each read was the whole step, not a partial one
    final, _, _ = restore_eval_params(str(ckpts), step)
    jax.tree.map(np.testing.assert_array_equal, params, final)
  assert not list(ckpts.glob("*.orbax-checkpoint-tmp*"))
