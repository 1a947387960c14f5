"""Sampling API: load a trained workdir, run a scan sampler in latent space, decode to images.

  pipe = LatentDiffusionPipeline.from_workdir("runs/ldm")
  images = pipe.sample(16, sampler="ddim", steps=50, guidance=3.0, seed=0, labels=[7] * 16)

The whole reverse chain and the decoder run in ONE jitted function per (sampler, steps,
batch size, trajectory); the guidance scale, eta and the seed are runtime values.
"""
import functools
import json
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import diffusion
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.errors import UserError
from ldm_jax.evaluation.images import to_uint8
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.conditioning import Tokenizer
from ldm_jax.train.diffusion import DiffusionModel


class LatentDiffusionPipeline:
  """Frozen autoencoder + conditional denoiser + schedule: everything needed to sample."""

  def __init__(self, *, autoencoder: AutoencoderKL, ae_params: Any, model: DiffusionModel,
               params: Any, schedule: diffusion.DiffusionSchedule, latent_shape: Sequence[int],
               latent_scale: float, parameterization: str = "eps",
               class_names: Sequence[str] = ()):
    self.autoencoder, self.ae_params = autoencoder, ae_params
    self.model, self.params = model, params
    self.schedule, self.latent_shape = schedule, tuple(latent_shape)
    self.latent_scale, self.parameterization = float(latent_scale), parameterization
    self.class_names = list(class_names)
    self._compiled = {}

  @classmethod
  def from_workdir(cls, workdir: str, step: Optional[int] = None) -> "LatentDiffusionPipeline":
    """Loads config.json, the autoencoder and the LDM (EMA parameters) from a workdir."""
    from ldm_jax.train import stage_ldm  # pylint: disable=g-import-not-at-top
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
      raise UserError(f"no trained model in {workdir!r}: looked for {config_path}")
    with open(config_path, encoding="utf-8") as f:
      config = ml_collections.ConfigDict(json.load(f))
    if "ldm" not in config:
      raise UserError(f"{config_path} is an autoencoder-only run; sampling needs an LDM run "
                      "(configs/ldm.py)")
    return stage_ldm.load_pipeline(config, workdir, step)

  # ---- conditions ---------------------------------------------------------------------------
  def condition(self, num_samples: int, labels=None, prompt=None) -> dict:
    kind = self.model.cond_kind
    if kind == "class":
      if prompt is not None:
        raise UserError("this model is class-conditional: give labels, not a prompt")
      n = self.model.unet.num_classes
      labels = np.arange(num_samples) % n if labels is None else np.broadcast_to(
          np.asarray(labels, np.int32), (num_samples,))
      if labels.min() < 0 or labels.max() >= n:
        raise UserError(f"label {int(labels.max())} is outside 0..{n - 1}")
      return {"labels": jnp.asarray(labels, jnp.int32)}
    if kind == "text":
      if labels is not None:
        raise UserError("this model is text-conditional: give a prompt, not labels")
      prompts = [prompt or ""] * num_samples if isinstance(prompt, (str, type(None))) else prompt
      if len(prompts) != num_samples:
        raise UserError(f"{len(prompts)} prompts for {num_samples} samples")
      ids, mask = self.model.tokenizer.encode(list(prompts), self.model.max_length)
      return {"tokens": jnp.asarray(ids), "token_mask": jnp.asarray(mask)}
    return {}

  # ---- sampling -----------------------------------------------------------------------------
  def _sampler_fn(self, sampler: str, steps: int, num_samples: int, trajectory: bool,
                  progress: Optional[Callable[[int], None]]):
    key = (sampler, steps, num_samples, trajectory, progress is not None)
    if key in self._compiled:
      return self._compiled[key]
    if sampler not in diffusion.SAMPLERS:
      raise UserError(f"unknown sampler {sampler!r}: one of {sorted(diffusion.SAMPLERS)}")

    def model_fn(x, t, cond, params):
      if progress is not None:
        jax.debug.callback(lambda t: progress(int(t[0])), t)
      return self.model(params, x, t, cond)

    def run(params, ae_params, cond, uncond, scale, eta, rng):
      r_init, r_steps = jax.random.split(rng)
      x_T = jax.random.normal(r_init, (num_samples,) + self.latent_shape, jnp.float32)
      kwargs = dict(num_steps=steps, rng=r_steps, parameterization=self.parameterization,
                    return_trajectory=trajectory)
      if sampler == "ddim":
        kwargs["eta"] = eta
      if cond:
        fn, args = diffusion.guided(model_fn), (cond, uncond, scale, params)
      else:
        fn, args = (lambda x, t, p: model_fn(x, t, {}, p)), (params,)
      out = diffusion.sample(sampler, fn, x_T, self.schedule, model_args=args, **kwargs)
      dec = lambda z: self.autoencoder.apply(  # noqa: E731
          {"params": ae_params}, z / self.latent_scale, method=AutoencoderKL.decode)
      if trajectory:
        z0, traj = out
        images = jax.lax.map(lambda z: jnp.clip(dec(z), -1, 1), traj.x)
        return jnp.clip(dec(z0), -1, 1), images
      return jnp.clip(dec(out), -1, 1)

    fn = jax.jit(run)
    self._compiled[key] = fn
    return fn

  def sample(self, num_samples: int, *, sampler: str = "ddim", steps: int = 50,
             guidance: float = 1.0, eta: float = 0.0, seed: int = 0, labels=None,
             prompt=None, trajectory: bool = False,
             progress: Optional[Callable[[int], None]] = None, as_uint8: bool = True):
    """Draws `num_samples` images (NHWC uint8, or float in [-1, 1] with as_uint8=False).

    With trajectory=True also returns the decoded x_t after every step, [steps, N, H, W, C].
    `progress(t)` is called on the host at each denoiser evaluation (t: the timestep).
    """
    if steps < 1:
      raise UserError(f"steps={steps} must be at least 1")
    cond = self.condition(num_samples, labels, prompt)
    uncond = self.model.null_condition(1)
    fn = self._sampler_fn(sampler, int(steps), int(num_samples), bool(trajectory), progress)
    out = fn(self.params, self.ae_params, cond, uncond, jnp.float32(guidance), jnp.float32(eta),
             jax.random.key(seed))
    convert = (lambda x: to_uint8(np.asarray(x))) if as_uint8 else np.asarray  # noqa: E731
    if trajectory:
      return convert(out[0]), convert(out[1])
    return convert(out)


class StepProgress:
  """Prints 'step i/N (t=...)  it/s' on one line as the scanned sampler calls back."""

  def __init__(self, num_steps: int, stream=None):
    import sys  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    self._n, self._i, self._stream, self._time = num_steps, 0, stream or sys.stderr, time.time
    self._start = None

  def __call__(self, t: int) -> None:
    self._start = self._start or self._time()
    self._i = self._i % self._n + 1
    rate = (self._i - 1) / max(self._time() - self._start, 1e-9)
    end = "\n" if self._i == self._n else ""
    self._stream.write(f"\rsampling step {self._i}/{self._n} (t={t})  {rate:.1f} it/s{end}")
    self._stream.flush()
    if self._i == self._n:
      self._start = None


def sample_grid(pipe: LatentDiffusionPipeline, num_samples: int, *, trajectory_frames: int = 0,
                **kwargs) -> np.ndarray:
  """A uint8 grid: the samples (square-ish), or with trajectory_frames > 0 one row per sample
  showing the decoded x_t at evenly spaced steps from z_T to z_0."""
  from ldm_jax.evaluation.images import make_grid  # pylint: disable=g-import-not-at-top
  if trajectory_frames <= 0:
    images = pipe.sample(num_samples, **kwargs)
    return make_grid(images, ncols=int(np.ceil(np.sqrt(num_samples))))
  final, traj = pipe.sample(num_samples, trajectory=True, **kwargs)
  steps = traj.shape[0]
  pick = np.unique(np.linspace(0, steps - 1, trajectory_frames).round().astype(int))
  frames = np.concatenate([traj[pick], final[None]], axis=0)  # [F, N, H, W, C]
  rows = np.swapaxes(frames, 0, 1).reshape((-1,) + frames.shape[2:])
  return make_grid(rows, ncols=frames.shape[0])
