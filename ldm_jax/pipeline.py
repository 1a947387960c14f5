"""Sampling API: load a trained workdir, run a scan sampler in latent space, decode to images.

  pipe = LatentDiffusionPipeline.from_workdir("runs/ldm")
  images = pipe.sample(16, sampler="ddim", steps=50, guidance=3.0, seed=0, labels=[7] * 16)

The whole reverse chain and the decoder run in ONE jitted function per (sampler, steps,
batch size, trajectory, timestep options); the guidance scale, eta and the seed are runtime
values.

Workdirs come from train.py (train states with EMA) or from `python -m ldm_jax.convert`
(parameters only, meta 'format': 'params'; e.g. Stable Diffusion with a frozen CLIP text
encoder, conditioning.kind 'clip', its tokenizer files in workdir/tokenizer). A converted
config carries the reference scheduler's timestep spacing in `config.ldm.scheduler`.
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
from ldm_jax.models.conditioning import ClipTokenizer, Tokenizer
from ldm_jax.train.diffusion import TEXT_KINDS, DiffusionModel

# config.ldm.scheduler keys (diffusers scheduler_config.json terms) -> sampler keywords.
SCHEDULER_OPTIONS = ("timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample")


class LatentDiffusionPipeline:
  """Frozen autoencoder + conditional denoiser + schedule: everything needed to sample."""

  def __init__(self, *, autoencoder: AutoencoderKL, ae_params: Any, model: DiffusionModel,
               params: Any, schedule: diffusion.DiffusionSchedule, latent_shape: Sequence[int],
               latent_scale: float, parameterization: str = "eps",
               class_names: Sequence[str] = (), sampler_options: Optional[dict] = None):
    """`sampler_options`: SCHEDULER_OPTIONS values applied to every sampler (None: each
    sampler's defaults: DDIM leading + steps_offset 1, DDPM leading, DPM-Solver++ linspace)."""
    unknown = sorted(set(sampler_options or {}) - set(SCHEDULER_OPTIONS))
    if unknown:
      raise UserError(f"unknown sampler options {unknown} (config.ldm.scheduler: "
                      f"{list(SCHEDULER_OPTIONS)})")
    self.sampler_options = dict(sampler_options or {})
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
    ckpt_dir = os.path.join(workdir, "ldm", "checkpoints")
    probe = Checkpointer(ckpt_dir, async_save=False)
    meta = probe.restore_meta(step) if probe.latest_step() is not None else {}
    probe.close()
    if meta.get("format") == "params":
      return _load_params_workdir(config, workdir, meta, step)
    pipe = stage_ldm.load_pipeline(config, workdir, step)
    pipe.sampler_options = scheduler_options(config)
    return pipe

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
    if kind in TEXT_KINDS:
      if labels is not None:
        raise UserError("this model is text-conditional: give a prompt, not labels")
      prompts = [prompt or ""] * num_samples if isinstance(prompt, (str, type(None))) else prompt
      if len(prompts) != num_samples:
        raise UserError(f"{len(prompts)} prompts for {num_samples} samples")
      ids, mask = self.model.tokenizer.encode(list(prompts), self.model.max_length)
      return {"tokens": jnp.asarray(ids), "token_mask": jnp.asarray(mask)}
    return {}

  # ---- sampling -----------------------------------------------------------------------------
  def _sampler_kwargs(self, sampler: str, options: dict) -> dict:
    """Sampler keywords from SCHEDULER_OPTIONS values."""
    kwargs = {}
    if options.get("timestep_spacing") is not None:
      kwargs["spacing"] = options["timestep_spacing"]
    if options.get("steps_offset") is not None:
      kwargs["steps_offset"] = int(options["steps_offset"])
    if sampler == "ddim" and options.get("set_alpha_to_one") is not None:
      kwargs["set_alpha_to_one"] = bool(options["set_alpha_to_one"])
    if sampler in ("ddpm", "ddim") and options.get("clip_sample"):
      kwargs["clip_x0"] = float(options["clip_sample"])
    return kwargs

  def _sampler_fn(self, sampler: str, steps: int, num_samples: int, trajectory: bool,
                  progress: Optional[Callable[[int], None]], options: tuple = (),
                  given_latents: bool = False):
    key = (sampler, steps, num_samples, trajectory, progress is not None, options,
           given_latents)
    if key in self._compiled:
      return self._compiled[key]
    if sampler not in diffusion.SAMPLERS:
      raise UserError(f"unknown sampler {sampler!r}: one of {sorted(diffusion.SAMPLERS)}")

    def model_fn(x, t, cond, params):
      if progress is not None:
        jax.debug.callback(lambda t: progress(int(t[0])), t)
      return self.model(params, x, t, cond)

    extra = self._sampler_kwargs(sampler, dict(options))

    def run(params, ae_params, cond, uncond, scale, eta, rng, latents):
      r_init, r_steps = jax.random.split(rng)
      x_T = (jnp.asarray(latents, jnp.float32) if given_latents else
             jax.random.normal(r_init, (num_samples,) + self.latent_shape, jnp.float32))
      kwargs = dict(num_steps=steps, rng=r_steps, parameterization=self.parameterization,
                    return_trajectory=trajectory, **extra)
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
             progress: Optional[Callable[[int], None]] = None, as_uint8: bool = True,
             latents=None, timestep_spacing: Optional[str] = None,
             steps_offset: Optional[int] = None):
    """Draws `num_samples` images (NHWC uint8, or float in [-1, 1] with as_uint8=False).

    With trajectory=True also returns the decoded x_t after every step, [steps, N, H, W, C].
    `progress(t)` is called on the host at each denoiser evaluation (t: the timestep).
    `latents` [N, *latent_shape] replaces the x_T drawn from `seed` (the sampler's noise
    still comes from `seed`). `timestep_spacing` ('leading', 'linspace', 'trailing') and
    `steps_offset` override the workdir's scheduler settings.
    """
    if steps < 1:
      raise UserError(f"steps={steps} must be at least 1")
    options = dict(self.sampler_options)
    if timestep_spacing is not None:
      options["timestep_spacing"] = timestep_spacing
    if steps_offset is not None:
      options["steps_offset"] = int(steps_offset)
    if latents is not None:
      latents = np.asarray(latents, np.float32)
      want = (int(num_samples),) + self.latent_shape
      if latents.shape != want:
        raise UserError(f"latents of shape {latents.shape}, expected {want}")
    cond = self.condition(num_samples, labels, prompt)
    uncond = self.model.null_condition(1)
    fn = self._sampler_fn(sampler, int(steps), int(num_samples), bool(trajectory), progress,
                          tuple(sorted(options.items())), latents is not None)
    out = fn(self.params, self.ae_params, cond, uncond, jnp.float32(guidance), jnp.float32(eta),
             jax.random.key(seed), latents)
    convert = (lambda x: to_uint8(np.asarray(x))) if as_uint8 else np.asarray  # noqa: E731
    if trajectory:
      return convert(out[0]), convert(out[1])
    return convert(out)


def scheduler_options(config: ml_collections.ConfigDict) -> dict:
  """config.ldm.scheduler as a dict ({} when absent: each sampler's defaults)."""
  opts = config.ldm.get("scheduler", None)
  return {} if opts is None else dict(opts.to_dict() if hasattr(opts, "to_dict") else opts)


def _restore_params(directory: str, abstract: Any, step: Optional[int]):
  """{'params': ...} of a parameters-only checkpoint, onto the first device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  ckpt = Checkpointer(directory, async_save=False)
  try:
    target = {"params": jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)}
    state, meta = ckpt.restore(target, step)
  finally:
    ckpt.close()
  if meta.get("format") != "params":
    raise UserError(f"{directory}: expected a parameters-only checkpoint (ldm_jax.convert)")
  return state["params"]


def _load_params_workdir(config: ml_collections.ConfigDict, workdir: str, meta: dict,
                         step: Optional[int]) -> "LatentDiffusionPipeline":
  """A pipeline from a converted workdir (parameters-only checkpoints)."""
  from ldm_jax.train.autoencoder import build_autoencoder  # pylint: disable=g-import-not-at-top
  from ldm_jax.train.diffusion import (  # pylint: disable=g-import-not-at-top
      build_text_encoder, build_unet, make_schedule)
  ldm, rng = config.ldm, jax.random.key(0)
  autoencoder = build_autoencoder(config.autoencoder, config.data.channels)
  image = jnp.zeros((1, config.data.image_size, config.data.image_size, config.data.channels))
  ae_abstract = jax.eval_shape(lambda: autoencoder.init(rng, image)["params"])
  ae_params = _restore_params(os.path.join(workdir, "autoencoder", "checkpoints"), ae_abstract,
                              None)
  kind = ldm.conditioning.kind
  tokenizer = text = None
  if kind == "clip":
    tokenizer = ClipTokenizer(os.path.join(workdir, ldm.conditioning.get("tokenizer",
                                                                        "tokenizer")))
  elif kind == "text":
    tokenizer = Tokenizer.from_json(meta["tokenizer"])
  if kind in TEXT_KINDS:
    text = build_text_encoder(ldm, tokenizer)
  latent_shape = tuple(meta["latent_shape"])
  model = DiffusionModel(build_unet(ldm, latent_shape[-1], int(meta["num_classes"])), text,
                         kind, tokenizer, int(ldm.conditioning.max_length))
  abstract = jax.eval_shape(lambda: model.init(rng, latent_shape))
  params = _restore_params(os.path.join(workdir, "ldm", "checkpoints"), abstract, step)
  return LatentDiffusionPipeline(
      autoencoder=autoencoder, ae_params=ae_params, model=model, params=params,
      schedule=make_schedule(ldm), latent_shape=latent_shape,
      latent_scale=meta["latent_scale"], parameterization=ldm.diffusion.parameterization,
      class_names=meta.get("class_names", ()),
      sampler_options=scheduler_options(config))


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
    elapsed = self._time() - self._start
    if self._i == 1 or elapsed <= 0:
      speed = ""
    else:  # s/it for slow models (a 512x512 SD step on a CPU), it/s otherwise, and the ETA
      per_step = elapsed / (self._i - 1)
      speed = (f"  {per_step:.1f} s/it" if per_step >= 1 else f"  {1 / per_step:.1f} it/s")
      speed += f"  ETA {per_step * (self._n - self._i + 1):.0f} s"
    end = "\n" if self._i == self._n else ""
    self._stream.write(f"\rsampling step {self._i}/{self._n} (t={t}){speed}{end}")
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
