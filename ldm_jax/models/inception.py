"""Inception-v3 up to its 2048-d pool3 features: the network FID and KID are defined on.

`InceptionV3()` is the variant of TensorFlow's FID code (the 2015-12-05 graph that pytorch-fid
ports as `FIDInceptionV3`): its average pools ignore padded zeros (`count_include_pad=False`)
and the last block pools by max instead of average. `InceptionV3(fid_variant=False)` is
torchvision's `inception_v3` architecture. Module names are torchvision's (`Mixed_5b`,
`branch7x7dbl_3`, ...) so a state dict maps over name by name (ldm_jax/convert/inception.py).

`fid_input` prepares images as pytorch-fid does: bilinear resize to 299x299 (no antialiasing,
half-pixel centres, like `F.interpolate(..., align_corners=False)`), values in [-1, 1];
grayscale images are repeated to three channels.
"""
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

FID_SIZE = 299
FEATURES = 2048


def fid_input(images: jax.Array) -> jax.Array:
  """NHWC images in [-1, 1] (1 or 3 channels, any size) -> [B, 299, 299, 3] in [-1, 1].

  pytorch-fid resizes images in [0, 1] and then maps them to [-1, 1]; bilinear resizing is a
  convex combination, so resizing in [-1, 1] is the same map.
  """
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (FID_SIZE, FID_SIZE):
    x = jax.image.resize(x, (x.shape[0], FID_SIZE, FID_SIZE, 3), "bilinear", antialias=False)
  return x


def _pad(p: Tuple[int, int]):
  return ((p[0], p[0]), (p[1], p[1]))


class BasicConv(nn.Module):
  """Convolution without bias, batch norm (inference statistics, eps 1e-3), ReLU."""
  features: int
  kernel: Tuple[int, int]
  strides: int = 1
  padding: Tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, (self.strides, self.strides),
                padding=_pad(self.padding), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool3(x, include_pad: bool):
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=include_pad)


def _max_pool3(x, strides: int = 2, padding: int = 0):
  return nn.max_pool(x, (3, 3), (strides, strides), padding=((padding, padding),) * 2)


class InceptionA(nn.Module):
  pool_features: int
  fid_variant: bool = True

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = _avg_pool3(x, include_pad=not self.fid_variant)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(bp)
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool3(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  fid_variant: bool = True

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = _avg_pool3(x, include_pad=not self.fid_variant)
    bp = BasicConv(192, (1, 1), name="branch_pool")(bp)
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool3(x)], axis=-1)


class InceptionE(nn.Module):
  """`pool`: 'avg' (torchvision; FID's Mixed_7b, without padded zeros) or 'max' (FID's
  Mixed_7c)."""
  pool: str = "avg"
  include_pad: bool = True

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "max":
      bp = _max_pool3(x, strides=1, padding=1)
    else:
      bp = _avg_pool3(x, include_pad=self.include_pad)
    bp = BasicConv(192, (1, 1), name="branch_pool")(bp)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """Inception-v3 from images (NHWC, [-1, 1], at least 75x75; 299x299 for FID) to the
  [B, 2048] average-pooled features before the classifier."""
  fid_variant: bool = True

  @nn.compact
  def __call__(self, x):
    fid = self.fid_variant
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool3(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool3(x)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, fid, name=name)(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, fid, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", include_pad=not fid, name="Mixed_7b")(x)
    x = InceptionE("max" if fid else "avg", include_pad=True, name="Mixed_7c")(x)
    return x.mean(axis=(1, 2))


def abstract_variables(fid_variant: bool = True) -> dict:
  """{'params', 'batch_stats'} of InceptionV3 as ShapeDtypeStructs (no computation)."""
  model = InceptionV3(fid_variant)
  return jax.eval_shape(model.init, jax.random.key(0),
                        jnp.zeros((1, FID_SIZE, FID_SIZE, 3), jnp.float32))

