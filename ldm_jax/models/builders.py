"""Networks from config blocks: the one place that reads a ConfigDict to build a module.

Training, sampling and the converters all build their models here, so a saved config.json
rebuilds exactly the network that was trained. Keys added after a run was saved are read with
their defaults, so configs written by older runs still build the same model.
"""
import jax.numpy as jnp
import ml_collections

from ldm_jax.errors import UserError
from ldm_jax.models import clip
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.conditioning import TextEncoder, Tokenizer
from ldm_jax.models.unet import UNet

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Conditioning kinds with a text encoder: 'text' (ours, trained with the UNet), 'clip' (CLIP's
# text transformer with converted weights, frozen; e.g. Stable Diffusion).
TEXT_KINDS = ("text", "clip")


def compute_dtype(name: str):
  if name not in _DTYPES:
    raise UserError(f"config.train.compute_dtype={name!r}: use one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def build_autoencoder(ae_cfg: ml_collections.ConfigDict, channels: int,
                      dtype=jnp.float32) -> AutoencoderKL:
  return AutoencoderKL(
      ch=ae_cfg.ch, ch_mult=tuple(ae_cfg.ch_mult), num_res_blocks=ae_cfg.num_res_blocks,
      in_channels=channels, z_channels=ae_cfg.z_channels, embed_dim=ae_cfg.embed_dim,
      attn_levels=tuple(ae_cfg.attn_levels), mid_attention=ae_cfg.mid_attention,
      dropout=ae_cfg.dropout, num_groups=ae_cfg.num_groups, dtype=dtype,
      quant_conv=bool(ae_cfg.get("quant_conv", True)))


def build_unet(stage: ml_collections.ConfigDict, out_channels: int, num_classes: int,
               dtype=jnp.float32) -> UNet:
  """The UNet of a diffusion stage block (`config.ldm`, `config.pixel`, `config.sr16`, ...).

  A stage conditioned on a lower-resolution stage (`lowres.stage`) embeds the augmentation
  level of that conditioning; its extra input channels need no option (the UNet takes any)."""
  u, cond = stage.unet, stage.conditioning
  context_dim = ((u.get("context_dim", 0) or cond.text_width) if cond.kind in TEXT_KINDS
                 else None)
  lowres = stage.get("lowres", None)
  return UNet(
      model_channels=u.model_channels, out_channels=out_channels,
      num_res_blocks=u.num_res_blocks, channel_mult=tuple(u.channel_mult),
      attention_levels=tuple(u.attention_levels), num_heads=u.num_heads,
      num_head_channels=u.num_head_channels, dropout=u.dropout,
      scale_shift_norm=u.scale_shift_norm, use_transformer=u.use_transformer,
      transformer_depth=u.transformer_depth, context_dim=context_dim,
      num_classes=num_classes if cond.kind == "class" else 0, remat=u.remat,
      num_groups=u.num_groups, dtype=dtype, norm_eps=float(u.get("norm_eps", 1e-6)),
      symmetric_downsample=bool(u.get("symmetric_downsample", False)),
      flip_sin_to_cos=bool(u.get("flip_sin_to_cos", True)),
      freq_shift=float(u.get("freq_shift", 0.0)),
      mid_attention=bool(u.get("mid_attention", True)),
      level_heads=tuple(u.get("level_heads", ())),
      level_transformer_depth=tuple(u.get("level_transformer_depth", ())),
      aug_embedding=bool(lowres is not None and lowres.stage))


def build_text_encoder(stage: ml_collections.ConfigDict, tokenizer: Tokenizer,
                       dtype=jnp.float32):
  """conditioning.kind 'text': our TextEncoder; 'clip': a frozen CLIPTextEncoder built from
  `conditioning.clip` (the transformers CLIPTextConfig fields written by ldm_jax.convert)."""
  c = stage.conditioning
  if c.kind == "clip":
    return clip.from_config(c.clip.to_dict() if hasattr(c.clip, "to_dict") else c.clip, dtype)
  return TextEncoder(vocab_size=tokenizer.vocab_size, max_length=c.max_length, width=c.text_width,
                     depth=c.text_depth, num_heads=c.text_heads, dtype=dtype)
