"""LPIPS perceptual distance (Zhang et al., CVPR 2018) in Flax Linen.

This is the `lpips` package's `LPIPS(net='vgg', version='0.1')`, the perceptual term of
CompVis latent-diffusion's `LPIPSWithDiscriminator`:

  1. ScalingLayer: (x - shift) / scale per RGB channel, inputs NHWC in [-1, 1];
  2. torchvision's VGG16 `features` (13 3x3 convs + ReLU, 2x2 max-pools), tapped at relu1_2,
     relu2_2, relu3_3, relu4_3 and relu5_3 (torchvision indices [0:4], [4:9], [9:16], [16:23],
     [23:30]);
  3. per tap: unit-normalise over channels, x / (sqrt(sum x^2) + 1e-10), squared difference,
     1x1 conv `lin` to one channel (no bias), mean over space;
  4. sum over the five taps -> one distance per example, shape [B].

Weights file format: a NumPy `.npz` whose keys are the '/'-joined paths of the Flax params
pytree, e.g. `vgg/conv1_1/kernel` (HWIO, [3, 3, 3, 64]), `vgg/conv1_1/bias` ([64]) ...
`vgg/conv5_3/bias`, and `lin0/kernel` ([1, 1, 64, 1]) ... `lin4/kernel`, all float32.
`python -m ldm_jax.convert.lpips_torch` writes it from the PyTorch weights (see there).

Usage:
  params = load_lpips_params('/path/lpips_vgg.npz')
  d = lpips_distance(params, x, y)           # [B]; = LPIPS().apply({'params': params}, x, y)
  # or: lpips_fn = make_lpips_fn('/path/lpips_vgg.npz'); d = lpips_fn(x, y)
"""
import functools
import os
import zipfile
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import UserError

# (output channels, number of 3x3 convs) for each VGG16 block; one tap at the end of each.
VGG16_BLOCKS: Tuple[Tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
TAP_CHANNELS: Tuple[int, ...] = tuple(c for c, _ in VGG16_BLOCKS)
SHIFT = (-.030, -.088, -.188)
SCALE = (.458, .448, .450)
EPS = 1e-10


def vgg_conv_names() -> Tuple[Tuple[str, ...], ...]:
  """Flax names of the convs per block: (('conv1_1', 'conv1_2'), ..., (..., 'conv5_3'))."""
  return tuple(tuple(f"conv{b}_{i}" for i in range(1, n + 1))
               for b, (_, n) in enumerate(VGG16_BLOCKS, 1))


def param_shapes() -> Dict[str, Tuple[int, ...]]:
  """The '/'-joined key -> shape of every LPIPS parameter (the `.npz` file's contents)."""
  shapes = {}
  c_in = 3
  for (c_out, _), names in zip(VGG16_BLOCKS, vgg_conv_names()):
    for name in names:
      shapes[f"vgg/{name}/kernel"] = (3, 3, c_in, c_out)
      shapes[f"vgg/{name}/bias"] = (c_out,)
      c_in = c_out
  for k, c in enumerate(TAP_CHANNELS):
    shapes[f"lin{k}/kernel"] = (1, 1, c, 1)
  return shapes


def _normalize(f: jax.Array) -> jax.Array:
  """f / (||f||_channels + eps), with a gradient that stays finite where f is all zeros."""
  sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  pos = sq > 0
  norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
  return f / (norm + EPS)


class VGG16Features(nn.Module):
  """torchvision's `vgg16().features[:30]`; returns the five ReLU taps, NHWC."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array):
    taps = []
    for b, ((c_out, _), names) in enumerate(zip(VGG16_BLOCKS, vgg_conv_names())):
      if b > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for name in names:
        x = nn.Conv(c_out, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    param_dtype=jnp.float32, name=name)(x)
        x = nn.relu(x)
      taps.append(x)
    return taps


class LPIPS(nn.Module):
  """LPIPS-VGG v0.1 distance between NHWC images in [-1, 1]; returns float32 [B].

  Attributes:
    dtype: compute dtype of the VGG convs (e.g. jnp.bfloat16). Scaling, feature
      normalisation, the `lin` layers and the averages always run in float32.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape:
      raise UserError(f"LPIPS inputs differ in shape: {x.shape} vs {y.shape}")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise UserError(f"LPIPS wants NHWC images with 1 or 3 channels, got shape {x.shape}")
    vgg = VGG16Features(dtype=self.dtype, name="vgg")

    def features(img):
      img = img.astype(jnp.float32)
      if img.shape[-1] == 1:
        img = jnp.repeat(img, 3, axis=-1)
      img = (img - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)
      return [f.astype(jnp.float32) for f in vgg(img.astype(self.dtype))]

    total = jnp.zeros((x.shape[0],), jnp.float32)
    for k, (fx, fy) in enumerate(zip(features(x), features(y))):
      # Where a pixel's features are equal the distance is exactly 0; fused code may round
      # fx/|fx| - fy/|fy| asymmetrically (FMA), so LPIPS(x, x) would come out ~1e-16.
      same = jnp.all(fx == fy, axis=-1, keepdims=True)
      diff = jnp.where(same, 0.0, jnp.square(_normalize(fx) - _normalize(fy)))
      d = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                  name=f"lin{k}")(diff)
      total = total + jnp.mean(d, axis=(1, 2, 3))
    return total


def flatten_params(params) -> Dict[str, np.ndarray]:
  """Nested params dict -> {'a/b/c': array} (the `.npz` layout)."""
  flat = {}

  def walk(prefix, node):
    if isinstance(node, dict) or hasattr(node, "items"):
      for k, v in node.items():
        walk(f"{prefix}/{k}" if prefix else str(k), v)
    else:
      flat[prefix] = np.asarray(node)

  walk("", params)
  return flat


def unflatten_params(flat: Dict[str, Any]) -> Dict[str, Any]:
  """{'a/b/c': array} -> nested dict."""
  params: Dict[str, Any] = {}
  for key, value in flat.items():
    node = params
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return params


def check_flat_params(flat: Dict[str, Any], source: str) -> None:
  """Raises UserError listing missing/unexpected keys and wrong shapes (source names the file)."""
  want = param_shapes()
  missing = sorted(set(want) - set(flat))
  unexpected = sorted(set(flat) - set(want))
  if missing or unexpected:
    raise UserError(f"LPIPS weights {source}: missing keys {missing}, unexpected keys "
                    f"{unexpected} (convert with python -m ldm_jax.convert.lpips_torch)")
  bad = [f"{k}: {tuple(np.shape(flat[k]))} != {want[k]}" for k in sorted(want)
         if tuple(np.shape(flat[k])) != want[k]]
  if bad:
    raise UserError(f"LPIPS weights {source}: wrong shapes {bad}")


def load_lpips_params(path: str):
  """Reads LPIPS-VGG params from our converted `.npz` (see the module docstring).

  Returns the params pytree (nested dict of float32 jax arrays) for
  `LPIPS().apply({'params': params}, x, y)`. Raises UserError naming the path when the
  file is missing or unreadable, and listing the keys/shapes when they are wrong.
  """
  path = os.fspath(path)
  if not path or not os.path.isfile(path):
    raise UserError(f"LPIPS weights file not found: {path!r} (config.loss.lpips_weights; "
                    f"make it with python -m ldm_jax.convert.lpips_torch)")
  try:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise ValueError("a single array, not an .npz archive")
    with data:
      flat = {k: data[k] for k in data.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise UserError(f"LPIPS weights file {path!r} is not a readable .npz: {e}") from e
  check_flat_params(flat, repr(path))
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), unflatten_params(flat))


def lpips_distance(params, x: jax.Array, y: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """LPIPS(x, y) -> float32 [B] for NHWC images in [-1, 1]; no gradient reaches `params`."""
  return LPIPS(dtype=dtype).apply({"params": jax.lax.stop_gradient(params)}, x, y)


def make_lpips_fn(params_path: str, dtype: Any = jnp.float32
                  ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Loads the weights once; returns `fn(x, y) -> [B]` (NHWC in [-1, 1]), usable inside jit.

  Gradients flow to `x` and `y` only. The params are closed over, so a jitted function that
  calls `fn` embeds them as constants (about 59 MB of HLO for VGG16); where that matters,
  pass `load_lpips_params(path)` as an argument and call `lpips_distance(params, x, y)`.
  """
  return functools.partial(lpips_distance, load_lpips_params(params_path), dtype=dtype)
