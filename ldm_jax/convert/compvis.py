"""CompVis LDM / Stable Diffusion `.ckpt` weights -> our Flax params.

The checkpoint's state dict (name -> numpy array; loading it is the caller's job) holds
`model.diffusion_model.*` (the `openaimodel.UNetModel`), `first_stage_model.*` (the
`autoencoder.AutoencoderKL`) and `cond_stage_model.*` (the text encoder, not handled here).
The configs are the blocks of the model's YAML file, as dicts (`{"target": ..., "params":
{...}}` or just their `params`):

  * `unet_from_compvis(model.params.unet_config, state_dict)` -> (config.ldm.unet values,
    UNet params)
  * `vae_from_compvis(model.params.first_stage_config, state_dict)` -> (config.autoencoder
    values, AutoencoderKL params)

Build the modules as for the diffusers converters (`diffusers_models.unet_module` /
`vae_module`): the UNet's out_channels and input channels are the config's `out_channels` /
`in_channels`, the autoencoder's image channels `ddconfig.in_channels`. Options our modules
cannot express raise a UserError naming the key; so do missing, unknown and wrongly shaped
weights (under the model's prefix; a dict without that prefix is taken as the model's own).
"""
import re
from typing import Any, Dict, Mapping, Tuple

from ldm_jax.convert.diffusers_models import (abstract_unet_params, abstract_vae_params,
                                              convert_with, unet_module, vae_module)
from ldm_jax.convert.torch_params import Fused, Source, strip_prefix
from ldm_jax.errors import UserError

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema.diffusion_model"
VAE_PREFIX = "first_stage_model."

_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb_proj": "emb_layers.1",
        "norm2": "out_layers.0", "conv2": "out_layers.3", "skip": "skip_connection"}
_TRANSFORMER = {"to_out": "to_out.0"}


def _params(block: Mapping[str, Any]) -> Mapping[str, Any]:
  return block["params"] if "params" in block else block


def _unet_cfg(p: Mapping[str, Any]) -> Dict[str, Any]:
  what = "CompVis UNetModel"
  fixed = dict(dims=2, resblock_updown=False, conv_resample=True, num_classes=None, n_embed=None,
               disable_self_attentions=None, num_attention_blocks=None,
               disable_middle_self_attn=False, adm_in_channels=None)
  for key, want in fixed.items():
    if p.get(key, want) != want:
      raise UserError(f"{what} config {key}={p[key]!r} is not supported (only {want!r})")
  heads, head_channels = int(p.get("num_heads", -1)), int(p.get("num_head_channels", -1))
  if p.get("num_heads_upsample", -1) not in (-1, heads):
    raise UserError(f"{what} config num_heads_upsample={p['num_heads_upsample']!r} != "
                    f"num_heads={heads} is not supported")
  if heads == -1 and head_channels == -1:
    raise UserError(f"{what} config: set num_heads or num_head_channels")
  mult = tuple(int(m) for m in p["channel_mult"])
  resolutions = tuple(int(r) for r in p["attention_resolutions"])
  transformer = bool(p.get("use_spatial_transformer", False))
  depth = p.get("transformer_depth", 1)
  if not isinstance(depth, int):
    raise UserError(f"{what} config transformer_depth={depth!r} is not supported (an int)")
  context = p.get("context_dim")
  if isinstance(context, (list, tuple)):
    if len(set(context)) != 1:
      raise UserError(f"{what} config context_dim={context!r} is not supported (one width)")
    context = context[0]
  if context is not None and not transformer:
    raise UserError(f"{what} config context_dim={context!r} needs use_spatial_transformer")
  return dict(
      model_channels=int(p["model_channels"]), channel_mult=mult,
      num_res_blocks=int(p["num_res_blocks"]),
      attention_levels=tuple(i for i in range(len(mult)) if 2 ** i in resolutions),
      num_heads=max(heads, 1), num_head_channels=head_channels, level_heads=(),
      dropout=float(p.get("dropout", 0.0)),
      scale_shift_norm=bool(p.get("use_scale_shift_norm", False)),
      use_transformer=transformer, transformer_depth=depth, level_transformer_depth=(),
      num_groups=32, norm_eps=1e-5, symmetric_downsample=True, flip_sin_to_cos=True,
      freq_shift=0.0, mid_attention=True, context_dim=int(context or 0))


def _unet_rename(cfg: Dict[str, Any], legacy: bool):
  n, nrb = len(cfg["channel_mult"]), cfg["num_res_blocks"]
  attn = set(cfg["attention_levels"])

  def heads(level: int) -> int:
    ch = cfg["model_channels"] * cfg["channel_mult"][level]
    return ch // cfg["num_head_channels"] if cfg["num_head_channels"] > 0 else cfg["num_heads"]

  def top(name: str) -> Tuple[str, int]:
    """Our top-level module -> (CompVis prefix, level)."""
    fixed = {"time_embed_0": "time_embed.0", "time_embed_1": "time_embed.2",
             "conv_in": "input_blocks.0.0", "norm_out": "out.0", "conv_out": "out.2",
             "mid_res0": "middle_block.0", "mid_attn": "middle_block.1",
             "mid_res1": "middle_block.2"}
    if name in fixed:
      return fixed[name], n - 1
    m = re.fullmatch(r"(down|up)(\d+)_(res|attn|downsample|upsample)(\d*)", name)
    if not m:
      raise UserError(f"CompVis UNetModel: no CompVis name for our module {name!r}")
    level, i = int(m.group(2)), int(m.group(4) or nrb)
    sub = {"res": 0, "attn": 1, "downsample": 0, "upsample": 2 if level in attn else 1}
    block = (1 + level * (nrb + 1) + i if m.group(1) == "down"
             else (n - 1 - level) * (nrb + 1) + i)
    side = "input_blocks" if m.group(1) == "down" else "output_blocks"
    return f"{side}.{block}.{sub[m.group(3)]}", level

  def rename(path: Tuple[str, ...], self_attn: set) -> Source:
    prefix, level = top(path[0])
    if path[0].endswith("_downsample"):
      return prefix + ".op"
    parts = [prefix]
    for i in range(1, len(path)):
      name = path[i]
      if "_res" in path[0]:
        parts.append(_RES.get(name, name))
      elif tuple(path[:i]) in self_attn and name == "qkv":
        # LDM's AttentionBlock: one conv1d of 3C rows, per head unless use_new_attention_order.
        return Fused((".".join(parts + ["qkv"]),), heads(level) if legacy else 0)
      elif name.startswith("block") and name[5:].isdigit():
        parts.append(f"transformer_blocks.{name[5:]}")
      elif path[i - 1] == "ff":
        parts.append("net.0.proj" if name == "proj_in" else "net.2")
      else:
        parts.append(_TRANSFORMER.get(name, name))
    return ".".join(parts)

  return rename


def _ema_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """The UNet's EMA weights under the UNet's own names (LitEma drops the dots)."""
  names = strip_prefix(state_dict, UNET_PREFIX)
  missing = [k for k in names if EMA_PREFIX + k.replace(".", "") not in state_dict]
  if missing:
    raise UserError(f"CompVis checkpoint has no EMA weights for {len(missing)} UNet keys: "
                    f"{', '.join(sorted(missing)[:10])}")
  return {k: state_dict[EMA_PREFIX + k.replace(".", "")] for k in names}


def unet_from_compvis(unet_config: Mapping[str, Any], state_dict: Mapping[str, Any], *,
                      ema: bool = False):
  """LDM `openaimodel.UNetModel` -> (config.ldm.unet values, UNet params).

  Args:
    unet_config: the YAML's `model.params.unet_config` block (or its `params`).
    state_dict: the checkpoint's state dict (`model.diffusion_model.*` keys are used).
    ema: take the `model_ema.*` weights (LDM's EMA copy) instead of the trained ones.
  """
  p = _params(unet_config)
  cfg = _unet_cfg(p)
  unet = unet_module(cfg, int(p["out_channels"]))
  abstract = abstract_unet_params(unet, int(p["in_channels"]))
  weights = _ema_state_dict(state_dict) if ema else strip_prefix(state_dict, UNET_PREFIX)
  legacy = not p.get("use_new_attention_order", False)
  return cfg, convert_with(abstract, weights, _unet_rename(cfg, legacy), "CompVis UNetModel")


def _vae_rename(path: Tuple[str, ...], self_attn: set) -> Source:
  fixed = {"mid_res0": "mid.block_1", "mid_attn": "mid.attn_1", "mid_res1": "mid.block_2"}
  if path[0] in ("quant_conv", "post_quant_conv"):
    return path[0]
  m = re.fullmatch(r"(down|up)(\d+)_(res|attn|downsample|upsample)(\d*)", path[1])
  if m:
    kind = {"res": "block", "attn": "attn"}.get(m.group(3), m.group(3))
    name = f"{m.group(1)}.{m.group(2)}.{kind}" + (f".{m.group(4)}" if m.group(4) else "")
  else:
    name = fixed.get(path[1], path[1])
  parts = [path[0], name]
  if path[:2] in self_attn and path[2] == "qkv":
    return Fused(tuple(".".join(parts + [c]) for c in "qkv"))
  parts += [{"skip": "nin_shortcut"}.get(n, n) for n in path[2:]]
  return ".".join(parts)


def vae_from_compvis(first_stage_config: Mapping[str, Any], state_dict: Mapping[str, Any]):
  """LDM `autoencoder.AutoencoderKL` -> (config.autoencoder values, AutoencoderKL params).

  Args:
    first_stage_config: the YAML's `model.params.first_stage_config` block (or its params:
      `embed_dim`, `ddconfig`); a stand-alone autoencoder YAML's `model` block works too.
    state_dict: the checkpoint's state dict (`first_stage_model.*` keys are used; the
      training loss's `loss.*` weights of an autoencoder checkpoint are ignored).
  """
  what = "CompVis AutoencoderKL"
  p = _params(first_stage_config)
  dd = p["ddconfig"]
  if not dd.get("double_z", True) or dd.get("tanh_out", False) or dd.get(
      "attn_type", "vanilla") != "vanilla" or not dd.get("resamp_with_conv", True):
    raise UserError(f"{what} ddconfig {dict(dd)!r}: double_z=False, tanh_out, attn_type or "
                    "resamp_with_conv=False is not supported")
  if dd["in_channels"] != dd["out_ch"]:
    raise UserError(f"{what} ddconfig in_channels={dd['in_channels']} != "
                    f"out_ch={dd['out_ch']} is not supported")
  mult = tuple(int(m) for m in dd["ch_mult"])
  res = int(dd["resolution"])
  attn = tuple(int(r) for r in dd.get("attn_resolutions", ()))
  cfg = dict(ch=int(dd["ch"]), ch_mult=mult, num_res_blocks=int(dd["num_res_blocks"]),
             z_channels=int(dd["z_channels"]), embed_dim=int(p["embed_dim"]),
             attn_levels=tuple(i for i in range(len(mult)) if res // 2 ** i in attn),
             mid_attention=True, dropout=float(dd.get("dropout", 0.0)), num_groups=32,
             quant_conv=True)
  vae = vae_module(cfg, int(dd["in_channels"]))
  weights = {k: v for k, v in strip_prefix(state_dict, VAE_PREFIX).items()
             if not k.startswith("loss.")}
  return cfg, convert_with(abstract_vae_params(vae), weights, _vae_rename, what)
