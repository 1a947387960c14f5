"""Per-stage sampling settings from a command line: `--guidance=3,1,1 --steps=50,20,20`.

One value applies to every stage, a comma list gives one per stage (a cascade's base first;
`aug_level` may list the super-resolution stages only), an absent flag means each stage's
own config.<stage>.sample (and lowres.sample_aug_level). Used by sample.py and
`python -m ldm_jax.evaluate`; the pipelines check the values.
"""
from typing import Optional, Sequence

from ldm_jax.diffusion.samplers import SAMPLERS
from ldm_jax.diffusion.thresholding import KINDS
from ldm_jax.errors import UserError

PARSERS = {"sampler": str, "steps": int, "guidance": float, "eta": float,
           "thresholding": str, "aug_level": float}
CHOICES = {"sampler": tuple(SAMPLERS), "thresholding": KINDS}


def parse(name: str, values) -> Optional[list]:
  """A flag's value (a string "3,1,1", a list of strings as absl's DEFINE_list gives, a number
  or None) as a list of typed values, or None when not given; one line naming the flag when
  a value is bad."""
  if values is None:
    return None
  if isinstance(values, str):
    values = values.split(",")
  elif not isinstance(values, (list, tuple)):
    values = [values]
  values = [v.strip() if isinstance(v, str) else v for v in values]
  if not values or any(v == "" for v in values):
    raise UserError(f"--{name}={','.join(map(str, values))}: empty value")
  out = []
  for v in values:
    try:
      x = PARSERS[name](v)
    except (TypeError, ValueError) as e:
      raise UserError(f"--{name}={','.join(map(str, values))}: {v!r} is not a "
                      f"{PARSERS[name].__name__}") from e
    if name in CHOICES and x not in CHOICES[name]:
      raise UserError(f"--{name}={x}: one of {', '.join(CHOICES[name])}")
    if name == "steps" and x < 1:
      raise UserError(f"--steps={x} must be at least 1")
    if name in ("guidance", "eta", "aug_level") and not (x == x and abs(x) != float("inf")):
      raise UserError(f"--{name}={v} must be a finite number")
    if name == "eta" and x < 0:
      raise UserError(f"--eta={x} must be at least 0")
    if name == "aug_level" and not 0 <= x < 1:
      raise UserError(f"--aug_level={x} must be in [0, 1)")
    out.append(x)
  return out


def parse_all(**flags) -> dict:
  """{name: list or None} for the per-stage flags given as keywords."""
  return {name: parse(name, value) for name, value in flags.items()}


def sample_kwargs(pipe, given: dict) -> dict:
  """The keywords of `pipe.sample` for parsed flags `given`: per-stage lists for a cascade
  (resolved against each stage's own settings), single values for one stage (its own
  config.<stage>.sample where a flag is absent)."""
  stages = getattr(pipe, "stages", None)
  if stages is not None:
    settings = pipe.stage_settings(**given)
    return {k: [s[k] for s in settings] for k in settings[0]}
  out = dict(pipe.sample_defaults)
  for name, values in given.items():
    if values is None or name == "aug_level":
      continue
    if len(values) != 1:
      raise UserError(f"--{name}={','.join(map(str, values))}: this workdir has one stage "
                      f"({pipe.name}): give one value")
    out[name] = values[0]
  return out


def total_steps(kwargs: dict) -> int:
  """Sampler steps of one sample call over all its stages."""
  steps = kwargs["steps"]
  return int(sum(steps)) if isinstance(steps, (list, tuple)) else int(steps)


def recorded(pipe, kwargs: dict) -> dict:
  """What a run records of its settings (sampling.json, eval json): per stage for a
  cascade, with the thresholding rule each stage used."""
  stages: Sequence = getattr(pipe, "stages", None) or [pipe]
  rules = []
  for i, st in enumerate(stages):
    rule = kwargs.get("thresholding")
    rule = rule[i] if isinstance(rule, (list, tuple)) else rule
    resolved = st.resolve_thresholding(rule)
    rules.append("none" if resolved is None else resolved.describe())
  out = {k: v for k, v in kwargs.items() if k in PARSERS and k != "thresholding"}
  out["thresholding"] = rules if len(stages) > 1 else rules[0]
  return out
