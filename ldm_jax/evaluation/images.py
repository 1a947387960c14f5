"""Image grids and PNG files: the uint8 edge of the pipeline."""
import os

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """NHWC float in [-1, 1] -> NHWC uint8."""
  x = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def make_grid(images, ncols: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """NHWC images (uint8, or float in [-1, 1]) -> one HWC uint8 grid, row-major."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  n, h, w, c = images.shape
  nrows = -(-n // ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = img
  return grid


def interleave_pairs(a, b) -> np.ndarray:
  """[a0, b0, a1, b1, ...]: inputs beside their reconstructions in a grid with even ncols."""
  a, b = np.asarray(a), np.asarray(b)
  return np.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def save_png(path: str, grid: np.ndarray) -> None:
  """Writes a HWC uint8 grid (1 or 3 channels) to `path` atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  tmp = path + ".tmp.png"
  img.save(tmp, format="PNG")
  os.replace(tmp, path)
