"""Metric outputs beyond clu's defaults: a JSON-lines history and the workdir's summary.json."""
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers

from ldm_jax import files
from ldm_jax.workdir import read_summary, update_summary  # noqa: F401  (re-exported)


def _plain(v: Any):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


class JsonlWriter(metric_writers.MetricWriter):
  """Appends `{"step": s, **scalars}` lines to a file: a machine-readable training history.

  clu ships TensorBoard and logging writers only; this is the one format tests and scripts
  can read without TensorFlow. Non-scalar outputs are left to the TensorBoard writer.
  """

  def __init__(self, path: str, resume_step: int = 0):
    self._path = path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
      _truncate_history(path, resume_step)
    # Line-buffered: the history survives a killed run up to its last logged step.
    self._file = open(path, "a", encoding="utf-8", buffering=1)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    with files.naming(self._path):
      self._file.write(json.dumps({"step": int(step),
                                   **{k: _plain(v) for k, v in scalars.items()}}) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def _truncate_history(path: str, resume_step: int) -> None:
  """Keeps the lines of steps <= resume_step: a run killed after its last checkpoint logged
  steps that the resumed run logs again (one line per step), and a kill can leave a partial
  last line. Rewritten atomically (temp file + rename)."""
  kept, dropped = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        dropped += 1
        continue
      if row.get("step", 0) <= resume_step:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    with files.replaced(path) as tmp:
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)


def create_writer(logdir: str, resume_step: int = 0) -> metric_writers.MetricWriter:
  """TensorBoard + logging (+ metrics.jsonl) on process 0; logging only on the others.
  `resume_step`: the step the run restarts from; history lines after it are dropped."""
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(logdir, just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(logdir, asynchronous=False),
      JsonlWriter(os.path.join(logdir, "metrics.jsonl"), resume_step)])


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
