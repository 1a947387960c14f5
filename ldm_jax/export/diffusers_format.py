"""ldm_jax parameters and configs -> diffusers configs and state dicts (the converters run
backwards), pure numpy.

The names come from the same `rename` the importer uses (`convert.diffusers_models`): each of
our leaves is written where the importer reads it, with the layout turned back (HWIO -> OIHW
convolutions, (in, out) -> (out, in) linears or 1x1 convolutions, our fused q/k/v split into
to_q / to_k / to_v). Configs are built so that the importer reads our own config back: an
architecture that does not round-trip (a setting diffusers has no key for) is refused with one
line naming the key, so an exported folder is never a different model.
"""
from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import numpy as np

from ldm_jax.convert import diffusers_models as dm
from ldm_jax.convert.torch_params import _TORCH_LEAF, Fused, Source
from ldm_jax.errors import UserError

# Our sampler -> the diffusers scheduler class that runs it (the inverse of the converter's).
SCHEDULER_CLASS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
                   "dpmpp_2m": "DPMSolverMultistepScheduler",
                   "euler": "EulerDiscreteScheduler",
                   "euler_a": "EulerAncestralDiscreteScheduler"}
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear",
                  "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _check_round_trip(ours: Mapping[str, Any], back: Mapping[str, Any], what: str) -> None:
  """UserError naming the first key whose value the importer would read differently."""
  for key, value in back.items():
    mine = ours.get(key, value)
    same = (tuple(mine) == tuple(value) if isinstance(value, (list, tuple)) else mine == value)
    if not same:
      raise UserError(f"{what}: {key}={mine!r} has no diffusers equivalent (it would be read "
                      f"back as {value!r}); not exported")


def unet_config(unet: Mapping[str, Any], *, in_channels: int, out_channels: int,
                sample_size: int, num_classes: int = 0) -> Dict[str, Any]:
  """config.ldm.unet -> a diffusers UNet2DModel (self-attention, class labels) or
  UNet2DConditionModel (cross-attention) config that imports back to the same UNet."""
  u = dict(unet)
  n = len(u["channel_mult"])
  levels = set(u["attention_levels"])
  common = dict(
      sample_size=int(sample_size), in_channels=int(in_channels),
      out_channels=int(out_channels), layers_per_block=int(u["num_res_blocks"]),
      block_out_channels=[int(u["model_channels"] * m) for m in u["channel_mult"]],
      norm_num_groups=int(u["num_groups"]), norm_eps=float(u["norm_eps"]),
      downsample_padding=1 if u["symmetric_downsample"] else 0,
      flip_sin_to_cos=bool(u["flip_sin_to_cos"]), freq_shift=int(u["freq_shift"]),
      resnet_time_scale_shift="scale_shift" if u["scale_shift_norm"] else "default",
      dropout=float(u.get("dropout", 0.0)))
  if u.get("use_transformer"):
    kind = "UNet2DConditionModel"
    heads = list(u["level_heads"]) if u.get("level_heads") else int(u["num_heads"])
    depth = (list(u["level_transformer_depth"]) if u.get("level_transformer_depth")
             else int(u["transformer_depth"]))
    cfg = dict(common, _class_name=kind, cross_attention_dim=int(u["context_dim"]),
               attention_head_dim=heads, transformer_layers_per_block=depth,
               down_block_types=["CrossAttnDownBlock2D" if i in levels else "DownBlock2D"
                                 for i in range(n)],
               up_block_types=["CrossAttnUpBlock2D" if i in levels else "UpBlock2D"
                               for i in reversed(range(n))])
  else:
    kind = "UNet2DModel"
    if u.get("level_heads") or u["num_head_channels"] <= 0:
      raise UserError("config.ldm.unet: a self-attention UNet exports with num_head_channels "
                      f"> 0 and no level_heads (diffusers' attention_head_dim); got "
                      f"num_head_channels={u['num_head_channels']}, "
                      f"level_heads={tuple(u.get('level_heads', ()))}")
    u["num_heads"] = 1  # unused when num_head_channels > 0 (what the importer reads back)
    cfg = dict(common, _class_name=kind, attention_head_dim=int(u["num_head_channels"]),
               attn_norm_num_groups=int(u["num_groups"]),
               add_attention=bool(u["mid_attention"]),
               down_block_types=["AttnDownBlock2D" if i in levels else "DownBlock2D"
                                 for i in range(n)],
               up_block_types=["AttnUpBlock2D" if i in levels else "UpBlock2D"
                               for i in reversed(range(n))])
    if num_classes:
      cfg["num_class_embeds"] = int(num_classes) + 1  # our null label is the last row
  back, _ = dm.unet_config_from_diffusers(cfg)
  _check_round_trip(u, back, f"config.ldm.unet ({kind})")
  return cfg


def vae_config(ae: Mapping[str, Any], *, image_channels: int, image_size: int,
               latent_scale: float) -> Dict[str, Any]:
  """config.autoencoder -> a diffusers AutoencoderKL config that imports back to it."""
  a = dict(ae)
  if a["embed_dim"] != a["z_channels"]:
    raise UserError(f"config.autoencoder: embed_dim={a['embed_dim']} != z_channels="
                    f"{a['z_channels']} has no diffusers AutoencoderKL equivalent")
  n, levels = len(a["ch_mult"]), set(a["attn_levels"])
  cfg = dict(
      _class_name="AutoencoderKL", in_channels=int(image_channels),
      out_channels=int(image_channels), sample_size=int(image_size),
      block_out_channels=[int(a["ch"] * m) for m in a["ch_mult"]],
      down_block_types=["AttnDownEncoderBlock2D" if i in levels else "DownEncoderBlock2D"
                        for i in range(n)],
      up_block_types=["AttnUpDecoderBlock2D" if i in levels else "UpDecoderBlock2D"
                      for i in reversed(range(n))],
      layers_per_block=int(a["num_res_blocks"]), latent_channels=int(a["z_channels"]),
      norm_num_groups=int(a["num_groups"]), act_fn="silu",
      mid_block_add_attention=bool(a["mid_attention"]),
      use_quant_conv=bool(a["quant_conv"]), use_post_quant_conv=bool(a["quant_conv"]),
      scaling_factor=float(latent_scale))
  back = dm.vae_config_from_diffusers(cfg)
  _check_round_trip(a, back, "config.autoencoder")
  return cfg


def scheduler_config(diffusion: Mapping[str, Any], options: Mapping[str, Any],
                     sampler: str) -> Dict[str, Any]:
  """The diffusers scheduler of a stage's sampler: its schedule (config.<stage>.diffusion) and
  timestep options (config.<stage>.scheduler, else the sampler's defaults as ldm_jax runs
  them)."""
  if sampler not in SCHEDULER_CLASS:
    raise UserError(f"sample.sampler={sampler!r} has no diffusers scheduler")
  beta = diffusion["schedule"]
  if beta not in BETA_SCHEDULES:
    raise UserError(f"diffusion.schedule={beta!r} has no diffusers beta_schedule")
  kind = SCHEDULER_CLASS[sampler]
  cfg = dict(_class_name=kind, num_train_timesteps=int(diffusion["num_timesteps"]),
             beta_start=float(diffusion["beta_start"]), beta_end=float(diffusion["beta_end"]),
             beta_schedule=BETA_SCHEDULES[beta],
             prediction_type=PREDICTION_TYPES[diffusion["parameterization"]],
             rescale_betas_zero_snr=bool(diffusion.get("zero_terminal_snr", False)))
  # ldm_jax's own defaults per sampler (samplers.py signatures), unless the workdir has
  # converted options.
  spacing = {"ddim": "leading", "ddpm": "leading", "pndm": "leading"}.get(sampler, "linspace")
  offset = {"ddim": 1, "pndm": 1}.get(sampler, 0)
  cfg["timestep_spacing"] = options.get("timestep_spacing") or spacing
  cfg["steps_offset"] = int(options.get("steps_offset", offset) if options.get(
      "steps_offset") is not None else offset)
  if sampler in ("ddim", "pndm"):
    cfg["set_alpha_to_one"] = bool(options.get("set_alpha_to_one", False) or False)
  if sampler in ("ddim", "ddpm"):
    clip = float(options.get("clip_sample", 0.0) or 0.0)
    cfg["clip_sample"] = clip > 0
    if clip > 0:
      cfg["clip_sample_range"] = clip
  if sampler == "pndm":
    cfg["skip_prk_steps"] = True
  if sampler in ("dpmpp_2m", "euler"):
    cfg["use_karras_sigmas"] = bool(options.get("use_karras_sigmas") or False)
    cfg["final_sigmas_type"] = options.get("final_sigmas_type") or "zero"
  if sampler == "dpmpp_2m":
    lof = options.get("lower_order_final")
    cfg["lower_order_final"] = True if lof is None else bool(lof)
  return cfg


def _torch_value(leaf: str, value: np.ndarray, shape: Tuple[int, ...], key: str) -> np.ndarray:
  if leaf == "kernel":
    value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  if tuple(value.shape) != tuple(shape):
    if value.size != int(np.prod(shape)):
      raise UserError(f"{key}: ours has shape {value.shape}, the diffusers model {shape}")
    value = value.reshape(shape)  # a linear layer stored as a 1x1 convolution
  return np.ascontiguousarray(value, np.float32)


def state_dict_from_params(params: Any, rename: Callable[[Tuple[str, ...]], Source],
                           shapes: Mapping[str, Tuple[int, ...]], what: str) -> Dict[str, Any]:
  """The diffusers state dict (key -> float32 numpy) of our `params`, for a model whose state
  dict has `shapes`; UserError listing keys that one side lacks."""
  out: Dict[str, np.ndarray] = {}

  def put(path, value):
    names = tuple(str(p.key) for p in path)
    source, leaf = rename(names[:-1]), names[-1]
    value = np.asarray(value, np.float32)
    if isinstance(source, Fused):
      parts = np.split(value.T if leaf == "kernel" else value, len(source.prefixes), axis=0)
      for prefix, part in zip(source.prefixes, parts):
        key = f"{prefix}.{_TORCH_LEAF[leaf]}"
        out[key] = _torch_value("bias", part, shapes.get(key, part.shape), key)
      return
    key = f"{source}.{_TORCH_LEAF[leaf]}"
    out[key] = _torch_value(leaf, value, shapes.get(key, ()), key)

  jax.tree_util.tree_map_with_path(put, params)
  missing, extra = set(shapes) - set(out), set(out) - set(shapes)
  if missing or extra:
    raise UserError(f"{what}: the exported state dict does not match diffusers' model "
                    f"(missing {sorted(missing)[:8]}, unknown {sorted(extra)[:8]})")
  return out


def unet_state_dict(params, unet_cfg: Mapping[str, Any], shapes, what: str):
  n = len(unet_cfg["channel_mult"])
  self_attn = dm.self_attention_paths(params)
  return state_dict_from_params(params, lambda p: dm.diffusers_rename(p, n, self_attn), shapes,
                                what)


def vae_state_dict(params, ae_cfg: Mapping[str, Any], shapes):
  n = len(ae_cfg["ch_mult"])
  self_attn = dm.self_attention_paths(params)
  return state_dict_from_params(params, lambda p: dm.diffusers_rename(p, n, self_attn), shapes,
                                "diffusers AutoencoderKL")


def text_encoder_state_dict(params: dict, num_layers: int) -> dict:
  """Our CLIPTextEncoder params -> transformers CLIPTextModel's state dict (the inverse of
  `convert.clip.params_from_transformers`)."""
  p = "text_model."
  dense = lambda d: {"weight": np.asarray(d["kernel"]).T, "bias": np.asarray(d["bias"])}  # noqa: E731
  norm = lambda d: {"weight": np.asarray(d["scale"]), "bias": np.asarray(d["bias"])}  # noqa: E731
  out = {p + "embeddings.token_embedding.weight": np.asarray(params["token_embedding"]["embedding"]),
         p + "embeddings.position_embedding.weight": np.asarray(params["position_embedding"])}
  parts = {"final_layer_norm": norm(params["final_layer_norm"])}
  for i in range(num_layers):
    layer, b = params[f"layers_{i}"], f"encoder.layers.{i}."
    parts[b + "layer_norm1"] = norm(layer["layer_norm1"])
    parts[b + "layer_norm2"] = norm(layer["layer_norm2"])
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
      parts[b + "self_attn." + n] = dense(layer["self_attn"][n])
    parts[b + "mlp.fc1"] = dense(layer["fc1"])
    parts[b + "mlp.fc2"] = dense(layer["fc2"])
  for name, leaves in parts.items():
    for leaf, value in leaves.items():
      out[f"{p}{name}.{leaf}"] = np.ascontiguousarray(value, np.float32)
  return out
