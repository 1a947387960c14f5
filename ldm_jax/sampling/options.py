"""What a stage's config says about sampling: its scheduler options (diffusers'
scheduler_config.json terms, `config.<stage>.scheduler`), its x_0 thresholding and its own
sampler, steps, guidance and eta (`config.<stage>.sample`), as the samplers' keywords."""
from typing import Optional

import ml_collections

from ldm_jax.diffusion import thresholding as thresholding_lib
from ldm_jax.errors import UserError

# config.<stage>.scheduler keys (diffusers scheduler_config.json terms) -> sampler keywords.
SCHEDULER_OPTIONS = ("timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample",
                     "use_karras_sigmas", "final_sigmas_type", "lower_order_final")


# Imagen's dynamic thresholding has no upper bound on s (0 = none).
DYNAMIC_MAX_VALUE = 0.0


def stage_thresholding(block: ml_collections.ConfigDict):
  """config.<stage>.sample's thresholding (None when 'none' or absent: older workdirs)."""
  s = block.sample
  try:
    return thresholding_lib.from_options(s.get("thresholding", "none"),
                                         s.get("dynamic_ratio", 0.995),
                                         s.get("sample_max_value", 1.0))
  except ValueError as e:
    raise UserError(f"config.<stage>.sample: {e}") from e


def stage_sample_defaults(block: ml_collections.ConfigDict) -> dict:
  """config.<stage>.sample's sampler, steps, guidance and eta."""
  return {k: block.sample[k] for k in ("sampler", "steps", "guidance", "eta")}


def scheduler_options(config: ml_collections.ConfigDict, stage: str = "ldm") -> dict:
  """config.<stage>.scheduler as a dict ({} when absent: each sampler's defaults)."""
  opts = config[stage].get("scheduler", None)
  return {} if opts is None else dict(opts.to_dict() if hasattr(opts, "to_dict") else opts)


def sampler_kwargs(sampler: str, options: dict) -> dict:
  """Sampler keywords from SCHEDULER_OPTIONS values."""
  kwargs = {}
  if options.get("timestep_spacing") is not None:
    kwargs["spacing"] = options["timestep_spacing"]
  if options.get("steps_offset") is not None:
    kwargs["steps_offset"] = int(options["steps_offset"])
  if sampler in ("ddim", "pndm") and options.get("set_alpha_to_one") is not None:
    kwargs["set_alpha_to_one"] = bool(options["set_alpha_to_one"])
  rule = options.get("thresholding")
  if rule is None and sampler in ("ddpm", "ddim") and options.get("clip_sample"):
    # A converted diffusers scheduler's clip_sample (DDPM/DDIM only, as there).
    rule = thresholding_lib.Thresholding("static", max_value=float(options["clip_sample"]))
  if rule is not None and rule.active:
    kwargs["thresholding"] = rule
    if sampler == "ddim":
      kwargs["recompute_eps"] = bool(options.get("use_clipped_model_output", False))
  # DPMSolverMultistepScheduler's options ("DPM++ 2M Karras"), EulerDiscreteScheduler's.
  keys = {"dpmpp_2m": ("use_karras_sigmas", "lower_order_final"),
          "euler": ("use_karras_sigmas",)}.get(sampler, ())
  for key in keys:
    if options.get(key) is not None:
      kwargs[key] = bool(options[key])
  if sampler in ("dpmpp_2m", "euler") and options.get("final_sigmas_type") is not None:
    kwargs["final_sigmas_type"] = str(options["final_sigmas_type"])
  return kwargs


def resolve_thresholding(default: Optional[thresholding_lib.Thresholding], thresholding=None):
  """The Thresholding a call uses (None: leave x_0 alone): `thresholding` given as a kind
  ('none', 'static', 'dynamic') or a Thresholding, else the stage's `default`."""
  if thresholding is None:
    return default
  if isinstance(thresholding, thresholding_lib.Thresholding):
    return thresholding if thresholding.active else None
  default = default or thresholding_lib.Thresholding()
  kind = str(thresholding)
  if kind not in thresholding_lib.KINDS:
    raise UserError(f"thresholding={kind!r}: one of {', '.join(thresholding_lib.KINDS)}")
  if kind == "none":
    return None
  if kind == default.kind:
    return default
  return thresholding_lib.Thresholding(
      kind, default.ratio, 1.0 if kind == "static" else DYNAMIC_MAX_VALUE)
