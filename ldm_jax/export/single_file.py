"""A CLIP-conditioned (Stable Diffusion 1.x-shaped) workdir as the CompVis single-file
checkpoint: `<name>.safetensors` with `model.diffusion_model.*`, `first_stage_model.*` and
`cond_stage_model.transformer.*`, and `<name>.yaml` (the CompVis model config) beside it, which
`python -m ldm_jax.convert compvis <file> <workdir> --config <yaml> --tokenizer <folder>` reads
back to the same parameters.

Names come from the CompVis importer's own renames (`convert.compvis`); layouts are those of
the CompVis modules: convolutions OIHW, linears (out, in), and the 1x1 convolutions of SD 1.x
(the transformers' proj_in / proj_out, every projection of the autoencoder's attention) as
(out, in, 1, 1). The yaml is built so that the importer reads our config back; an
architecture it would read differently is refused with one line.
"""
import json
import os

import numpy as np

from ldm_jax.convert import compvis
from ldm_jax.convert.stable_diffusion import CLIP_PREFIX, COMPVIS_BETA_SCHEDULES
from ldm_jax.errors import UserError
from ldm_jax.export import diffusers_format as fmt

_OUR_BETA = {v: k for k, v in COMPVIS_BETA_SCHEDULES.items()}


def compvis_config(config, stage: str, latent_shape, latent_scale: float) -> dict:
  """The CompVis yaml (as a dict) of a CLIP-conditioned stage."""
  block = config[stage]
  u, a = dict(block.unet), dict(config.autoencoder)
  if block.diffusion.schedule not in _OUR_BETA:
    raise UserError(f"diffusion.schedule={block.diffusion.schedule!r} has no CompVis name")
  if u.get("level_heads") or u.get("level_transformer_depth"):
    raise UserError("config.ldm.unet: per-level heads or transformer depth have no CompVis "
                    "single-file equivalent")
  heads = {"num_heads": int(u["num_heads"])} if u["num_head_channels"] <= 0 else {
      "num_head_channels": int(u["num_head_channels"])}
  unet = dict(image_size=int(latent_shape[0]), in_channels=int(latent_shape[-1]),
              out_channels=int(latent_shape[-1]), model_channels=int(u["model_channels"]),
              attention_resolutions=[2 ** i for i in u["attention_levels"]],
              num_res_blocks=int(u["num_res_blocks"]), channel_mult=list(u["channel_mult"]),
              use_spatial_transformer=True, transformer_depth=int(u["transformer_depth"]),
              context_dim=int(u["context_dim"] or block.conditioning.text_width),
              use_scale_shift_norm=bool(u["scale_shift_norm"]), legacy=False, **heads)
  fmt._check_round_trip(u, compvis._unet_cfg(unet), "config.ldm.unet (CompVis UNetModel)")  # pylint: disable=protected-access
  size = int(config.data.image_size)
  dd = dict(double_z=True, z_channels=int(a["z_channels"]), resolution=size,
            in_channels=int(config.data.channels), out_ch=int(config.data.channels),
            ch=int(a["ch"]), ch_mult=list(a["ch_mult"]), num_res_blocks=int(a["num_res_blocks"]),
            attn_resolutions=[size // 2 ** i for i in a["attn_levels"]],
            dropout=float(a.get("dropout", 0.0)))
  first = {"params": {"embed_dim": int(a["embed_dim"]), "ddconfig": dd}}
  back, _ = _vae_cfg(first)
  fmt._check_round_trip(a, back, "config.autoencoder (CompVis AutoencoderKL)")  # pylint: disable=protected-access
  d = block.diffusion
  return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
      "linear_start": float(d.beta_start), "linear_end": float(d.beta_end),
      "timesteps": int(d.num_timesteps), "beta_schedule": _OUR_BETA[d.schedule],
      "parameterization": d.parameterization, "image_size": int(latent_shape[0]),
      "channels": int(latent_shape[-1]), "scale_factor": float(latent_scale),
      "cond_stage_key": "txt", "conditioning_key": "crossattn",
      "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                      "params": unet},
      "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", **first},
      "cond_stage_config": {
          "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
          "params": {"num_attention_heads": int(block.conditioning.clip.num_attention_heads)}},
  }}}


def _vae_cfg(first_stage: dict):
  """config.autoencoder values the CompVis importer reads from `first_stage` (no weights)."""
  p = first_stage["params"]
  dd = p["ddconfig"]
  mult = tuple(dd["ch_mult"])
  return dict(ch=dd["ch"], ch_mult=mult, num_res_blocks=dd["num_res_blocks"],
              z_channels=dd["z_channels"], embed_dim=p["embed_dim"],
              attn_levels=tuple(i for i in range(len(mult))
                                if dd["resolution"] // 2 ** i in dd["attn_resolutions"]),
              mid_attention=True, num_groups=32, quant_conv=True), None


def _to_torch(leaf: str, value: np.ndarray, conv1x1: bool) -> np.ndarray:
  if leaf == "kernel":
    value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    if conv1x1 and value.ndim == 2:
      value = value[:, :, None, None]
  return np.ascontiguousarray(value, np.float32)


def _state_dict(params, rename, prefix: str, conv1x1) -> dict:
  """`prefix` + the CompVis names of `params` (torch layouts); `conv1x1(path)` says which
  2-D kernels are 1x1 convolutions there."""
  import jax  # pylint: disable=g-import-not-at-top
  from ldm_jax.convert import diffusers_models as dm  # pylint: disable=g-import-not-at-top
  from ldm_jax.convert.torch_params import _TORCH_LEAF, Fused  # pylint: disable=g-import-not-at-top
  self_attn = dm.self_attention_paths(params)
  out = {}

  def put(path, value):
    names = tuple(str(p.key) for p in path)
    source, leaf = rename(names[:-1], self_attn), names[-1]
    value = np.asarray(value, np.float32)
    if isinstance(source, Fused):
      if source.heads:
        raise UserError("a legacy per-head qkv layout is not exported")
      parts = np.split(value.T if leaf == "kernel" else value, len(source.prefixes), axis=0)
      for p, part in zip(source.prefixes, parts):
        part = part[:, :, None, None] if leaf == "kernel" and conv1x1(names) else part
        out[f"{prefix}{p}.{_TORCH_LEAF[leaf]}"] = np.ascontiguousarray(part)
      return
    out[f"{prefix}{source}.{_TORCH_LEAF[leaf]}"] = _to_torch(leaf, value, conv1x1(names))

  jax.tree_util.tree_map_with_path(put, params)
  return out


def export_single_file(config, stage: str, parts, path: str) -> tuple[str, str]:
  """Writes `path` (.safetensors) and the yaml beside it; returns both paths."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if config[stage].conditioning.kind != "clip":
    raise UserError("--format=single_file exports a CLIP-conditioned (Stable Diffusion) "
                    "workdir; use the diffusers format for this one")
  if not path.endswith(".safetensors"):
    raise UserError(f"--out={path}: a single file ends in .safetensors")
  yaml_path = path[:-len(".safetensors")] + ".yaml"
  for p in (path, yaml_path):
    if os.path.exists(p):
      raise UserError(f"{p} exists: export to a new name")
  cv = compvis_config(config, stage, parts.codec.shape, float(parts.codec.scale))
  unet_cfg = compvis._unet_cfg(cv["model"]["params"]["unet_config"]["params"])  # pylint: disable=protected-access
  unet_rename = compvis._unet_rename(unet_cfg, legacy=False)  # pylint: disable=protected-access
  sd = _state_dict(parts.params["unet"], unet_rename, compvis.UNET_PREFIX,
                   lambda n: n[-2] in ("proj_in", "proj_out") and "ff" not in n)
  sd.update(_state_dict(parts.codec_params, compvis._vae_rename, compvis.VAE_PREFIX,  # pylint: disable=protected-access
                        lambda n: True))
  clip = dict(config[stage].conditioning.clip)
  for k, v in fmt.text_encoder_state_dict(parts.params["text"],
                                       int(clip["num_hidden_layers"])).items():
    sd[CLIP_PREFIX + k] = v
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  save_file(sd, path)
  import yaml  # pylint: disable=g-import-not-at-top
  with open(yaml_path, "w", encoding="utf-8") as f:
    yaml.safe_dump(json.loads(json.dumps(cv)), f, sort_keys=False)
  return path, yaml_path

