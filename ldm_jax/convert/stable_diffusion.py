"""Stable Diffusion (diffusers folder or CompVis checkpoint) -> an ldm_jax workdir.

The architecture comes from the component configs, the weights from the converters
(`diffusers_models`, `compvis`, `clip`), the schedule and the sampler options (timestep
spacing, DPM-Solver++'s Karras sigmas and final sigma, ...) from
scheduler/scheduler_config.json (or the CompVis yaml), the latent scale from the VAE's
`scaling_factor` (0.18215 for SD 1.x/2.x). Every key of every diffusers config is implemented
or refused (`config_keys`), and all configs are checked, alone and against each other (the
UNet's channels against the VAE's latent channels), before any weight is read. The result is
sampled like a trained workdir:

  python -m ldm_jax.convert diffusers <sd folder> <workdir>
  python sample.py --workdir=<workdir> --prompt "a photo of an astronaut" --guidance=7.5
"""
import os
from typing import Any, Mapping

import ml_collections

from ldm_jax.convert import clip as convert_clip
from ldm_jax.convert import config_keys
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
  scheduler_config.json dict. Every key is checked (`config_keys.SCHEDULER`); keys the file
  leaves out take the defaults of its `_class_name` (as diffusers' loader fills them), or,
  for a key that class lacks, the sampler's own (None)."""
  what = "scheduler_config.json"
  kind = sched.get("_class_name")
  if kind is not None and kind not in config_keys.SCHEDULER_CLASS_DEFAULTS:
    raise UserError(f"{what} _class_name={kind!r} is not supported: no ldm_jax sampler "
                    f"reproduces it (one of {', '.join(sorted(config_keys.SCHEDULER_CLASS_DEFAULTS))})")
  config_keys.check(sched, config_keys.SCHEDULER, what)
  if kind == "PNDMScheduler" and sched.get("skip_prk_steps") is not True:
    raise UserError(f"{what} PNDMScheduler with skip_prk_steps={sched.get('skip_prk_steps')!r} "
                    "is not supported (only True: the PLMS steps Stable Diffusion uses)")
  missing = [k for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
             if k not in sched]
  if missing:
    raise UserError(f"{what} lacks keys {missing}")
  get = {**config_keys.SCHEDULER_CLASS_DEFAULTS.get(kind, {}), **sched}.get
  beta = sched["beta_schedule"]
  if beta not in BETA_SCHEDULES:
    raise UserError(f"{what} beta_schedule={beta!r} is not supported "
                    f"(one of {sorted(BETA_SCHEDULES)})")
  pred = sched.get("prediction_type", "epsilon")
  if pred not in PREDICTION_TYPES:
    raise UserError(f"{what} prediction_type={pred!r} is not supported "
                    f"(one of {sorted(PREDICTION_TYPES)})")
  spacing = get("timestep_spacing")
  if spacing not in (None, "leading", "linspace", "trailing"):
    raise UserError(f"{what} timestep_spacing={spacing!r} is not supported")
  final = get("final_sigmas_type")
  if final not in (None, "zero", "sigma_min"):
    raise UserError(f"{what} final_sigmas_type={final!r} is not supported ('zero', "
                    "'sigma_min')")
  karras = get("use_karras_sigmas")
  if karras and beta == "squaredcos_cap_v2":
    # diffusers then keeps fractional timesteps, which our integer-timestep models lack.
    raise UserError(f"{what} use_karras_sigmas=True with beta_schedule={beta!r} is not "
                    "supported (fractional timesteps)")
  for key in ("steps_offset", "num_train_timesteps"):
    value = get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
      raise UserError(f"{what} {key}={value!r} is not supported (an int)")
  flags = {}
  for key in ("set_alpha_to_one", "clip_sample", "use_karras_sigmas", "lower_order_final",
              "rescale_betas_zero_snr"):
    value = get(key)
    if value is not None and not isinstance(value, bool):
      raise UserError(f"{what} {key}={value!r} is not supported (true or false)")
    flags[key] = value
  diffusion = dict(schedule=BETA_SCHEDULES[beta], num_timesteps=int(sched["num_train_timesteps"]),
                   beta_start=float(sched["beta_start"]), beta_end=float(sched["beta_end"]),
                   zero_terminal_snr=bool(flags["rescale_betas_zero_snr"]),
                   parameterization=PREDICTION_TYPES[pred])
  options = dict(timestep_spacing=spacing, steps_offset=int(get("steps_offset") or 0),
                 set_alpha_to_one=bool(flags["set_alpha_to_one"]),
                 clip_sample=float(get("clip_sample_range", 1.0)) if flags["clip_sample"]
                 else 0.0)
  # DPM-Solver++ options: only where the file's class (or the file) sets them, so a workdir
  # converted from a DDIM folder keeps DPM-Solver++'s diffusers defaults.
  for key, value in (("use_karras_sigmas", flags["use_karras_sigmas"]),
                     ("final_sigmas_type", final),
                     ("lower_order_final", flags["lower_order_final"])):
    if value is not None:
      options[key] = value
  return diffusion, options


def scheduler_sampler(sched: Mapping[str, Any]) -> str:
  """The sampler that reproduces a scheduler_config.json's class (`schedule_settings` checks
  the file); DDIM for a file without `_class_name`."""
  return config_keys.SCHEDULER_CLASS_SAMPLER.get(sched.get("_class_name"), "ddim")


def sd_config(*, unet_cfg: dict, ae_cfg: dict, clip_cfg: dict, image_size: int,
              image_channels: int, latent_scale: float, diffusion: dict, scheduler: dict,
              max_length: int, sampler: str = "ddim") -> ml_collections.ConfigDict:
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
  c.ldm.sample.update(guidance=7.5, steps=50, num_samples=4, sampler=sampler)
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
  # Every config is checked before any weight is read.
  config_of = lambda c: weights.read_json(os.path.join(folder, c, "config.json"))  # noqa: E731
  unet_json, vae_json, text_json = config_of("unet"), config_of("vae"), config_of("text_encoder")
  sched = weights.read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
  unet_cfg, kind = diffusers_models.unet_config_from_diffusers(unet_json)
  if kind != "UNet2DConditionModel":
    raise UserError(f"unet/config.json _class_name={kind!r}: a Stable Diffusion folder needs "
                    "a text-conditional UNet2DConditionModel")
  diffusers_models.vae_config_from_diffusers(vae_json)
  clip_cfg = convert_clip.config_from_transformers(text_json)
  diffusion, options = schedule_settings(sched)
  latent = vae_json.get("latent_channels", 4)
  for key in ("in_channels", "out_channels"):
    if unet_json.get(key, 4) != latent:
      raise UserError(f"unet/config.json {key}={unet_json.get(key, 4)!r} != vae/config.json "
                      f"latent_channels={latent!r}: the UNet must denoise the VAE's latents "
                      "(inpainting and depth UNets with extra input channels are not supported)")
  if unet_cfg.get("context_dim") not in (None, 0, clip_cfg["hidden_size"]):
    raise UserError(f"unet/config.json cross_attention_dim={unet_cfg['context_dim']} != "
                    f"text_encoder/config.json hidden_size={clip_cfg['hidden_size']}")
  unet_cfg, unet_params = diffusers_models.unet_from_diffusers(
      *weights.load_component(os.path.join(folder, "unet")))
  ae_cfg, ae_params = diffusers_models.vae_from_diffusers(
      *weights.load_component(os.path.join(folder, "vae")))
  clip_cfg, clip_params = convert_clip.convert(
      *weights.load_component(os.path.join(folder, "text_encoder")))
  tok_dir = os.path.join(folder, "tokenizer")
  tok_cfg_path = os.path.join(tok_dir, "tokenizer_config.json")
  max_length = 77
  if os.path.isfile(tok_cfg_path):
    max_length = int(weights.read_json(tok_cfg_path).get("model_max_length", 77))
  max_length = min(max_length, clip_cfg["max_position_embeddings"])
  f = 2 ** (len(ae_cfg["ch_mult"]) - 1)
  size = int(unet_json.get("sample_size") or 64)
  latent_shape = (size, size, int(latent))
  scale = float(vae_json.get("scaling_factor", 0.18215))
  config = sd_config(unet_cfg=unet_cfg, ae_cfg=ae_cfg, clip_cfg=clip_cfg, image_size=size * f,
                     image_channels=int(vae_json.get("in_channels", 3)), latent_scale=scale,
                     diffusion=diffusion, scheduler=options, max_length=max_length,
                     sampler=scheduler_sampler(sched))
  write_workdir(workdir, config, ae_params, {"unet": unet_params, "text": clip_params},
                latent_shape=latent_shape, latent_scale=scale,
                source=f"diffusers:{os.path.abspath(folder)}", tokenizer_dir=tok_dir,
                tokenizer_files=TOKENIZER_FILES)
  return config


# --- CompVis / Stability single-file checkpoints. ---

CLIP_PREFIX = "cond_stage_model.transformer."
# CompVis beta_schedule names -> ours (see ldm_jax/diffusion/schedules.py).
COMPVIS_BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}
# Stable Diffusion 1.x's configs/stable-diffusion/v1-inference.yaml (the values that matter).
PRESETS = {
    "v1-inference": {"model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 64,
        "channels": 4, "scale_factor": 0.18215,
        "unet_config": {"params": {
            "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1,
            "context_dim": 768, "legacy": False}},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
            "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
            "dropout": 0.0}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}},
}


def load_compvis_config(config: str) -> dict:
  """A CompVis yaml file (yaml.safe_load) or a PRESETS name -> its `model.params` dict."""
  if config in PRESETS:
    data = PRESETS[config]
  elif os.path.isfile(config):
    import yaml  # pylint: disable=g-import-not-at-top
    with open(config, encoding="utf-8") as f:
      data = yaml.safe_load(f)
  else:
    raise UserError(f"--config {config!r} is neither a file nor a preset "
                    f"({', '.join(sorted(PRESETS))})")
  try:
    params = data["model"]["params"]
    for key in ("unet_config", "first_stage_config", "cond_stage_config"):
      params[key]  # pylint: disable=pointless-statement
  except (KeyError, TypeError) as e:
    raise UserError(f"--config {config!r} lacks model.params.{e.args[0] if e.args else '?'} "
                    "(a CompVis latent diffusion yaml)") from e
  return params


def clip_config_from_state_dict(state_dict: Mapping[str, Any], num_heads: int = 0) -> dict:
  """CLIPTextConfig fields read off the weights' shapes (CompVis files carry no config):
  quick_gelu and, unless `num_heads` is given, 64-wide heads, as OpenAI's CLIP text towers."""
  p = convert_clip.PREFIX
  try:
    vocab, width = state_dict[p + "embeddings.token_embedding.weight"].shape
    positions = state_dict[p + "embeddings.position_embedding.weight"].shape[0]
    inner = state_dict[p + "encoder.layers.0.mlp.fc1.weight"].shape[0]
  except KeyError as e:
    raise UserError(f"checkpoint lacks the CLIP text encoder weight {CLIP_PREFIX}{e.args[0]}") \
        from e
  layers = 1 + max(int(k[len(p + "encoder.layers."):].split(".")[0]) for k in state_dict
                   if k.startswith(p + "encoder.layers."))
  return dict(vocab_size=int(vocab), hidden_size=int(width), intermediate_size=int(inner),
              num_hidden_layers=layers,
              num_attention_heads=int(num_heads) or max(int(width) // 64, 1),
              max_position_embeddings=int(positions), hidden_act="quick_gelu",
              layer_norm_eps=1e-5)


def convert_compvis(checkpoint: str, workdir: str, config: str,
                    tokenizer: str | None = None) -> ml_collections.ConfigDict:
  """A CompVis / Stability SD 1.x checkpoint (.ckpt or .safetensors) + its yaml (or a preset)
  + a CLIP tokenizer folder -> workdir. Returns the written config."""
  from ldm_jax.convert import compvis  # pylint: disable=g-import-not-at-top
  params = load_compvis_config(config)
  target = params["cond_stage_config"].get("target", "")
  if not target.endswith("FrozenCLIPEmbedder"):
    raise UserError(f"cond_stage_config target={target!r} is not supported "
                    "(FrozenCLIPEmbedder, SD 1.x)")
  if tokenizer is None:
    raise UserError("--tokenizer is required: a folder with CLIP's vocab.json and merges.txt "
                    "(e.g. the tokenizer/ folder of a diffusers SD 1.x model)")
  from ldm_jax.models.conditioning import ClipTokenizer  # pylint: disable=g-import-not-at-top
  ClipTokenizer(tokenizer)  # fail now on a bad folder
  state = weights.load_file(checkpoint)
  unet_cfg, unet_params = compvis.unet_from_compvis(params["unet_config"], state)
  ae_cfg, ae_params = compvis.vae_from_compvis(params["first_stage_config"], state)
  clip_state = {k[len(CLIP_PREFIX):]: v for k, v in state.items() if k.startswith(CLIP_PREFIX)}
  clip_state = {(k if k.startswith(convert_clip.PREFIX) else convert_clip.PREFIX + k): v
                for k, v in clip_state.items()}
  # cond_stage_config.params.num_attention_heads (our key) for non-standard CLIP widths.
  heads = (params["cond_stage_config"].get("params") or {}).get("num_attention_heads", 0)
  clip_cfg = clip_config_from_state_dict(clip_state, heads)
  clip_params = convert_clip.params_from_transformers(clip_cfg, clip_state)
  kind = params.get("beta_schedule", "linear")
  if kind not in COMPVIS_BETA_SCHEDULES:
    raise UserError(f"--config beta_schedule={kind!r} is not supported "
                    f"(one of {sorted(COMPVIS_BETA_SCHEDULES)})")
  pred = params.get("parameterization", "eps")
  if pred not in ("eps", "v", "x0"):
    raise UserError(f"--config parameterization={pred!r} is not supported (eps, v, x0)")
  diffusion = dict(schedule=COMPVIS_BETA_SCHEDULES[kind],
                   num_timesteps=int(params.get("timesteps", 1000)),
                   beta_start=float(params.get("linear_start", 0.00085)),
                   beta_end=float(params.get("linear_end", 0.012)), zero_terminal_snr=False,
                   parameterization=pred)
  # CompVis' DDIM ('uniform' discretisation) visits T/N k + 1, ending at abar_0.
  options = dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                 clip_sample=0.0)
  size = int(params.get("image_size", 64))
  latent_shape = (size, size, int(params.get("channels", 4)))
  scale = float(params.get("scale_factor", 1.0))
  f = 2 ** (len(ae_cfg["ch_mult"]) - 1)
  image_channels = int(params["first_stage_config"].get("params", params["first_stage_config"])
                       ["ddconfig"]["in_channels"])
  cfg = sd_config(unet_cfg=unet_cfg, ae_cfg=ae_cfg, clip_cfg=clip_cfg, image_size=size * f,
                  image_channels=image_channels, latent_scale=scale, diffusion=diffusion,
                  scheduler=options, max_length=min(77, clip_cfg["max_position_embeddings"]))
  write_workdir(workdir, cfg, ae_params, {"unet": unet_params, "text": clip_params},
                latent_shape=latent_shape, latent_scale=scale,
                source=f"compvis:{os.path.abspath(checkpoint)}", tokenizer_dir=tokenizer,
                tokenizer_files=TOKENIZER_FILES)
  return cfg
