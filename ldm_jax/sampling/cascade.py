"""A cascade: a base stage and super-resolution stages (each a `DiffusionPipeline`), run one
after another, each stage's output resized and noised to condition the next, with sampling
settings per stage. Load one with `ldm_jax.sampling.from_workdir`."""
from typing import Any, Sequence

import jax
import numpy as np

from ldm_jax.errors import UserError
from ldm_jax.images import to_uint8
from ldm_jax.models.denoiser import DiffusionModel


def _nearest_upsample(images: np.ndarray, size: int) -> np.ndarray:
  """[..., h, w, C] -> [..., size, size, C] by pixel repetition (size a multiple of h)."""
  f = size // images.shape[-2]
  return np.repeat(np.repeat(images, f, axis=-3), f, axis=-2)


# What a cascade samples with per stage (CascadePipeline.sample / stage_settings).
PER_STAGE_SETTINGS = ("sampler", "steps", "guidance", "eta", "thresholding", "aug_level")


class CascadePipeline:
  """A base stage and super-resolution stages, run one after another: stage i + 1 is
  conditioned on stage i's output (resized inside its sampler and noised to `aug_level`).
  Each stage samples with its own key, `fold_in(key(seed), i)` for i >= 1."""

  def __init__(self, stages: Sequence[Any]):
    if not stages or stages[0].is_super_resolution:
      raise UserError("a cascade starts with a stage that is not conditioned on images")
    self.stages = list(stages)
    self.class_names = self.stages[0].class_names

  @property
  def checkpoint_steps(self) -> dict:
    """{stage name: checkpoint step} of every stage."""
    return {k: v for stage in self.stages for k, v in stage.checkpoint_steps.items()}

  @property
  def image_size(self) -> int:
    return self.stages[-1].image_size

  @property
  def model(self) -> DiffusionModel:
    """The base stage's denoiser (its conditioning is the cascade's)."""
    return self.stages[0].model

  def describe(self) -> str:
    return "cascade of {} stages:\n  {}".format(
        len(self.stages), "\n  ".join(s.describe() for s in self.stages))

  def stage_settings(self, **given) -> list:
    """The sampling settings of every stage: for each of PER_STAGE_SETTINGS, the value given
    (one for all stages, or a sequence with one per stage) or else the stage's own
    (config.<stage>.sample, thresholding and lowres.sample_aug_level). `aug_level` may also
    list the super-resolution stages only (the base has none)."""
    n = len(self.stages)
    unknown = sorted(set(given) - set(PER_STAGE_SETTINGS))
    if unknown:
      raise UserError(f"unknown per-stage settings {unknown}: {list(PER_STAGE_SETTINGS)}")
    per = {}
    for key, value in given.items():
      if value is None:
        continue
      values = list(value) if isinstance(value, (list, tuple)) else [value]
      if key == "aug_level" and len(values) == n - 1 and n > 1:
        values = [None] + values
      if len(values) == 1:
        values = values * n
      if len(values) != n:
        names = ", ".join(st.name for st in self.stages)
        raise UserError(f"{key}={','.join(map(str, value))}: give one value or one per stage "
                        f"({n}: {names})")
      per[key] = values
    out = []
    for i, stage in enumerate(self.stages):
      s = dict(stage.sample_defaults, thresholding=None,
               aug_level=None if i == 0 else stage.sample_aug_level)
      s.update({k: v[i] for k, v in per.items() if v[i] is not None})
      if i == 0:
        s["aug_level"] = None
      out.append(s)
    return out

  def sample(self, num_samples: int, *, seed: int = 0, trajectory: bool = False,
             as_uint8: bool = True, latents=None, stage_outputs: bool = False,
             base_images=None, sampler=None, steps=None, guidance=None, eta=None,
             thresholding=None, aug_level=None, **kwargs):
    """Images of the last stage (see DiffusionPipeline.sample for the keywords; `latents`
    go to the base stage). `sampler`, `steps`, `guidance`, `eta`, `thresholding` and
    `aug_level` are per stage: one value for all, a sequence with one per stage (aug_level:
    or one per super-resolution stage), None for each stage's own (`stage_settings`).
    trajectory=True also returns every stage's decoded x_t, resized
    (nearest) to the output size and concatenated in time. stage_outputs=True returns the
    list of each stage's images instead. `base_images` (float, [-1, 1]) replace the base
    stage's samples (e.g. to follow a corrupted base sample through the super-resolution).
    Image-to-image and inpainting are single-stage features (a UserError here)."""
    edits = [k for k in ("init_image", "init_latents", "mask", "strength")
             if kwargs.get(k) is not None]
    if edits:
      raise UserError(f"{edits[0]}: image-to-image and inpainting run on one stage (an LDM or "
                      "pixel-space workdir), not on a cascade")
    settings = self.stage_settings(sampler=sampler, steps=steps, guidance=guidance, eta=eta,
                                   thresholding=thresholding, aug_level=aug_level)
    key = jax.random.key(seed)
    frames, outputs = [], []
    images = None
    for i, stage in enumerate(self.stages):
      rng = key if i == 0 else jax.random.fold_in(key, i)
      if i == 0 and base_images is not None:
        images = np.asarray(base_images, np.float32)
        outputs.append(images)
        continue
      out = stage.sample(num_samples, rng=rng, trajectory=trajectory, as_uint8=False,
                         latents=latents if i == 0 else None,
                         lowres=None if i == 0 else images, **settings[i], **kwargs)
      if trajectory:
        out, traj = out
        frames.append(traj)
      images = out
      outputs.append(images)
    size = self.image_size
    convert = (lambda x: to_uint8(np.asarray(x))) if as_uint8 else np.asarray  # noqa: E731
    if stage_outputs:
      return [convert(o) for o in outputs]
    if trajectory:
      traj = np.concatenate([_nearest_upsample(f, size) for f in frames], axis=0)
      return convert(images), convert(traj)
    return convert(images)
