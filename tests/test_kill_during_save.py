"""kill -9 at any moment of a checkpoint save (issue 22 item 4): one tiny run is killed 20 times,
each time at another delay after a save began (spread over the measured save window, from the
temporary directory's appearance to the renamed step), and restarted with the same command;
each restart resumes from the newest complete step, and the run's final metrics and parameters
are bit-identical to an uninterrupted run."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from ldm_jax.checkpoint import restore_eval_params
from ldm_jax.train.writers import read_jsonl

ROOT = pathlib.Path(__file__).parents[1]
KILLS = 20
STEPS = 48


def _cmd(workdir, tfds_dir):
  overrides = {
      "data.data_dir": tfds_dir, "autoencoder.ch": 8, "autoencoder.num_groups": 8,
      "discriminator.ndf": 8, "loss.disc_start": 1000, "train.num_steps": STEPS,
      "train.batch_size": 8, "train.log_every": 1, "train.checkpoint_every": 2,
      "train.keep_checkpoints": 3, "train.eval_every": 1000, "train.eval_batch_size": 16,
      "train.eval_max_examples": 16, "train.num_eval_images": 2, "train.async_checkpoint": True,
      "train.progress_every_secs": 1000.0}
  return [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/autoencoder.py:smoke",
          f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in overrides.items()]]


def _entries(ckpts):
  try:
    return os.listdir(ckpts)
  except FileNotFoundError:
    return []


def _wait_for_save(proc, ckpts, timeout=300.0):
  """Polls until a step's temporary directory appears (a new one: the restart removes those
  of the killed run); returns its step, or None on exit."""
  deadline = time.time() + timeout
  old = {n for n in _entries(ckpts) if ".orbax-checkpoint-tmp" in n}
  while proc.poll() is None:
    entries = _entries(ckpts)
    old &= set(entries)
    tmp = [n for n in entries if ".orbax-checkpoint-tmp" in n and n not in old]
    if tmp:
      return int(tmp[0].split(".")[0])
    assert time.time() < deadline, "no save began"
    time.sleep(0.001)
  return None


def _save_window(proc, ckpts, step):
  """Seconds from the temporary directory of `step` to its final directory."""
  start = time.perf_counter()
  while str(step) not in _entries(ckpts):
    assert proc.poll() is None or str(step) in _entries(ckpts)
    time.sleep(0.001)
  return time.perf_counter() - start


def _history(workdir):
  rows = [r for r in read_jsonl(workdir / "autoencoder" / "metrics.jsonl") if "loss" in r]
  by_step = {r["step"]: {k: v for k, v in r.items() if k != "steps_per_sec"} for r in rows}
  assert len(by_step) == len(rows), "a step logged twice"
  return by_step


def test_kill_9_at_20_points_of_the_save_window_resumes_bit_identically(tfds_dir, tmp_path):
  # The uninterrupted run, measuring its save windows.
  straight = tmp_path / "straight"
  ckpts = straight / "autoencoder" / "checkpoints"
  proc = subprocess.Popen(_cmd(straight, tfds_dir), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  windows = []
  while (step := _wait_for_save(proc, ckpts)) is not None and step < STEPS:
    windows.append(_save_window(proc, ckpts, step))
  assert proc.wait() == 0, proc.stderr.read()[-3000:]
  killed = tmp_path / "killed"
  ckpts = killed / "autoencoder" / "checkpoints"

  def start():
    proc = subprocess.Popen(_cmd(killed, tfds_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    step = _wait_for_save(proc, ckpts)
    assert step is not None, f"finished before a save: {proc.stderr.read()[-3000:]}"
    return proc, step

  def kill(proc, step, delay):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = sorted(int(n) for n in _entries(ckpts) if n.isdigit())
    outcomes.append((step, round(delay, 4), step in complete))

  # The yardstick is the window of a restart's own first save (slower than later ones: first use
  # of the writer threads), measured on the killed run itself, and killed just after the rename:
  # the straight run's windows alone were too short on a slower machine, so every kill landed
  # before the step was complete.
  outcomes = []
  proc, step = start()
  window = max(_save_window(proc, ckpts, step), windows[0])
  kill(proc, step, window)
  delays = [window * 1.3 * i / (KILLS - 2) for i in range(KILLS - 1)]  # 0 .. past the rename
  for delay in delays:
    proc, step = start()
    time.sleep(delay)
    kill(proc, step, delay)
  done = subprocess.run(_cmd(killed, tfds_dir), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from" in done.stderr, (done.stderr[-3000:], outcomes)
  # The kills landed both before and after the step was complete.
  assert any(c for *_, c in outcomes) and not all(c for *_, c in outcomes), outcomes

  assert _history(killed) == _history(straight)
  a, _, _ = restore_eval_params(str(ckpts), STEPS)
  b, _, _ = restore_eval_params(str(straight / "autoencoder" / "checkpoints"), STEPS)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not [n for n in _entries(ckpts) if ".orbax-checkpoint-tmp" in n]
