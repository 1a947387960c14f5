"""diffusers UNet2DConditionModel / UNet2DModel / AutoencoderKL weights -> our Flax params.

Each converter takes the model folder's `config.json` (as a dict) and its state dict (name ->
numpy array; loading the files is the caller's job) and returns (cfg, params):

  * `unet_from_diffusers` -> (keys of `config.ldm.unet`, UNet params)
  * `vae_from_diffusers`  -> (keys of `config.autoencoder`, AutoencoderKL params)

cfg holds only architecture keys; `unet_module` / `vae_module` (also used here to check the
weights against the model that cfg builds) show how `build_unet` / `build_autoencoder` get
the rest: the UNet's out_channels (the latent channels; diffusers' `out_channels`), its
context width (`cfg['context_dim']`, diffusers' `cross_attention_dim`), the autoencoder's
image channels (diffusers' `in_channels`). Every config key is classified in
`config_keys` (UNET_CONDITION, UNET_PLAIN, VAE): values our modules cannot express, and keys
no table knows, raise a UserError naming the key and value; so do missing, unknown and wrongly
shaped weights. A class-conditional UNet2DModel (`num_class_embeds`) converts with
`unet_num_classes(config)` classes (its last class row is our null label).
"""
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from ldm_jax.convert import config_keys
from ldm_jax.convert.torch_params import Fused, Source, params_from_state_dict
from ldm_jax.errors import UserError
from ldm_jax.models.builders import build_autoencoder, build_unet

# --- Building our modules from a converter's cfg (also what a config holding cfg builds). ---


def unet_module(cfg: Mapping[str, Any], out_channels: int, num_classes: int = 0):
  """The UNet that `build_unet` makes from `config.ldm.unet` updated with `cfg` (with
  `num_classes`: a class-conditional stage with that many classes)."""
  ctx = int(cfg.get("context_dim", 0))
  kind = "text" if ctx else ("class" if num_classes else "none")
  ldm = ml_collections.ConfigDict(dict(
      unet={"dropout": 0.0, "remat": False, **cfg},
      conditioning=dict(kind=kind, text_width=ctx)))
  return build_unet(ldm, out_channels, num_classes)


def vae_module(cfg: Mapping[str, Any], in_channels: int):
  """The AutoencoderKL that `build_autoencoder` makes from `config.autoencoder` = `cfg`."""
  return build_autoencoder(ml_collections.ConfigDict({"dropout": 0.0, **cfg}), in_channels)


def abstract_unet_params(unet, in_channels: int):
  size = 2 ** (len(unet.channel_mult) - 1)
  x = jnp.zeros((1, size, size, in_channels))
  ctx = None if unet.context_dim is None else jnp.zeros((1, 1, unet.context_dim))
  return jax.eval_shape(lambda: unet.init(jax.random.key(0), x, jnp.zeros((1,)),
                                          context=ctx))["params"]


def abstract_vae_params(vae):
  size = vae.downsample_factor
  x = jnp.zeros((1, size, size, vae.in_channels))
  return jax.eval_shape(lambda: vae.init(jax.random.key(0), x))["params"]


# --- Config translation. ---

def _int(config: Mapping[str, Any], key: str, default: int, what: str) -> int:
  value = config.get(key, default)
  if isinstance(value, bool) or not isinstance(value, int):
    raise UserError(f"{what} config {key}={value!r} is not supported (an int)")
  return value


def _levels(config, what: str, defaults) -> Tuple[int, Tuple[int, ...], Tuple[int, ...]]:
  """(model_channels, channel_mult, attention levels) from the block lists."""
  boc = tuple(config.get("block_out_channels", defaults["block_out_channels"]))
  mc = boc[0]
  if any(c % mc for c in boc):
    raise UserError(f"{what} config block_out_channels={boc}: not multiples of the first")
  down = tuple(config.get("down_block_types", defaults["down_block_types"]))
  up = tuple(config.get("up_block_types", defaults["up_block_types"]))
  plain, attn = defaults["block_names"]
  if len(down) != len(boc) or len(up) != len(boc):
    raise UserError(f"{what} config: {len(down)} down_block_types and {len(up)} "
                    f"up_block_types for {len(boc)} block_out_channels")
  levels = []
  for level, (d, u) in enumerate(zip(down, reversed(up))):
    has = d == f"{attn}Down{plain}"
    if d not in (f"Down{plain}", f"{attn}Down{plain}") or u != (
        f"{attn}Up{plain}" if has else f"Up{plain}"):
      raise UserError(f"{what} config: block types down_block_types[{level}]={d!r} / "
                      f"up_block_types[{len(boc) - 1 - level}]={u!r} are not supported")
    if has:
      levels.append(level)
  return mc, tuple(c // mc for c in boc), tuple(levels)


def _per_level(value, n: int, key: str, what: str) -> Tuple[Optional[int], Tuple[int, ...]]:
  """An int or a per-level list -> (single value or None, per-level tuple or ())."""
  if isinstance(value, (list, tuple)):
    if len(value) != n or not all(isinstance(v, int) for v in value):
      raise UserError(f"{what} config {key}={value!r}: need an int or one int per block")
    return None, tuple(value)
  return int(value), ()


def _unet_cfg_from_condition_config(config: Mapping[str, Any]) -> Dict[str, Any]:
  what = "diffusers UNet2DConditionModel"
  config_keys.check(config, config_keys.UNET_CONDITION, f"{what} config")
  defaults = dict(
      block_out_channels=(320, 640, 1280, 1280),
      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
      block_names=("Block2D", "CrossAttn"))
  mc, mult, levels = _levels(config, what, defaults)
  n = len(mult)
  heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
  num_heads, level_heads = _per_level(heads, n, "attention_head_dim", what)
  depth, level_depth = _per_level(config.get("transformer_layers_per_block", 1), n,
                                  "transformer_layers_per_block", what)
  return dict(
      _common_unet_cfg(config, what), model_channels=mc, channel_mult=mult,
      attention_levels=levels, num_heads=num_heads or 1, num_head_channels=-1,
      level_heads=level_heads, use_transformer=True, transformer_depth=depth or 1,
      level_transformer_depth=level_depth, mid_attention=True,
      context_dim=_int(config, "cross_attention_dim", 1280, what))


def _unet_cfg_from_plain_config(config: Mapping[str, Any]) -> Dict[str, Any]:
  what = "diffusers UNet2DModel"
  config_keys.check(config, config_keys.UNET_PLAIN, f"{what} config")
  unet_num_classes(config)  # checks num_class_embeds
  defaults = dict(
      block_out_channels=(224, 448, 672, 896),
      down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * 3,
      up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",),
      block_names=("Block2D", "Attn"))
  mc, mult, levels = _levels(config, what, defaults)
  groups = config.get("norm_num_groups", 32)
  attn_groups = config.get("attn_norm_num_groups")
  mid_attention = bool(config.get("add_attention", True))
  scale_shift = config.get("resnet_time_scale_shift", "default") == "scale_shift"
  if attn_groups not in (None, groups) or (mid_attention and scale_shift and
                                           attn_groups is None):
    # diffusers' middle attention then has another GroupNorm, or none at all.
    raise UserError(f"{what} config attn_norm_num_groups={attn_groups!r} is not supported "
                    f"with norm_num_groups={groups} (need equal, or None without scale_shift)")
  head_dim = config.get("attention_head_dim", 8)
  return dict(
      _common_unet_cfg(config, what), model_channels=mc, channel_mult=mult,
      attention_levels=levels, num_heads=1, num_head_channels=int(head_dim or -1),
      level_heads=(), use_transformer=False, transformer_depth=1,
      level_transformer_depth=(), mid_attention=mid_attention, context_dim=0)


def _common_unet_cfg(config: Mapping[str, Any], what: str) -> Dict[str, Any]:
  shift = config.get("resnet_time_scale_shift", "default")
  if shift not in ("default", "scale_shift"):
    raise UserError(f"{what} config resnet_time_scale_shift={shift!r} is not supported")
  groups = config.get("norm_num_groups", 32)
  if not groups:
    raise UserError(f"{what} config norm_num_groups={groups!r} is not supported")
  padding = config.get("downsample_padding", 1)
  if padding not in (0, 1) or isinstance(padding, bool):
    # 1: the stride-2 conv pads (1, 1); 0: diffusers pads (0, 1) by hand first.
    raise UserError(f"{what} config downsample_padding={padding!r} is not supported (0 or 1)")
  return dict(
      num_res_blocks=_int(config, "layers_per_block", 2, what),
      scale_shift_norm=shift == "scale_shift", num_groups=int(groups),
      norm_eps=float(config.get("norm_eps", 1e-5)), symmetric_downsample=padding == 1,
      flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
      freq_shift=float(config.get("freq_shift", 0)), dropout=float(config.get("dropout", 0.0)))


# --- Names: our module path -> diffusers prefix. ---

_UNET_TOP = [
    (r"^time_embed_0$", "time_embedding.linear_1"),
    (r"^time_embed_1$", "time_embedding.linear_2"),
    (r"^label_emb$", "class_embedding"),
    (r"^norm_out$", "conv_norm_out"),
    (r"^down(\d+)_res(\d+)$", r"down_blocks.\1.resnets.\2"),
    (r"^down(\d+)_attn(\d+)$", r"down_blocks.\1.attentions.\2"),
    (r"^down(\d+)_downsample$", r"down_blocks.\1.downsamplers.0"),
    (r"^mid_res(\d)$", r"mid_block.resnets.\1"),
    (r"^mid_attn$", "mid_block.attentions.0"),
]
_INNER = {"emb_proj": "time_emb_proj", "skip": "conv_shortcut", "to_out": "to_out.0"}


def _top_rules(n: int):
  """Rules for our top-level names; diffusers numbers up blocks from the bottom."""
  def up(m):
    kind = {"res": "resnets", "attn": "attentions"}[m.group(2)]
    return f"up_blocks.{n - 1 - int(m.group(1))}.{kind}.{m.group(3)}"
  return _UNET_TOP + [
      (r"^up(\d+)_(res|attn)(\d+)$", up),
      (r"^up(\d+)_upsample$", lambda m: f"up_blocks.{n - 1 - int(m.group(1))}.upsamplers.0")]


def _rename_top(name: str, rules) -> str:
  for pattern, repl in rules:
    new, count = re.subn(pattern, repl, name)
    if count:
      return new
  return name


def self_attention_paths(abstract) -> set:
  """Module paths whose parameters include a fused `qkv` (our SpatialSelfAttention)."""
  found = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    names = tuple(str(p.key) for p in path)
    if "qkv" in names:
      found.add(names[:names.index("qkv")])
  return found


def diffusers_rename(path: Tuple[str, ...], n_levels: int, self_attn: set) -> Source:
  """Our module path (UNet, or AutoencoderKL) -> the diffusers prefix."""
  rules = _top_rules(n_levels)
  head = 1 if path[0] in ("encoder", "decoder") else 0
  parts = list(path[:head]) + [_rename_top(path[head], rules)]
  for i in range(head + 1, len(path)):
    name, in_self_attn = path[i], tuple(path[:i]) in self_attn
    if name == "qkv":
      return Fused(tuple(".".join(parts + [f"to_{c}"]) for c in "qkv"))
    if name.startswith("block") and name[5:].isdigit():
      parts.append(f"transformer_blocks.{name[5:]}")
    elif path[i - 1] == "ff":
      parts.append("net.0.proj" if name == "proj_in" else "net.2")
    elif in_self_attn and name in ("proj_out", "norm"):
      parts.append("to_out.0" if name == "proj_out" else "group_norm")
    else:
      parts.append(_INNER.get(name, name))
  return ".".join(parts)


def convert_with(abstract, state_dict, rename, what: str):
  """`params_from_state_dict` with `rename(path, self_attn_paths)`."""
  self_attn = self_attention_paths(abstract)
  return params_from_state_dict(abstract, state_dict, lambda p: rename(p, self_attn), what)


# --- Public converters. ---


def unet_config_from_diffusers(config: Mapping[str, Any]) -> Tuple[Dict[str, Any], str]:
  """diffusers UNet config -> (config.ldm.unet values, the diffusers class name); no weights."""
  kind = config.get("_class_name") or (
      "UNet2DConditionModel" if "cross_attention_dim" in config else "UNet2DModel")
  if kind == "UNet2DConditionModel":
    return _unet_cfg_from_condition_config(config), kind
  if kind == "UNet2DModel":
    return _unet_cfg_from_plain_config(config), kind
  raise UserError(f"diffusers UNet config _class_name={kind!r} is not supported "
                  "(UNet2DConditionModel, UNet2DModel)")


def unet_num_classes(config: Mapping[str, Any]) -> int:
  """Our `num_classes` for a diffusers UNet config: 0 without class labels; for a
  class-conditional UNet2DModel (`num_class_embeds` = K rows of `class_embedding`) K - 1:
  our label table has num_classes + 1 rows, the last the null label of classifier-free
  guidance, so diffusers' last class row is our null label (the layout of a model trained
  with ldm_jax: K - 1 classes and a null row)."""
  k = config.get("num_class_embeds")
  if k is None:
    return 0
  if isinstance(k, bool) or not isinstance(k, int) or k < 2:
    raise UserError(f"diffusers UNet config num_class_embeds={k!r} is not supported (an int "
                    ">= 2: the classes and, last, the null label)")
  return k - 1


def unet_from_diffusers(config: Mapping[str, Any], state_dict: Mapping[str, Any]):
  """diffusers UNet2DConditionModel or UNet2DModel -> (config.ldm.unet values, UNet params).

  Build the same module with `unet_module(cfg, config['out_channels'],
  unet_num_classes(config))` (or `build_unet` with `config.ldm.unet.update(cfg)`,
  out_channels as the latent channels and, for cross-attention, a text conditioning of width
  cfg['context_dim']; for class labels, a 'class' conditioning).
  """
  cfg, kind = unet_config_from_diffusers(config)
  unet = unet_module(cfg, _int(config, "out_channels", 4, f"diffusers {kind}"),
                     unet_num_classes(config))
  abstract = abstract_unet_params(unet, _int(config, "in_channels", 4, f"diffusers {kind}"))
  n = len(cfg["channel_mult"])
  params = convert_with(abstract, state_dict, lambda p, sa: diffusers_rename(p, n, sa),
                        f"diffusers {kind}")
  return cfg, params


def vae_from_diffusers(config: Mapping[str, Any], state_dict: Mapping[str, Any]):
  """diffusers AutoencoderKL -> (config.autoencoder values, AutoencoderKL params).

  The image channels (our `in_channels`, the data's channels) are `config['in_channels']`.
  """
  cfg = vae_config_from_diffusers(config)
  vae = vae_module(cfg, int(config.get("in_channels", 3)))
  abstract = abstract_vae_params(vae)
  n = len(cfg["ch_mult"])
  what = "diffusers AutoencoderKL"
  return cfg, convert_with(abstract, state_dict, lambda p, sa: diffusers_rename(p, n, sa), what)


def vae_config_from_diffusers(config: Mapping[str, Any]) -> Dict[str, Any]:
  """diffusers AutoencoderKL config -> config.autoencoder values; no weights."""
  what = "diffusers AutoencoderKL"
  kind = config.get("_class_name", "AutoencoderKL")
  if kind != "AutoencoderKL":
    raise UserError(f"diffusers VAE config _class_name={kind!r} is not supported "
                    "(AutoencoderKL)")
  config_keys.check(config, config_keys.VAE, f"{what} config")
  quant = bool(config.get("use_quant_conv", True))
  if quant != bool(config.get("use_post_quant_conv", True)):
    raise UserError(f"{what} config use_quant_conv={quant} with use_post_quant_conv="
                    f"{config.get('use_post_quant_conv')} is not supported")
  if config.get("in_channels", 3) != config.get("out_channels", 3):
    raise UserError(f"{what} config in_channels={config.get('in_channels')} != "
                    f"out_channels={config.get('out_channels')} is not supported")
  defaults = dict(block_out_channels=(64,), down_block_types=("DownEncoderBlock2D",),
                  up_block_types=("UpDecoderBlock2D",), block_names=("EncoderBlock2D", "Attn"))
  down = tuple(config.get("down_block_types", defaults["down_block_types"]))
  up = tuple(config.get("up_block_types", defaults["up_block_types"]))
  # Encoder and decoder blocks have different names; check them as one UNet-like pair.
  pair = dict(config, down_block_types=down,
              up_block_types=tuple(u.replace("DecoderBlock2D", "EncoderBlock2D") for u in up))
  ch, mult, levels = _levels(pair, what, defaults)
  latent = int(config.get("latent_channels", 4))
  cfg = dict(ch=ch, ch_mult=mult, num_res_blocks=int(config.get("layers_per_block", 1)),
             z_channels=latent, embed_dim=latent, attn_levels=levels,
             mid_attention=bool(config.get("mid_block_add_attention", True)), dropout=0.0,
             num_groups=int(config.get("norm_num_groups", 32)), quant_conv=quant)
  return cfg
