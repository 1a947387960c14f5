"""What a sampler does to its predicted x_0 at every step: nothing, static clipping or Imagen's
dynamic thresholding. Pure functions of x_0; the samplers apply them inside their scan.

  none     x_0 as predicted (latent spaces: latents are not bounded)
  static   clip to [-max_value, max_value] (DDPM, ADM: max_value 1)
  dynamic  Imagen (Saharia et al. 2022, sec. 2.3): per sample, s = the `ratio` quantile of
           |x_0| over all its pixels, s = clip(s, 1, max_value) (max_value 0: no upper bound,
           as in the paper), then x_0 = clip(x_0, -s, s) / s. With max_value = 1 this is static
           clipping. diffusers' `thresholding=True, dynamic_thresholding_ratio,
           sample_max_value` is the same operation (`from_diffusers`).

Written here rather than taken from a library: jax/optax/diffusers-flax have no jittable
thresholding of a batch of predictions (diffusers' is torch and scheduler-bound).
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

KINDS = ("none", "static", "dynamic")


@dataclasses.dataclass(frozen=True)
class Thresholding:
  """A static (hashable) thresholding rule; call it on x_0 [B, ...]."""
  kind: str = "none"
  ratio: float = 0.995
  max_value: float = 1.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown thresholding {self.kind!r} (sample.thresholding: one of "
                       f"{', '.join(repr(k) for k in KINDS)})")
    if not 0.0 < float(self.ratio) <= 1.0:
      raise ValueError(f"sample.dynamic_ratio={self.ratio} must be in (0, 1]")
    if self.kind == "static" and not float(self.max_value) > 0.0:
      raise ValueError(f"sample.sample_max_value={self.max_value} must be > 0 for static "
                       "clipping")
    if self.kind == "dynamic" and float(self.max_value) != 0.0 and float(self.max_value) < 1.0:
      raise ValueError(f"sample.sample_max_value={self.max_value} must be >= 1 (or 0: no "
                       "upper bound) for dynamic thresholding")

  @property
  def active(self) -> bool:
    return self.kind != "none"

  def __call__(self, x0: jax.Array) -> jax.Array:
    if self.kind == "none":
      return x0
    if self.kind == "static":
      return jnp.clip(x0, -self.max_value, self.max_value)
    return dynamic_threshold(x0, self.ratio, self.max_value)

  def describe(self) -> str:
    if self.kind == "none":
      return "none"
    if self.kind == "static":
      return f"static (clip to +-{self.max_value:g})"
    bound = "no upper bound" if self.max_value == 0 else f"s <= {self.max_value:g}"
    return f"dynamic (p={self.ratio:g}, {bound})"


def dynamic_threshold(x0: jax.Array, ratio: float = 0.995, max_value: float = 0.0) -> jax.Array:
  """Imagen's dynamic thresholding of x_0 [B, ...] per sample (see the module docstring);
  computed in float32, returned in x0's dtype."""
  x = jnp.asarray(x0, jnp.float32)
  flat = jnp.abs(x.reshape(x.shape[0], -1))
  s = jnp.quantile(flat, ratio, axis=1)  # linear interpolation, as torch.quantile
  s = jnp.maximum(s, 1.0)
  if max_value:
    s = jnp.minimum(s, max_value)
  s = s.reshape((-1,) + (1,) * (x.ndim - 1))
  return (jnp.clip(x, -s, s) / s).astype(x0.dtype)


def from_options(kind: str = "none", ratio: float = 0.995,
                 max_value: float = 1.0) -> Optional[Thresholding]:
  """A Thresholding, or None for 'none' (the samplers' "leave x_0 alone")."""
  rule = Thresholding(str(kind), float(ratio), float(max_value))
  return rule if rule.active else None


def from_diffusers(config: dict) -> Optional[Thresholding]:
  """The rule of a diffusers scheduler config: `thresholding` (dynamic, its ratio and
  sample_max_value) wins over `clip_sample` (static at clip_sample_range), as in diffusers."""
  if config.get("thresholding", False):
    return Thresholding("dynamic", float(config.get("dynamic_thresholding_ratio", 0.995)),
                        float(config.get("sample_max_value", 1.0)))
  if config.get("clip_sample", False):
    return Thresholding("static", max_value=float(config.get("clip_sample_range", 1.0)))
  return None
