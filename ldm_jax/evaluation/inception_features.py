"""Inception-v3 pool3 features (FID's network) of image batches, with a progress line.

Images are uint8 NHWC (as written to PNG: the standard way FID sees generated images) or
float in [-1, 1]; grayscale is repeated to RGB and everything is resized to 299x299 as
pytorch-fid does (ldm_jax/models/inception.py). One program serves every batch: the last
batch is padded to the batch size and cut.
"""
from typing import Optional

import jax
import numpy as np

from ldm_jax.convert.inception import load_variables
from ldm_jax.models import inception


def to_float(images) -> np.ndarray:
  """uint8 [0, 255] or float [-1, 1] -> float32 [-1, 1]."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images.astype(np.float32)


class InceptionFeatures:
  """`features(images) -> [N, 2048] float64` with the weights of `path` (a converted .npz,
  or pytorch-fid's .pth)."""

  def __init__(self, path: str, batch_size: int = 50):
    self.path = path
    self.variables, self.fid_variant = load_variables(path)
    self.variables = jax.device_put(self.variables)
    self.batch_size = int(batch_size)
    model = inception.InceptionV3(self.fid_variant)
    self._fn = jax.jit(lambda v, x: model.apply(v, inception.fid_input(x)))

  def __call__(self, images, progress: Optional[object] = None) -> np.ndarray:
    """`progress`: a sampling.batches.BatchProgress-like object (start / batch_done)."""
    from ldm_jax.sampling.batches import BatchPlan  # pylint: disable=g-import-not-at-top
    n = len(images)
    plan = BatchPlan(n, self.batch_size)
    if progress is not None:
      progress.start(plan)
    out = []
    for i in range(plan.num_batches):
      start, stop = plan.bounds(i)
      batch = to_float(images[start:stop])
      if plan.num_batches > 1 and len(batch) < self.batch_size:
        pad = np.repeat(batch[-1:], self.batch_size - len(batch), axis=0)
        batch = np.concatenate([batch, pad])
      out.append(np.asarray(self._fn(self.variables, batch))[:stop - start])
      if progress is not None:
        progress.batch_done(i, stop - start)
    return np.concatenate(out).astype(np.float64)
