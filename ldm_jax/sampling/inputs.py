"""What a user gives the sampler besides a seed: init images and masks (image-to-image and
inpainting) and files of prompts or labels, checked and brought to the shapes the pipeline
runs on. Array functions are pure numpy; the `read_*` functions read files.

Conventions (the diffusers ones):
  images   NHWC (or HWC): uint8 in [0, 255], or float in [-1, 1]
  masks    HW, NHW or NHW1: uint8 in [0, 255] or float / bool in [0, 1]; WHITE (1) = repaint,
           black (0) = keep; brought to the latent resolution by nearest sampling (the
           centre pixel of each f x f block, as Pillow's NEAREST resize does)
"""
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ldm_jax.data.images import load_image
from ldm_jax.diffusion import samplers
from ldm_jax.errors import UserError

# ITU-R 601-2 luma (Pillow's convert('L')), for RGB files given to a gray model.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def as_images(images, size: int, channels: int, name: str = "init_image") -> np.ndarray:
  """float32 [B, size, size, channels] in [-1, 1] from uint8 / float NHWC or HWC images."""
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[1:] != (size, size, channels):
    raise UserError(f"{name} of shape {tuple(np.shape(images))}: expected [N, {size}, {size}, "
                    f"{channels}] (or one [{size}, {size}, {channels}] image)")
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 127.5 - 1.0
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)) or x.min() < -1.0 - 1e-6 or x.max() > 1.0 + 1e-6:
    raise UserError(f"{name}: float images must lie in [-1, 1] (uint8 images: [0, 255])")
  return x


def latent_mask(mask, image_size: int, latent_size: int) -> np.ndarray:
  """float32 [B, latent_size, latent_size, 1] in [0, 1] (1: repaint) from a mask at the image
  or the latent resolution."""
  m = np.asarray(mask)
  shape = tuple(m.shape)
  if m.ndim == 4 and m.shape[-1] == 1:
    m = m[..., 0]
  elif m.ndim == 2:
    m = m[None]
  if m.ndim != 3 or m.shape[1] != m.shape[2] or m.shape[1] not in (image_size, latent_size):
    raise UserError(f"mask of shape {shape}: expected [H, W], [N, H, W] or [N, H, W, 1] with "
                    f"H = W = {image_size} (image) or {latent_size} (latent resolution)")
  m = m.astype(np.float32) / 255.0 if m.dtype == np.uint8 else m.astype(np.float32)
  if not np.all(np.isfinite(m)) or m.min() < 0.0 or m.max() > 1.0:
    raise UserError("mask values must lie in [0, 1] (uint8 masks: [0, 255]); white = repaint")
  if m.shape[1] != latent_size:
    f = image_size // latent_size
    m = m[:, f // 2::f, f // 2::f]
  return m[..., None]


def init_arrays(num_samples: int, steps: int, init_image, init_latents, strength, mask, *,
                image_size: int, channels: int, latent_shape: tuple):
  """Image-to-image's and inpainting's inputs of a `steps`-step call: (the init arrays the
  sampler takes, {'images' or 'latents', optionally 'mask'}, or None; the first step to run)."""
  if init_image is None and init_latents is None:
    if mask is not None or strength is not None:
      raise UserError(f"{'mask' if mask is not None else 'strength'} needs an init_image "
                      "(or init_latents) to start from")
    return None, 0
  if init_image is not None and init_latents is not None:
    raise UserError("give init_image or init_latents, not both")
  init = {}
  if init_image is not None:
    init["images"] = as_images(init_image, image_size, channels)
    n = len(init["images"])
  else:
    z = np.asarray(init_latents, np.float32)
    z = z[None] if z.ndim == len(latent_shape) else z
    if z.shape[1:] != latent_shape:
      raise UserError(f"init_latents of shape {np.shape(init_latents)}: expected [N, "
                      f"{', '.join(map(str, latent_shape))}]")
    init["latents"], n = z, len(z)
  if n not in (1, num_samples):
    raise UserError(f"{n} init images for {num_samples} samples: give 1 or {num_samples}")
  if mask is not None:
    m = latent_mask(mask, image_size, latent_shape[0])
    if len(m) not in (1, num_samples):
      raise UserError(f"{len(m)} masks for {num_samples} samples: give 1 or {num_samples}")
    init["mask"] = m
  try:
    start = samplers.strength_start_step(steps, 0.8 if strength is None else float(strength))
  except ValueError as e:
    raise UserError(str(e)) from e
  return jax.tree.map(jnp.asarray, init), start


def _to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
  """uint8 [H, W, 1 | 3] -> uint8 [H, W, channels] (gray repeated, or RGB to luma)."""
  if pixels.shape[-1] == channels:
    return pixels
  if channels == 3:
    return np.repeat(pixels, 3, axis=-1)
  if channels == 1:
    return np.round(pixels.astype(np.float32) @ _LUMA)[..., None].astype(np.uint8)
  raise UserError(f"images with {channels} channels cannot be read from image files")


def _resized(pixels: np.ndarray, size: int, resample) -> np.ndarray:
  if pixels.shape[:2] == (size, size):
    return pixels
  img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
  out = np.asarray(img.resize((size, size), resample=resample))
  return out[..., None] if out.ndim == 2 else out


def read_image(path: str, size: int, channels: int) -> np.ndarray:
  """An image file as uint8 [size, size, channels]: resized (Lanczos, the aspect ratio not
  kept) to the model's image size."""
  return _resized(_to_channels(load_image(path), channels), size, Image.LANCZOS)


def read_mask(path: str, size: int) -> np.ndarray:
  """A mask file as uint8 [size, size] (its luma; white = repaint), resized (nearest)."""
  return _resized(_to_channels(load_image(path), 1), size, Image.NEAREST)[..., 0]


def parse_conditions(lines: Sequence[str], cond_kind: str, class_names: Sequence[str] = (),
                     source: str = "prompts file") -> list:
  """Non-empty lines as conditions: prompts for text models; class labels (integers, or class
  names, case-insensitive) for class-conditional ones."""
  entries = [(i + 1, line.strip()) for i, line in enumerate(lines) if line.strip()]
  if not entries:
    raise UserError(f"{source} holds no prompt (one per line)")
  if cond_kind in ("text", "clip"):
    return [text for _, text in entries]
  if cond_kind != "class":
    raise UserError(f"{source}: this model is unconditional (no prompts or labels)")
  names = {n.lower(): i for i, n in enumerate(class_names)}
  labels = []
  for number, text in entries:
    if text.lstrip("-").isdigit():
      labels.append(int(text))
    elif text.lower() in names:
      labels.append(names[text.lower()])
    else:
      raise UserError(f"{source} line {number}: {text!r} is neither a label nor a class name "
                      f"({', '.join(class_names) or 'the model has no class names'})")
  return labels


def read_conditions(path: str, cond_kind: str, class_names: Sequence[str] = ()) -> list:
  """`parse_conditions` of a UTF-8 text file, one prompt (or label) per line."""
  if not os.path.isfile(path):
    raise UserError(f"prompts file {path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    return parse_conditions(f.read().splitlines(), cond_kind, class_names, path)
