"""KL-regularised autoencoder (the first stage of a latent diffusion model).

Encoder and decoder follow LDM's `AutoencoderKL`: ResBlocks with GroupNorm per level, a
mid-level self-attention block, and downsampling factor f = 2 ** (len(ch_mult) - 1).
`encode` returns a diagonal Gaussian posterior; `decode` maps a latent back to pixels.
"""
import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.errors import UserError
from ldm_jax.models import layers

Dtype = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
  """q(z|x) = N(mean, exp(logvar)) with per-element parameters (NHWC)."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) summed over all non-batch axes, shape [B]."""
    kl = 0.5 * (jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
    return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))


class Encoder(nn.Module):
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  out_channels: int
  attn_levels: Sequence[int] = ()
  mid_attention: bool = True
  dropout: float = 0.0
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    kw = dict(num_groups=self.num_groups, dtype=self.dtype)
    h = layers.conv(self.ch, 3, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = layers.ResBlock(self.ch * mult, self.dropout, name=f"down{level}_res{i}", **kw)(
            h, train=train)
        if level in self.attn_levels:
          h = layers.SpatialSelfAttention(name=f"down{level}_attn{i}", **kw)(h)
      if level != len(self.ch_mult) - 1:
        h = layers.Downsample(h.shape[-1], dtype=self.dtype, name=f"down{level}_downsample")(h)
    h = layers.ResBlock(h.shape[-1], self.dropout, name="mid_res0", **kw)(h, train=train)
    if self.mid_attention:
      h = layers.SpatialSelfAttention(name="mid_attn", **kw)(h)
    h = layers.ResBlock(h.shape[-1], self.dropout, name="mid_res1", **kw)(h, train=train)
    h = layers.group_norm_layer(h.shape[-1], self.num_groups, "norm_out", self.dtype)(h, silu=True)
    return layers.conv(self.out_channels, 3, dtype=self.dtype, name="conv_out")(h)


class Decoder(nn.Module):
  """Mirror of the encoder. `features` stops before `conv_out` (the 'last layer' that the
  adaptive GAN weight differentiates against), `head` applies it."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  out_channels: int
  attn_levels: Sequence[int] = ()
  mid_attention: bool = True
  dropout: float = 0.0
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(num_groups=self.num_groups, dtype=self.dtype)
    top = self.ch * self.ch_mult[-1]
    self.conv_in = layers.conv(top, 3, dtype=self.dtype)
    self.mid_res0 = layers.ResBlock(top, self.dropout, **kw)
    self.mid_attn = layers.SpatialSelfAttention(**kw) if self.mid_attention else None
    self.mid_res1 = layers.ResBlock(top, self.dropout, **kw)
    ups = []
    for level in reversed(range(len(self.ch_mult))):
      out = self.ch * self.ch_mult[level]
      blocks = [layers.ResBlock(out, self.dropout, name=f"up{level}_res{i}", **kw)
                for i in range(self.num_res_blocks + 1)]
      attn = [layers.SpatialSelfAttention(name=f"up{level}_attn{i}", **kw)
              if level in self.attn_levels else None for i in range(self.num_res_blocks + 1)]
      up = (layers.Upsample(out, dtype=self.dtype, name=f"up{level}_upsample")
            if level != 0 else None)
      ups.append((blocks, attn, up))
    self.ups = ups
    self.norm_out = layers.group_norm_layer(self.ch * self.ch_mult[0], self.num_groups,
                                      dtype=self.dtype)
    self.conv_out = layers.conv(self.out_channels, 3, dtype=self.dtype)

  def features(self, z, *, train: bool = False):
    h = self.conv_in(z.astype(self.dtype))
    h = self.mid_res0(h, train=train)
    if self.mid_attn is not None:
      h = self.mid_attn(h)
    h = self.mid_res1(h, train=train)
    for blocks, attn, up in self.ups:
      for block, att in zip(blocks, attn):
        h = block(h, train=train)
        if att is not None:
          h = att(h)
      if up is not None:
        h = up(h)
    return self.norm_out(h, silu=True)

  def head(self, h):
    return self.conv_out(h).astype(jnp.float32)

  def __call__(self, z, *, train: bool = False):
    return self.head(self.features(z, train=train))


class AutoencoderKL(nn.Module):
  """x (NHWC, [-1, 1]) -> DiagonalGaussian over z (H/f, W/f, embed_dim) -> x_hat."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  in_channels: int = 3
  z_channels: int = 4
  embed_dim: int = 4
  attn_levels: Sequence[int] = ()
  mid_attention: bool = True
  dropout: float = 0.0
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  # False drops quant_conv and post_quant_conv (diffusers' use_quant_conv=False): the
  # encoder's moments are the posterior and z feeds the decoder directly (embed_dim must
  # then equal z_channels).
  quant_conv: bool = True

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def setup(self):
    kw = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
              attn_levels=tuple(self.attn_levels), mid_attention=self.mid_attention,
              dropout=self.dropout, num_groups=self.num_groups, dtype=self.dtype)
    self.encoder = Encoder(out_channels=2 * self.z_channels, **kw)
    self.decoder = Decoder(out_channels=self.in_channels, **kw)
    if self.quant_conv:
      self.quant = layers.conv(2 * self.embed_dim, 1, dtype=self.dtype, name="quant_conv")
      self.post_quant = layers.conv(self.z_channels, 1, dtype=self.dtype,
                                    name="post_quant_conv")
    elif self.embed_dim != self.z_channels:
      raise UserError(f"AutoencoderKL: quant_conv=False needs embed_dim ({self.embed_dim}) == "
                      f"z_channels ({self.z_channels})")

  def encode(self, x, *, train: bool = False) -> DiagonalGaussian:
    moments = self.encoder(x, train=train)
    return DiagonalGaussian.from_moments(self.quant(moments) if self.quant_conv else moments)

  def decode_features(self, z, *, train: bool = False):
    z = z.astype(self.dtype)
    return self.decoder.features(self.post_quant(z) if self.quant_conv else z, train=train)

  def decode_head(self, h):
    return self.decoder.head(h)

  def decode(self, z, *, train: bool = False):
    return self.decode_head(self.decode_features(z, train=train))

  def __call__(self, x, rng=None, *, train: bool = False):
    """Reconstructs x from a posterior sample (or its mode when rng is None)."""
    posterior = self.encode(x, train=train)
    z = posterior.sample(rng) if rng is not None else posterior.mode()
    return self.decode(z, train=train), posterior
