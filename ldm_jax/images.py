"""Images at the uint8 edge of the package: float [-1, 1] to uint8, grids (with row labels),
and image files written atomically (PNG, JPEG by extension)."""
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ldm_jax import files
from ldm_jax.errors import UserError


def to_uint8(images) -> np.ndarray:
  """NHWC float in [-1, 1] -> NHWC uint8."""
  x = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


MIN_GRID_WIDTH = 512  # px: small images (28-64 px) are enlarged to be seen


def make_grid(images, ncols: int, pad: int = 2, pad_value: int = 255,
              min_width: int = MIN_GRID_WIDTH,
              row_labels: Optional[Sequence[str]] = None) -> np.ndarray:
  """NHWC images (uint8, or float in [-1, 1]) -> one HWC uint8 grid, row-major.

  Images are enlarged by the smallest integer factor (nearest neighbour: pixels stay
  pixels) that makes the grid at least `min_width` wide; `row_labels` (class names, prompts)
  are written in a margin left of their rows.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  n, h, w, c = images.shape
  factor = max(1, -(-min_width // (ncols * w))) if min_width else 1
  if factor > 1:
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    h, w = h * factor, w * factor
  nrows = -(-n // ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = img
  if row_labels is not None:
    grid = _label_rows(grid, [str(t) for t in row_labels][:nrows], h, pad)
  return grid


def _label_rows(grid: np.ndarray, labels: Sequence[str], h: int, pad: int,
                max_chars: int = 40) -> np.ndarray:
  """A white margin left of the grid with each row's label, vertically centred."""
  font = ImageFont.load_default()
  labels = [t if len(t) <= max_chars else t[:max_chars - 3] + "..." for t in labels]
  probe = ImageDraw.Draw(Image.new("L", (1, 1)))
  width = max((probe.textbbox((0, 0), t, font=font)[2] for t in labels), default=0) + 8
  margin = Image.new("L", (width, grid.shape[0]), 255)
  draw = ImageDraw.Draw(margin)
  for r, text in enumerate(labels):
    top, bottom = probe.textbbox((0, 0), text, font=font)[1::2]
    y = pad + r * (h + pad) + (h - (bottom - top)) // 2 - top
    draw.text((4, y), text, fill=0, font=font)
  margin = np.asarray(margin, np.uint8)[..., None].repeat(grid.shape[-1], axis=-1)
  return np.concatenate([margin, grid], axis=1)


def interleave_pairs(a, b) -> np.ndarray:
  """[a0, b0, a1, b1, ...]: inputs beside their reconstructions in a grid with even ncols."""
  a, b = np.asarray(a), np.asarray(b)
  return np.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def _save(path: str, grid: np.ndarray, fmt: str, suffix: str, **options) -> None:
  """A HWC uint8 grid (1 or 3 channels) in Pillow's format `fmt`, written atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  with files.replaced(path, suffix) as tmp:
    img.save(tmp, format=fmt, **options)


def save_png(path: str, grid: np.ndarray) -> None:
  """Writes a HWC uint8 grid (1 or 3 channels) to `path` atomically."""
  _save(path, grid, "PNG", ".tmp.png")


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def write_image(path: str, grid: np.ndarray) -> None:
  """A HWC uint8 image as PNG or JPEG (quality 95) by the file's extension, atomically; any
  other extension is refused."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in IMAGE_FORMATS:
    raise UserError(f"{path!r}: unknown image extension {ext or '(none)'!r}: use one of "
                    f"{sorted(IMAGE_FORMATS)}")
  if IMAGE_FORMATS[ext] == "PNG":
    save_png(path, grid)
  else:
    _save(path, grid, "JPEG", ".tmp" + ext, quality=95)
