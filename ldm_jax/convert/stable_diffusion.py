"""Stable Diffusion (diffusers folder or CompVis checkpoint) -> an ldm_jax workdir.

The architecture comes from the component configs, the weights from the converters
(`diffusers_models`, `compvis`, `clip`), the schedule and the timestep spacing from
scheduler/scheduler_config.json (or the CompVis yaml), the latent scale from the VAE's
`scaling_factor` (0.18215 for SD 1.x/2.x). The result is sampled like a trained workdir:

  python -m ldm_jax.convert diffusers <sd folder> <workdir>
  python sample.py --workdir=<workdir> --prompt "a photo of an astronaut" --guidance=7.5
"""
import os
from typing import Any, Mapping

import ml_collections

from ldm_jax.convert import clip as convert_clip
from ldm_jax.convert import weights
from ldm_jax.convert.workdir import base_config, write_workdir
from ldm_jax.errors import UserError

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "tokenizer.json")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# diffusers beta_schedule -> ours (diffusers' squaredcos_cap_v2 is Nichol & Dhariwal's cosine).
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear",
                  "squaredcos_cap_v2": "cosine"}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def schedule_settings(sched: Mapping[str, Any]) -> tuple[dict, dict]:
  """(config.ldm.diffusion values, config.ldm.scheduler sampler options) from a diffusers
  scheduler_config.json dict."""
  missing = [k for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
             if k not in sched]
  if missing:
    raise UserError(f"scheduler_config.json lacks keys {missing}")
  if sched.get("trained_betas") is not None:
    raise UserError("scheduler_config.json trained_betas is not supported")
  kind = sched["beta_schedule"]
  if kind not in BETA_SCHEDULES:
    raise UserError(f"scheduler_config.json beta_schedule={kind!r} is not supported "
                    f"(one of {sorted(BETA_SCHEDULES)})")
  pred = sched.get("prediction_type", "epsilon")
  if pred not in PREDICTION_TYPES:
    raise UserError(f"scheduler_config.json prediction_type={pred!r} is not supported "
                    f"(one of {sorted(PREDICTION_TYPES)})")
  spacing = sched.get("timestep_spacing", "leading")
  if spacing not in ("leading", "linspace", "trailing"):
    raise UserError(f"scheduler_config.json timestep_spacing={spacing!r} is not supported")
  diffusion = dict(schedule=BETA_SCHEDULES[kind], num_timesteps=int(sched["num_train_timesteps"]),
                   beta_start=float(sched["beta_start"]), beta_end=float(sched["beta_end"]),
                   zero_terminal_snr=bool(sched.get("rescale_betas_zero_snr", False)),
                   parameterization=PREDICTION_TYPES[pred])
  options = dict(timestep_spacing=spacing, steps_offset=int(sched.get("steps_offset", 0)),
                 set_alpha_to_one=bool(sched.get("set_alpha_to_one", False)),
                 clip_sample=float(sched.get("clip_sample_range", 1.0))
                 if sched.get("clip_sample", False) else 0.0)
  return diffusion, options


def sd_config(*, unet_cfg: dict, ae_cfg: dict, clip_cfg: dict, image_size: int,
              image_channels: int, latent_scale: float, diffusion: dict, scheduler: dict,
              max_length: int) -> ml_collections.ConfigDict:
  """configs/ldm.py's schema with a converted text-to-image model filled in."""
  c = base_config()
  c.data.update(image_size=int(image_size), channels=int(image_channels))
  c.autoencoder.update(ae_cfg)
  c.ldm.unet.update(unet_cfg)
  if "use_transformer" not in unet_cfg:
    c.ldm.unet.use_transformer = True  # cross-attention lives in the SpatialTransformers
  c.ldm.conditioning.update(kind="clip", drop_prob=0.0, text_width=int(clip_cfg["hidden_size"]),
                            max_length=int(max_length))
  c.ldm.conditioning.clip = ml_collections.ConfigDict(dict(clip_cfg))
  c.ldm.conditioning.tokenizer = "tokenizer"  # relative to the workdir
  c.ldm.diffusion.update(diffusion)
  c.ldm.diffusion.latent_scale = float(latent_scale)
  c.ldm.scheduler = ml_collections.ConfigDict(dict(scheduler))
  c.ldm.sample.update(guidance=7.5, steps=50, num_samples=4)
  return c


def convert_diffusers(folder: str, workdir: str) -> ml_collections.ConfigDict:
  """A diffusers StableDiffusionPipeline folder (model_index.json, unet/, vae/, text_encoder/,
  tokenizer/, scheduler/) -> workdir. Returns the written config."""
  from ldm_jax.convert import diffusers_models  # pylint: disable=g-import-not-at-top
  index = weights.read_json(os.path.join(folder, "model_index.json"))
  missing = [c for c in COMPONENTS if c not in index or not os.path.isdir(os.path.join(folder, c))]
  if missing:
    raise UserError(f"{folder!r} is not a Stable Diffusion folder: components {missing} missing "
                    "(model_index.json and sub-folders)")
  unet_cfg, unet_params = diffusers_models.unet_from_diffusers(
      *weights.load_component(os.path.join(folder, "unet")))
  vae_json, vae_sd = weights.load_component(os.path.join(folder, "vae"))
  ae_cfg, ae_params = diffusers_models.vae_from_diffusers(vae_json, vae_sd)
  clip_cfg, clip_params = convert_clip.convert(
      *weights.load_component(os.path.join(folder, "text_encoder")))
  sched = weights.read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
  diffusion, options = schedule_settings(sched)
  unet_json = weights.read_json(os.path.join(folder, "unet", "config.json"))
  tok_dir = os.path.join(folder, "tokenizer")
  tok_cfg_path = os.path.join(tok_dir, "tokenizer_config.json")
  max_length = 77
  if os.path.isfile(tok_cfg_path):
    max_length = int(weights.read_json(tok_cfg_path).get("model_max_length", 77))
  max_length = min(max_length, clip_cfg["max_position_embeddings"])
  if unet_cfg.get("context_dim") not in (None, 0, clip_cfg["hidden_size"]):
    raise UserError(f"unet cross_attention_dim={unet_cfg['context_dim']} != text encoder "
                    f"hidden_size={clip_cfg['hidden_size']}")
  f = 2 ** (len(ae_cfg["ch_mult"]) - 1)
  size = int(unet_json.get("sample_size", 64))
  latent_shape = (size, size, int(unet_json.get("out_channels", 4)))
  scale = float(vae_json.get("scaling_factor", 0.18215))
  config = sd_config(unet_cfg=unet_cfg, ae_cfg=ae_cfg, clip_cfg=clip_cfg, image_size=size * f,
                     image_channels=int(vae_json.get("in_channels", 3)), latent_scale=scale,
                     diffusion=diffusion, scheduler=options, max_length=max_length)
  write_workdir(workdir, config, ae_params, {"unet": unet_params, "text": clip_params},
                latent_shape=latent_shape, latent_scale=scale,
                source=f"diffusers:{os.path.abspath(folder)}", tokenizer_dir=tok_dir,
                tokenizer_files=TOKENIZER_FILES)
  return config
