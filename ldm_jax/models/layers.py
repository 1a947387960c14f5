"""Building blocks shared by the autoencoder, the diffusion UNet and the cascade.

All modules take NHWC inputs, keep float32 parameters and compute in `dtype` (bfloat16 on
accelerators when configured). Normalisation statistics are always computed in float32.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import norm as norm_lib
from ldm_jax.models.attention import attention

Dtype = Any


class GroupNorm(nn.Module):
  """GroupNorm over channels-last inputs, with the per-sample `mul`/`add` and SiLU that follow
  it in ResBlocks fused in (`norm.group_norm`: a hand-written gradient). Parameters as Flax's
  nn.GroupNorm ('scale' [C] ones, 'bias' [C] zeros), so checkpoints and converters are the
  same; statistics in float32, the output in `dtype`."""
  num_groups: int
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mul=None, add=None, silu: bool = False):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return norm_lib.group_norm(x, scale, bias, groups=self.num_groups, eps=self.epsilon,
                               mul=mul, add=add, silu=silu, dtype=self.dtype)


def group_norm_layer(channels: int, num_groups: int = 32, name: Optional[str] = None,
               dtype: Dtype = jnp.float32, eps: float = 1e-6) -> GroupNorm:
  """GroupNorm (eps=1e-6 as in LDM's autoencoder and transformers; LDM's UNet ResBlocks and
  diffusers' UNets use 1e-5); falls back to fewer groups for narrow layers."""
  groups = min(num_groups, channels)
  while channels % groups:
    groups -= 1
  return GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


def _use_window_matmul(inputs, kernel, padding, lhs_dilation, rhs_dilation, groups) -> bool:
  """True where `window_matmul_conv` replaces XLA's convolution: on CPU only, for NHWC
  inputs whose whole image is no larger than the kernel window (H * W <= kh * kw, e.g. a 3x3
  conv at 2x2), where it also does fewer multiplications than the convolution."""
  if jax.default_backend() != "cpu" or groups != 1 or isinstance(padding, str):
    return False
  if any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())):
    return False
  window = kernel.shape[0] * kernel.shape[1]
  return inputs.ndim == 4 and inputs.shape[1] * inputs.shape[2] <= window


def window_matmul_conv(inputs: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
  """`lax.conv_general_dilated` (NHWC, HWIO, explicit padding) as ONE matmul over the whole
  image: out[b, (ho, wo, o)] = x[b, (hi, wi, c)] @ W[(hi, wi, c), (ho, wo, o)] with
  W = kernel[hi - ho * stride + pad_lo, wi - wo * stride + pad_lo] (zero outside the kernel).

  Written by hand because no library lowers small-image convolutions this way: XLA:CPU (jaxlib
  0.10) runs a 3x3 convolution at 2x2 (batch 128, 256 -> 128 channels) at about 9 GFLOP/s
  against 270 for this matmul (measured 2026-12-01, docs/BENCHMARKS.md, issue 10). Cost:
  H*W*Ho*Wo*C*O multiply-adds against Ho*Wo*kh*kw*C*O for the convolution.
  """
  b, hgt, wid, c = inputs.shape
  kh, kw, _, o = kernel.shape
  (plo_h, phi_h), (plo_w, phi_w) = padding
  ho = (hgt + plo_h + phi_h - kh) // strides[0] + 1
  wo = (wid + plo_w + phi_w - kw) // strides[1] + 1

  def taps(size, out, stride, lo, k):  # tap index + 1 per (input, output); 0 or k + 1: zero
    tap = np.arange(size)[:, None] - np.arange(out)[None, :] * stride + lo
    return np.where((tap >= 0) & (tap < k), tap + 1, 0)

  padded = jnp.pad(kernel, ((1, 1), (1, 1), (0, 0), (0, 0)))
  th, tw = taps(hgt, ho, strides[0], plo_h, kh), taps(wid, wo, strides[1], plo_w, kw)
  w = padded[th[:, None, :, None], tw[None, :, None, :]]  # [H, W, Ho, Wo, C, O]
  w = jnp.transpose(w, (0, 1, 4, 2, 3, 5)).reshape(hgt * wid * c, ho * wo * o)
  return (inputs.reshape(b, hgt * wid * c) @ w).reshape(b, ho, wo, o)


def _conv_general_dilated(inputs, kernel, window_strides, padding, lhs_dilation=None,
                          rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                          precision=None, **kwargs):
  """`lax.conv_general_dilated` for `nn.Conv`, with `window_matmul_conv` where it is faster."""
  if _use_window_matmul(inputs, kernel, padding, lhs_dilation, rhs_dilation,
                        feature_group_count) and not kwargs:
    expected = jax.lax.conv_dimension_numbers(inputs.shape, kernel.shape,
                                              ("NHWC", "HWIO", "NHWC"))
    if dimension_numbers == expected:
      return window_matmul_conv(inputs, kernel, tuple(window_strides), tuple(padding))
  return jax.lax.conv_general_dilated(
      inputs, kernel, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)


def conv(features: int, kernel: int = 3, stride: int = 1, name: Optional[str] = None,
         dtype: Dtype = jnp.float32, padding: Any = None) -> nn.Conv:
  """A square 'same' convolution (torch-style symmetric padding k // 2). On CPU an image no
  larger than the kernel window is convolved by `window_matmul_conv` (same parameters)."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, name=name, conv_general_dilated=_conv_general_dilated)


class Downsample(nn.Module):
  """Halves H and W: a stride-2 3x3 conv, or avg-pool.

  The conv pads (0, 1) (LDM's autoencoder, diffusers' VAE) or, with `symmetric_padding`,
  (1, 1) (LDM's `openaimodel` UNet, diffusers' UNets): the two sample different pixels.
  """
  channels: int
  with_conv: bool = True
  dtype: Dtype = jnp.float32
  symmetric_padding: bool = False

  @nn.compact
  def __call__(self, x):
    if self.with_conv:
      pad = (1, 1) if self.symmetric_padding else (0, 1)
      return conv(self.channels, 3, 2, padding=(pad, pad), dtype=self.dtype, name="conv")(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
  """Doubles H and W by nearest-neighbour repetition, then an optional 3x3 conv."""
  channels: int
  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = conv(self.channels, 3, dtype=self.dtype, name="conv")(x)
    return x


class ResBlock(nn.Module):
  """GroupNorm-SiLU-Conv residual block with an optional embedding (timestep, class).

  With `scale_shift_norm` the embedding produces (scale, shift) applied after the second
  norm (as in the ADM / LDM UNet); otherwise it is added to the hidden state. `eps` is the
  GroupNorm epsilon (1e-5 in LDM's UNet and diffusers' UNets).
  """
  out_channels: int
  dropout: float = 0.0
  scale_shift_norm: bool = False
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x, emb=None, *, train: bool = False):
    in_ch = x.shape[-1]
    h = group_norm_layer(in_ch, self.num_groups, "norm1", self.dtype, self.eps)(x, silu=True)
    h = conv(self.out_channels, 3, dtype=self.dtype, name="conv1")(h)
    if emb is not None:
      e = nn.Dense(self.out_channels * (2 if self.scale_shift_norm else 1), dtype=self.dtype,
                   name="emb_proj")(nn.silu(emb))
    norm2 = group_norm_layer(self.out_channels, self.num_groups, "norm2", self.dtype, self.eps)
    if emb is not None and self.scale_shift_norm:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = norm2(h, mul=1 + scale, add=shift, silu=True)
    else:
      if emb is not None:
        h = h + e[:, None, None, :]
      h = norm2(h, silu=True)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.out_channels, 3, dtype=self.dtype, name="conv2")(h)
    if in_ch != self.out_channels:
      x = conv(self.out_channels, 1, dtype=self.dtype, name="skip")(x)
    return x + h


class SpatialSelfAttention(nn.Module):
  """Multi-head self-attention over the H*W positions, with a residual connection.

  Uses `attention.attention` (cuDNN's fused kernel on GPU, query-chunked on CPU when large).
  Give either `num_heads` or `head_channels` (the other is derived).
  """
  num_heads: int = 1
  head_channels: int = -1
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    heads = c // self.head_channels if self.head_channels > 0 else self.num_heads
    if c % heads:
      raise ValueError(f"attention channels {c} not divisible by {heads} heads")
    h = group_norm_layer(c, self.num_groups, "norm", self.dtype, self.eps)(x)
    h = h.reshape(b, hgt * wid, c)
    qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(h)
    q, k, v = (t.reshape(b, hgt * wid, heads, c // heads) for t in jnp.split(qkv, 3, axis=-1))
    out = attention(q, k, v).reshape(b, hgt * wid, c)
    out = nn.Dense(c, dtype=self.dtype, name="proj_out")(out)
    return x + out.reshape(b, hgt, wid, c)


# --- Diffusion UNet pieces: timestep embedding and the cross-attention transformer. ---


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0,
                       flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, float32 [B, dim].

  Frequencies are exp(-log(max_period) * i / (half - freq_shift)) for i < half = dim // 2:
  `freq_shift=0` is LDM's `timestep_embedding` (diffusers' `downscale_freq_shift`, 1 in
  some diffusers models). `flip_sin_to_cos=True` gives LDM's [cos, sin] order, False gives
  [sin, cos]. An odd `dim` is zero-padded.
  """
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) /
                  (half - freq_shift))
  args = jnp.asarray(t, jnp.float32).reshape(-1)[:, None] * freqs[None]
  parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
  emb = jnp.concatenate(parts, axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class CrossAttention(nn.Module):
  """Multi-head attention from a query sequence x [B, T, C] to `context` [B, S, D].

  With `context=None` it is self-attention over x (as LDM's `CrossAttention`). `mask` is an
  optional boolean key mask [B, S]: False keys get no attention weight. q/k/v projections
  have no bias (as in LDM); the output projection maps back to C.
  """
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, mask=None):
    context = x if context is None else context.astype(self.dtype)
    inner = self.num_heads * self.head_dim

    def project(name, inputs):  # [B, N, D] -> [B, N, heads, head_dim]
      y = nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(inputs)
      return y.reshape(y.shape[:2] + (self.num_heads, self.head_dim))

    q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
    if mask is not None:
      mask = jnp.asarray(mask, bool)[:, None, None, :]  # [B, heads, T, S] by broadcasting
    out = attention(q, k, v, mask=mask).reshape(x.shape[:2] + (inner,))
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out")(out)


class GEGLUFeedForward(nn.Module):
  """LDM's gated feed-forward: Dense(2 * mult * C) -> x * gelu(gate) -> Dense(C)."""
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h, gate = jnp.split(nn.Dense(2 * self.mult * c, dtype=self.dtype, name="proj_in")(x), 2, -1)
    h = h * nn.gelu(gate, approximate=False)
    return nn.Dense(c, dtype=self.dtype, name="proj_out")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm block: self-attention, cross-attention to `context`, GEGLU feed-forward.

  Without a context the second attention is self-attention too (LDM's behaviour).
  """
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, context_mask=None):
    def norm(name):
      return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)

    def attn(name):
      return CrossAttention(self.num_heads, self.head_dim, dtype=self.dtype, name=name)

    x = x + attn("attn1")(norm("norm1")(x))
    x = x + attn("attn2")(norm("norm2")(x), context, None if context is None else context_mask)
    return x + GEGLUFeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))


class SpatialTransformer(nn.Module):
  """LDM's SpatialTransformer: GroupNorm, 1x1 proj_in to heads * head_dim channels,
  `depth` BasicTransformerBlocks over the H*W positions, zero-initialised 1x1 proj_out,
  residual. The block is the identity at initialisation (as LDM's `zero_module`).
  """
  num_heads: int
  head_dim: int
  depth: int = 1
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, context_mask=None):
    b, hgt, wid, c = x.shape
    h = group_norm_layer(c, self.num_groups, "norm", self.dtype)(x)
    h = nn.Dense(self.num_heads * self.head_dim, dtype=self.dtype, name="proj_in")(h)
    h = h.reshape(b, hgt * wid, h.shape[-1])
    for i in range(self.depth):
      h = BasicTransformerBlock(self.num_heads, self.head_dim, self.dtype,
                                name=f"block{i}")(h, context, context_mask)
    h = nn.Dense(c, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="proj_out")(h)
    return x + h.reshape(b, hgt, wid, c)
