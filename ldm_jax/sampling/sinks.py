"""Where a batched run's images go, restartable: `PngDirSink` (one PNG per image,
`<out_dir>/000123.png`) and `NpzSink` (one `.npz` with `images` and `labels`, assembled from
per-batch parts). Each keeps the settings of the run in `sampling.json` and refuses to mix
samples of other settings into its folder; `done(batch)` tells `batches.run_to_sink` which
batches to skip."""
import json
import os
import shutil
from typing import Any, Mapping, Optional

import numpy as np

from ldm_jax import files
from ldm_jax.errors import UserError
from ldm_jax.images import save_png
from ldm_jax.sampling.batches import BatchPlan

MANIFEST = "sampling.json"


def _check_manifest(folder: str, settings: Mapping[str, Any]) -> None:
  """Writes folder/sampling.json, or checks that the one there has the same settings."""
  path = os.path.join(folder, MANIFEST)
  settings = json.loads(json.dumps(dict(settings)))  # plain JSON types
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      try:
        old = json.load(f)
      except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}): delete it or the folder") from e
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
      shown = ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff[:4])
      raise UserError(f"{folder} holds samples drawn with other settings ({shown}): use "
                      "another output path or delete it")
    return
  os.makedirs(folder, exist_ok=True)
  with files.replaced(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(settings, f, indent=2, sort_keys=True)


class PngDirSink:
  """One PNG per image, `<folder>/<index:06d>.png` (index in the run); a batch is done when
  all its files exist."""

  def __init__(self, folder: str, plan: BatchPlan, settings: Mapping[str, Any]):
    if os.path.exists(folder) and not os.path.isdir(folder):
      raise UserError(f"out_dir={folder!r} is a file, not a folder")
    self.folder, self.plan = folder, plan
    _check_manifest(folder, settings)

  def path(self, index: int) -> str:
    return os.path.join(self.folder, f"{index:06d}.png")

  def done(self, batch: int) -> bool:
    start, stop = self.plan.bounds(batch)
    return all(os.path.exists(self.path(i)) for i in range(start, stop))

  def write(self, batch: int, images: np.ndarray, labels: Optional[np.ndarray]) -> None:
    del labels
    start, _ = self.plan.bounds(batch)
    for k, image in enumerate(images):
      save_png(self.path(start + k), image)

  def finish(self) -> str:
    return self.folder


class NpzSink:
  """One `.npz` (`images` uint8 [N, H, W, C], `labels` int32 [N] when class-conditional),
  assembled from `<path>.parts/batch_<i>.npz` when every batch is there."""

  def __init__(self, path: str, plan: BatchPlan, settings: Mapping[str, Any]):
    if not path.endswith(".npz"):
      raise UserError(f"{path!r}: the samples file must end in .npz")
    self.path, self.plan = path, plan
    self.parts = path + ".parts"
    self._settings = dict(settings)
    self._complete = os.path.exists(path) and self._same_settings(path)
    if not self._complete:
      _check_manifest(self.parts, settings)

  def _same_settings(self, path: str) -> bool:
    with np.load(path) as z:
      old = json.loads(str(z["settings"])) if "settings" in z.files else None
    if old != json.loads(json.dumps(self._settings)):
      raise UserError(f"{path} exists and holds samples drawn with other settings: use "
                      "another output path or delete it")
    return True

  def _part(self, batch: int) -> str:
    return os.path.join(self.parts, f"batch_{batch:06d}.npz")

  def done(self, batch: int) -> bool:
    return self._complete or os.path.exists(self._part(batch))

  def write(self, batch: int, images: np.ndarray, labels: Optional[np.ndarray]) -> None:
    with files.replaced(self._part(batch)) as tmp:
      with open(tmp, "wb") as f:
        np.savez(f, images=images, **({} if labels is None else {"labels": labels}))

  def finish(self) -> str:
    if self._complete:
      return self.path
    parts = [np.load(self._part(i)) for i in range(self.plan.num_batches)]
    arrays = {"images": np.concatenate([p["images"] for p in parts])}
    if "labels" in parts[0].files:
      arrays["labels"] = np.concatenate([p["labels"] for p in parts])
    for p in parts:
      p.close()
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with files.replaced(self.path) as tmp:
      with open(tmp, "wb") as f:
        np.savez(f, settings=np.asarray(json.dumps(json.loads(json.dumps(self._settings)))),
                 **arrays)
    shutil.rmtree(self.parts)
    return self.path


def read_samples(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """(images uint8 [N, H, W, C], labels or None) of an NpzSink file."""
  with np.load(path) as z:
    return z["images"], (z["labels"] if "labels" in z.files else None)
