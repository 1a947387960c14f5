"""The latent diffusion UNet (LDM's `openaimodel.UNetModel`), NHWC.

Layout, for `channel_mult` of length n (level i works at resolution /2^i):

  conv_in -> for each level: `num_res_blocks` x [ResBlock (+ attention if i in
  attention_levels)], then Downsample (not after the last level)
  -> middle: ResBlock, attention, ResBlock (attention unless `mid_attention=False`)
  -> for each level, deepest first: `num_res_blocks + 1` x [concat skip, ResBlock
  (+ attention)], then Upsample (not after level 0)
  -> GroupNorm, SiLU, zero-initialised conv_out.

Conditioning:
  * timestep: sinusoidal(model_channels) -> Dense(4 mc) -> SiLU -> Dense(4 mc), fed to every
    ResBlock (added, or as scale/shift with `scale_shift_norm`).
  * class labels (`num_classes > 0`): an embedding table with `num_classes + 1` rows added to
    the timestep embedding. Row `num_classes` (`UNet.null_label`) is the null label for
    classifier-free guidance; `labels=None` means "all null".
  * cross-attention (`use_transformer=True`, `context_dim` set): SpatialTransformers attend
    to `context` [B, S, context_dim] with an optional boolean key mask [B, S]. With
    `use_transformer=True` and `context_dim=None` the second attention of each transformer
    block is self-attention (LDM's behaviour without context).
  * concatenation conditioning (LDM's `concat` key, e.g. inpainting masks or low-res images
    for super-resolution) is done by the caller: the UNet accepts whatever number of
    channels `x` has, so concatenate the conditioning onto x along the channel axis.
  * noise-conditioning augmentation level (`aug_embedding=True`; Cascaded Diffusion Models,
    Imagen): the timestep at which the low-resolution conditioning was noised, embedded like
    the timestep (own sinusoidal features and MLP) and added to the timestep embedding.

Initialisation follows LDM where `layers` allows it: the final conv and the transformers'
`proj_out` are zero-initialised, so a fresh UNet outputs exactly zero. `layers.ResBlock`
(conv2) and `layers.SpatialSelfAttention` (proj_out) have no kernel_init option and keep
Flax's default init (LDM zero-inits both).
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.errors import UserError
from ldm_jax.models import layers

Dtype = Any


class UNet(nn.Module):
  """Noise-prediction UNet. Parameters are float32; activations are computed in `dtype`.

  Attributes:
    model_channels: base width (level i has model_channels * channel_mult[i] channels).
    out_channels: channels of the output (e.g. the latent channels for eps-prediction).
    num_res_blocks: ResBlocks per level on the way down (one more per level on the way up).
    channel_mult: width multiplier per level.
    attention_levels: levels (0 = full resolution) that get attention after each ResBlock.
    num_heads: attention heads, used when `num_head_channels <= 0`.
    num_head_channels: if > 0, channels per head (heads = channels // num_head_channels).
    dropout: dropout rate inside the ResBlocks (active with `train=True`, rng "dropout").
    scale_shift_norm: FiLM-like (scale, shift) timestep conditioning in the ResBlocks.
    use_transformer: SpatialTransformer (self + cross-attention + GEGLU) instead of plain
      spatial self-attention.
    transformer_depth: BasicTransformerBlocks per SpatialTransformer.
    context_dim: width of the cross-attention context; None = no cross-attention.
    num_classes: 0 = no labels; else label embedding with num_classes + 1 rows (last = null).
    aug_embedding: embed `aug_level` (the noise level of a low-resolution conditioning).
    conv_resample: learned 3x3 convs in Down/Upsample (else avg-pool / plain nearest).
    remat: rematerialise (gradient-checkpoint) every ResBlock and attention block.
    num_groups: GroupNorm groups.
    dtype: computation dtype (e.g. jnp.bfloat16); the output is always float32.

  Reference-layout options (defaults keep this project's original model; the converters in
  `ldm_jax.convert` set them to match LDM's `openaimodel.UNetModel` and diffusers' UNets):
    norm_eps: GroupNorm epsilon of the ResBlocks, plain self-attention and the output norm
      (1e-5 in both references; the SpatialTransformer's norm stays at 1e-6 as in both).
    symmetric_downsample: pad the stride-2 Downsample conv (1, 1) instead of (0, 1).
    flip_sin_to_cos, freq_shift: timestep embedding layout (see `layers.timestep_embedding`).
    mid_attention: attention between the two middle ResBlocks (diffusers' `add_attention`).
    level_heads: attention heads per level (overrides num_heads / num_head_channels; the
      middle block uses the last level's), as diffusers' per-block `attention_head_dim`.
    level_transformer_depth: transformer blocks per level (overrides transformer_depth; the
      middle block uses the last level's), diffusers' `transformer_layers_per_block` list.
  """
  model_channels: int = 128
  out_channels: int = 4
  num_res_blocks: int = 2
  channel_mult: Sequence[int] = (1, 2, 4)
  attention_levels: Sequence[int] = (1, 2)
  num_heads: int = 4
  num_head_channels: int = -1
  dropout: float = 0.0
  scale_shift_norm: bool = False
  use_transformer: bool = False
  transformer_depth: int = 1
  context_dim: Optional[int] = None
  num_classes: int = 0
  conv_resample: bool = True
  remat: bool = False
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  norm_eps: float = 1e-6
  symmetric_downsample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  mid_attention: bool = True
  level_heads: Sequence[int] = ()
  level_transformer_depth: Sequence[int] = ()
  aug_embedding: bool = False

  @property
  def null_label(self) -> int:
    """The label index meaning "no class" (classifier-free guidance)."""
    return self.num_classes

  def _check(self, labels, context):
    if self.context_dim is not None and not self.use_transformer:
      raise UserError("UNet: context_dim needs use_transformer=True (cross-attention lives in "
                      "the SpatialTransformer)")
    if (context is None) != (self.context_dim is None):
      raise UserError(f"UNet: context_dim={self.context_dim} but context "
                      f"{'missing' if context is None else 'given'}")
    if context is not None and context.shape[-1] != self.context_dim:
      raise UserError(f"UNet: context width {context.shape[-1]} != context_dim "
                      f"{self.context_dim}")
    if labels is not None and self.num_classes <= 0:
      raise UserError("UNet: labels given but num_classes is 0")
    for level in self.attention_levels:
      if not 0 <= level < len(self.channel_mult):
        raise UserError(f"UNet: attention level {level} outside 0..{len(self.channel_mult) - 1}")
    for name in ("level_heads", "level_transformer_depth"):
      value = tuple(getattr(self, name))
      if value and len(value) != len(self.channel_mult):
        raise UserError(f"UNet: {name}={value} needs one entry per level "
                        f"(channel_mult has {len(self.channel_mult)})")

  def _heads(self, channels: int, level: int) -> int:
    if self.level_heads:
      heads = self.level_heads[level]
    elif self.num_head_channels > 0:
      heads = channels // self.num_head_channels
    else:
      heads = self.num_heads
    if heads < 1 or channels % heads:
      raise UserError(f"UNet: {channels} channels do not split into attention heads "
                      f"(num_heads={self.num_heads}, num_head_channels={self.num_head_channels},"
                      f" level_heads={tuple(self.level_heads)})")
    return heads

  def _res(self, name: str, out_ch: int, h, emb, train: bool):
    block = layers.ResBlock(out_ch, self.dropout, self.scale_shift_norm, self.num_groups,
                            self.dtype, eps=self.norm_eps, name=name)
    if not self.remat:
      return block(h, emb, train=train)
    # A lifted function keeps `train` static (a Python closure) and the parameter tree
    # identical to the non-remat model.
    return nn.remat(lambda mdl, h, emb: mdl(h, emb, train=train))(block, h, emb)

  def _attn(self, name: str, level: int, h, context, context_mask):
    ch = h.shape[-1]
    heads = self._heads(ch, level)
    if self.use_transformer:
      depth = (self.level_transformer_depth[level] if self.level_transformer_depth
               else self.transformer_depth)
      block = layers.SpatialTransformer(heads, ch // heads, depth, self.num_groups, self.dtype,
                                        name=name)
      fn = lambda mdl, h, c, m: mdl(h, c, m)  # noqa: E731
    else:
      block = layers.SpatialSelfAttention(heads, -1, self.num_groups, self.dtype,
                                          eps=self.norm_eps, name=name)
      fn = lambda mdl, h, c, m: mdl(h)  # noqa: E731
    if self.remat:
      fn = nn.remat(fn)
    return fn(block, h, context, context_mask)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, *, labels: Optional[jax.Array] = None,
               context: Optional[jax.Array] = None, context_mask: Optional[jax.Array] = None,
               aug_level: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
    """Predicts from noisy input x [B, H, W, C_in] at timesteps t ([B] or scalar).

    Args:
      x: NHWC input; H and W must be divisible by 2 ** (len(channel_mult) - 1). C_in is free
        (concatenation conditioning goes here).
      t: timesteps, int or float, shape [B] or scalar.
      labels: int [B] class labels in [0, num_classes]; num_classes is the null label. None
        with num_classes > 0 uses the null label for the whole batch.
      context: [B, S, context_dim] cross-attention context (required iff context_dim is set).
      context_mask: optional bool [B, S]; False tokens are ignored by cross-attention.
      aug_level: int [B] (or scalar) noise level of the concatenated low-resolution
        conditioning; required iff `aug_embedding`.
      train: enables dropout (needs the "dropout" rng).

    Returns:
      float32 [B, H, W, out_channels].
    """
    self._check(labels, context)
    if (aug_level is None) == self.aug_embedding:
      raise UserError(f"UNet: aug_embedding={self.aug_embedding} but aug_level "
                      f"{'missing' if aug_level is None else 'given'}")
    b, hgt, wid, _ = x.shape
    f = 2 ** (len(self.channel_mult) - 1)
    if hgt % f or wid % f:
      raise UserError(f"UNet: spatial size {hgt}x{wid} not divisible by {f}")
    mc, emb_dim = self.model_channels, 4 * self.model_channels

    t_emb = layers.timestep_embedding(jnp.broadcast_to(jnp.asarray(t), (b,)), mc,
                                      flip_sin_to_cos=self.flip_sin_to_cos,
                                      freq_shift=self.freq_shift)
    emb = nn.Dense(emb_dim, dtype=self.dtype, name="time_embed_0")(t_emb)
    emb = nn.Dense(emb_dim, dtype=self.dtype, name="time_embed_1")(nn.silu(emb))
    if self.aug_embedding:
      a_emb = layers.timestep_embedding(jnp.broadcast_to(jnp.asarray(aug_level), (b,)), mc,
                                        flip_sin_to_cos=self.flip_sin_to_cos,
                                        freq_shift=self.freq_shift)
      a_emb = nn.Dense(emb_dim, dtype=self.dtype, name="aug_embed_0")(a_emb)
      emb = emb + nn.Dense(emb_dim, dtype=self.dtype, name="aug_embed_1")(nn.silu(a_emb))
    if self.num_classes > 0:
      if labels is None:
        labels = jnp.full((b,), self.null_label, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, emb_dim, dtype=self.dtype,
                           name="label_emb")(labels)

    h = layers.conv(mc, 3, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = self._res(f"down{level}_res{i}", mc * mult, h, emb, train)
        if level in self.attention_levels:
          h = self._attn(f"down{level}_attn{i}", level, h, context, context_mask)
        skips.append(h)
      if level != len(self.channel_mult) - 1:
        h = layers.Downsample(h.shape[-1], self.conv_resample, self.dtype,
                              self.symmetric_downsample, name=f"down{level}_downsample")(h)
        skips.append(h)

    h = self._res("mid_res0", h.shape[-1], h, emb, train)
    if self.mid_attention:
      h = self._attn("mid_attn", len(self.channel_mult) - 1, h, context, context_mask)
    h = self._res("mid_res1", h.shape[-1], h, emb, train)

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = self._res(f"up{level}_res{i}", mc * mult, h, emb, train)
        if level in self.attention_levels:
          h = self._attn(f"up{level}_attn{i}", level, h, context, context_mask)
      if level:
        h = layers.Upsample(h.shape[-1], self.conv_resample, self.dtype,
                            name=f"up{level}_upsample")(h)

    h = layers.group_norm_layer(h.shape[-1], self.num_groups, "norm_out", self.dtype,
                          self.norm_eps)(h, silu=True)
    out = nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                  kernel_init=nn.initializers.zeros, name="conv_out")(h)
    return out.astype(jnp.float32)
