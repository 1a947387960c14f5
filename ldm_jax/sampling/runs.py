"""Running a pipeline (`ldm_jax.sampling.pipeline`) for a person: one row of images per prompt or label,
a square grid or a trajectory grid, and the console line that follows a sampling run's steps.
"""
from typing import Sequence

import numpy as np

from ldm_jax import console
from ldm_jax.errors import UserError
from ldm_jax.images import make_grid
from ldm_jax.models.builders import TEXT_KINDS


class StepProgress:
  """The console progress line of a sampling run ('sampling  step i/N  it/s  ETA'), fed by the
  scanned sampler's per-step host callback; one line per run of N steps."""

  def __init__(self, num_steps: int, stream=None, name: str = "sampling"):
    self._n, self._i, self._stream, self._name = num_steps, 0, stream, name
    self._line = None

  def __call__(self, t: int) -> None:
    del t  # the step index is what a person follows
    if self._line is None:
      self._line = console.Progress(self._name, self._n, stream=self._stream, every_secs=10.0)
    self._i += 1
    self._line.update(self._i)
    if self._i == self._n:
      self._line.close()
      self._line, self._i = None, 0


def sample_rows(pipe, conditions: Sequence, per_row: int, *, latents=None,
                **kwargs) -> list:
  """For each condition (a prompt of a text model, a class label of a class-conditional one)
  `pipe.sample(per_row, ...)` with the other keywords: a list of [per_row, H, W, C] arrays.
  Every row uses the same seed, so column j starts from the same noise in every row, and one
  compiled program serves all rows. `latents` [len(conditions) * per_row, ...] (row-major, as
  diffusers' num_images_per_prompt) replace that noise."""
  key = "prompt" if pipe.model.cond_kind in TEXT_KINDS else "labels"
  if key == "labels" and pipe.model.cond_kind != "class":
    raise UserError("this model is unconditional: it takes no prompts or labels")
  if latents is not None and len(latents) != len(conditions) * per_row:
    raise UserError(f"{len(latents)} latents for {len(conditions)} rows of {per_row}")
  return [pipe.sample(per_row, **{key: c}, **kwargs,
                      latents=None if latents is None else latents[i * per_row:(i + 1) * per_row])
          for i, c in enumerate(conditions)]


def sample_grid(pipe, num_samples: int, *, trajectory_frames: int = 0,
                **kwargs) -> np.ndarray:
  """A uint8 grid: the samples (square-ish), or with trajectory_frames > 0 one row per sample
  showing the decoded x_t at evenly spaced steps from z_T to z_0."""
  if trajectory_frames <= 0:
    images = pipe.sample(num_samples, **kwargs)
    return make_grid(images, ncols=int(np.ceil(np.sqrt(num_samples))))
  final, traj = pipe.sample(num_samples, trajectory=True, **kwargs)
  steps = traj.shape[0]
  pick = np.unique(np.linspace(0, steps - 1, trajectory_frames).round().astype(int))
  frames = np.concatenate([traj[pick], final[None]], axis=0)  # [F, N, H, W, C]
  rows = np.swapaxes(frames, 0, 1).reshape((-1,) + frames.shape[2:])
  return make_grid(rows, ncols=frames.shape[0])
