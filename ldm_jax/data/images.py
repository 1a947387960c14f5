"""One image file of any mode Pillow opens -> the uint8 pixels the pipeline reads.

Gray modes give uint8 [H, W, 1], all others [H, W, 3]:

  1, L                   as is (1 -> 0 or 255)
  I;16, I;16B, I;16L     16-bit gray scaled (not clipped) to 8 bits: round(v / 257), 65535 -> 255
  I                      32-bit integers, read as 16-bit data (Pillow's mode for 16-bit files from
                         some writers) and scaled likewise; values outside [0, 65535] are refused
  F                      32-bit floats, read as [0, 1] (the common float convention): round(255 v);
                         values outside [0, 1] or not finite are refused
  P, RGB, CMYK, YCbCr    Pillow's conversion to RGB (CMYK without ICC profiles:
                         R = (255 - C)(255 - K) / 255)
  with transparency      LA, RGBA, PA, and P, L or RGB with a `transparency` key (PNG tRNS, GIF):
                         composited over white, round(a c + (1 - a) 255) with alpha a in [0, 1],
                         so hidden pixels do not leak their arbitrary colour (gray stays gray)

A file with several frames (GIF, APNG, TIFF) gives its first frame. Every failure is a
`UserError` of one line naming the file.
"""
import os

import numpy as np
from PIL import Image

from ldm_jax.errors import UserError

_SIXTEEN_BIT = ('I;16', 'I;16B', 'I;16L', 'I;16N')
_GRAY = ('1', 'L', 'LA', 'La')
BACKGROUND = 255  # White, behind transparent pixels.


def load_image(path: str | os.PathLike) -> np.ndarray:
  """Decodes the file at `path` (see the module docstring for what each mode becomes)."""
  try:
    with Image.open(path) as image:
      return pixels_of(image)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    # SyntaxError: what some of Pillow's plugins raise on a malformed header.
    raise UserError(f'Cannot decode image {os.fspath(path)}: {_one_line(e)}') from e


def pixels_of(image: Image.Image) -> np.ndarray:
  """The pixels of a Pillow image as uint8 [H, W, 1] (gray modes) or [H, W, 3].

  Raises ValueError for values outside a mode's documented range (I, F).
  """
  mode = image.mode
  if mode in _SIXTEEN_BIT or mode == 'I':
    values = np.asarray(image)
    if mode == 'I' and values.size and (values.min() < 0 or values.max() > 65535):
      raise ValueError(f'32-bit integer pixels span [{values.min()}, {values.max()}], outside '
                       'the 16-bit range [0, 65535] this mode is read as')
    return _rounded(values.astype(np.float64) / 257)[..., None]
  if mode == 'F':
    values = np.asarray(image, np.float64)
    if values.size and not (np.isfinite(values).all() and values.min() >= 0
                            and values.max() <= 1):
      raise ValueError(f'float pixels span [{values.min()}, {values.max()}], outside the '
                       '[0, 1] range this mode is read as')
    return _rounded(values * 255)[..., None]
  gray = mode in _GRAY
  if image.has_transparency_data:
    pixels = np.asarray(image.convert('LA' if gray else 'RGBA'), np.float64)
    alpha = pixels[..., -1:] / 255
    return _rounded(pixels[..., :-1] * alpha + BACKGROUND * (1 - alpha))
  pixels = np.asarray(image.convert('L' if gray else 'RGB'))
  return pixels[..., None] if pixels.ndim == 2 else pixels


def _rounded(values: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _one_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__
