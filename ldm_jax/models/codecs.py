"""Codecs: the space a diffusion stage runs in, as `encode`, `decode` and a `shape`.

  PixelCodec(resolution, channels)   images resized to `resolution` (the pixel-space model and
                                     every stage of a cascade); decode is the identity
  LatentCodec(autoencoder, scale)    the frozen KL autoencoder: z = scale * a posterior sample;
                                     decode(z) = autoencoder.decode(z / scale); the posterior
                                     is also available as its `moments` (what the stage-2
                                     latent cache stores) and `from_moments` samples from them

Codecs hold no parameters: `params` is an argument of `encode` / `decode` (the frozen
autoencoder's parameters, or `{}`), so a train step takes them as a constant, never as train
state. Both are frozen dataclasses, hashable, safe to close over inside jit.
"""
import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from ldm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian


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
    moments = self.moments(params, images)
    noise = None if rng is None else jax.random.normal(rng, moments.shape[:-1] + self.shape[-1:])
    return self.from_moments(moments, noise)

  def moments(self, params: Any, images: jax.Array) -> jax.Array:
    """The posterior q(z | images) as float32 [B, h, w, 2c]: its mean and (clipped)
    log-variance concatenated on the channel axis, unscaled, without gradient."""
    post = self.autoencoder.apply({"params": params}, images, method=AutoencoderKL.encode)
    return jax.lax.stop_gradient(jnp.concatenate([post.mean, post.logvar], axis=-1))

  def from_moments(self, moments: jax.Array, noise: Optional[jax.Array] = None) -> jax.Array:
    """scale * (mean + std * noise) of the posterior given by `moments` (as from `moments`,
    any float dtype); the scaled mean when `noise` is None."""
    post = DiagonalGaussian.from_moments(moments)
    z = post.mode() if noise is None else post.mean + post.std * noise
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
