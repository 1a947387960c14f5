"""Codecs: the space a diffusion stage runs in, as `encode`, `decode` and a `shape`.

  PixelCodec(resolution, channels)   images resized to `resolution` (the pixel-space model and
                                     every stage of a cascade); decode is the identity
  LatentCodec(autoencoder, scale)    the frozen KL autoencoder: z = scale * a posterior sample;
                                     decode(z) = autoencoder.decode(z / scale)

Codecs hold no parameters: `params` is an argument of `encode` / `decode` (the frozen
autoencoder's parameters, or `{}`), so a train step takes them as a constant, never as train
state. Both are frozen dataclasses, hashable, safe to close over inside jit.
"""
import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from ldm_jax.models.autoencoder import AutoencoderKL


def resize(images: jax.Array, size: int) -> jax.Array:
  """NHWC images to size x size: antialiased (triangle filter) when shrinking, bilinear when
  growing; the identity at the same size."""
  if images.shape[1] == size and images.shape[2] == size:
    return images
  shape = (images.shape[0], size, size, images.shape[3])
  return jax.image.resize(images, shape, "linear", antialias=True).astype(images.dtype)


@dataclasses.dataclass(frozen=True)
class PixelCodec:
  """Pixel space at `resolution` x `resolution` x `channels` (images in [-1, 1])."""
  resolution: int
  channels: int
  kind = "pixel"

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.resolution, self.resolution, self.channels)

  def encode(self, params: Any, images: jax.Array, rng: Optional[jax.Array] = None):
    del params, rng
    return resize(images, self.resolution)

  def decode(self, params: Any, z: jax.Array) -> jax.Array:
    del params
    return z


@dataclasses.dataclass(frozen=True)
class LatentCodec:
  """The latent space of a frozen KL autoencoder for images of `image_size`."""
  autoencoder: AutoencoderKL
  scale: float
  image_size: int
  kind = "latent"

  @property
  def shape(self) -> tuple[int, int, int]:
    size = self.image_size // self.autoencoder.downsample_factor
    return (size, size, self.autoencoder.embed_dim)

  def encode(self, params: Any, images: jax.Array, rng: Optional[jax.Array] = None):
    """scale * a posterior sample (the posterior mode when `rng` is None)."""
    post = self.autoencoder.apply({"params": params}, images, method=AutoencoderKL.encode)
    z = post.mode() if rng is None else post.sample(rng)
    return jax.lax.stop_gradient(z) * self.scale

  def decode(self, params: Any, z: jax.Array) -> jax.Array:
    return self.autoencoder.apply({"params": params}, z / self.scale,
                                  method=AutoencoderKL.decode)


def upsample_condition(lowres_images: jax.Array, size: int) -> jax.Array:
  """The low-resolution conditioning of a super-resolution stage at its own size."""
  return resize(jnp.asarray(lowres_images, jnp.float32), size)


def with_scale(codec, scale: float):
  """The same codec with another latent scale (pixel codecs have none)."""
  return dataclasses.replace(codec, scale=float(scale)) if codec.kind == "latent" else codec
