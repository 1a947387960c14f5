"""Sampling API: load any trained workdir and sample from it.

  pipe = LatentDiffusionPipeline.from_workdir("runs/ldm")      # also runs/pixel, runs/cascade
  images = pipe.sample(16, sampler="ddim", steps=50, guidance=3.0, seed=0, labels=[7] * 16)

One stage (`DiffusionPipeline`: an LDM or a pixel-space model) runs its whole reverse chain
and its codec's decoder in ONE jitted function per (sampler, steps, batch size, trajectory,
timestep options, first step run); the guidance scale, eta, the seed, a super-resolution
stage's augmentation level, negative prompts / labels, init images and masks are runtime
values (giving or leaving out an init image or a mask is another program; so is a `strength`
that changes the number of steps run, as the scan gets shorter).

Beyond sampling from noise, as diffusers' Stable Diffusion pipelines do:
  negative_prompt= / negative_labels=   the unconditional branch of guidance (default: the
                                        empty prompt / the null label)
  init_image=, strength=                image-to-image (SDEdit, StableDiffusionImg2ImgPipeline)
  init_image=, mask=, strength=         inpainting with a regular checkpoint: the known region
                                        re-noised at every step and blended at the latent
                                        resolution (StableDiffusionInpaintPipelineLegacy)

Running a pipeline for a person (rows per prompt, grids, the step progress line) is
`ldm_jax/sampling/runs.py`.

A cascade (`CascadePipeline`) runs its stages one after another, each such a function,
resizing each output to condition the next stage.

Workdirs come from train.py (train states with EMA) or from `python -m ldm_jax.convert`
(parameters only, meta 'format': 'params'; e.g. Stable Diffusion with a frozen CLIP text
encoder, conditioning.kind 'clip', its tokenizer files in workdir/tokenizer). A converted
config carries the reference scheduler's timestep spacing in `config.<stage>.scheduler`.
"""
from typing import Any, Callable, Optional, Sequence

import flax.errors
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import diffusion
from ldm_jax import workdir as workdir_lib
from ldm_jax.diffusion import samplers
from ldm_jax.diffusion import thresholding as thresholding_lib
from ldm_jax.errors import ConfigMismatch, UserError
from ldm_jax.images import to_uint8
from ldm_jax.models.builders import TEXT_KINDS
from ldm_jax.models.denoiser import DiffusionModel
from ldm_jax.sampling import inputs, load, options, program
from ldm_jax.sampling.cascade import CascadePipeline


def from_workdir(workdir: str, step: Optional[int] = None, lora_scale: float = 1.0):
  """The pipeline of any trained or converted workdir: a DiffusionPipeline for an LDM or a
  pixel-space model, a CascadePipeline for a cascade. `step` picks the last stage's
  checkpoint (default: the latest); `lora_scale` weighs a LoRA run's adapters."""
  config = workdir_lib.read_config(workdir)
  names = workdir_lib.diffusion_stages(config)
  if not names:
    raise UserError(f"{workdir}/{workdir_lib.CONFIG_FILE} is an autoencoder-only run; sampling "
                    "needs a diffusion run (configs/ldm.py, configs/pixel.py, configs/cascade.py)")
  return load_stages(config, workdir, names, {names[-1]: step}, lora_scale)


def load_stages(config: ml_collections.ConfigDict, workdir: str, names: Sequence[str],
                steps: Optional[dict] = None, lora_scale: float = 1.0):
  """The diffusion stages `names` of a workdir (each at `steps[name]`, default the latest
  checkpoint): a DiffusionPipeline for one, a CascadePipeline chaining several."""
  steps = steps or {}
  stages = [DiffusionPipeline.from_parts(config, load.load_stage(config, workdir, name,
                                                                 steps.get(name), lora_scale))
            for name in names]
  return stages[0] if len(stages) == 1 else CascadePipeline(stages)


class DiffusionPipeline:
  """One diffusion stage: codec + conditional denoiser + schedule, everything to sample."""

  def __init__(self, *, codec: Any, codec_params: Any, model: DiffusionModel, params: Any,
               schedule: diffusion.DiffusionSchedule, parameterization: str = "eps",
               class_names: Sequence[str] = (), sampler_options: Optional[dict] = None,
               sample_aug_level: float = 0.0, name: str = "ldm",
               thresholding: Optional[thresholding_lib.Thresholding] = None,
               sample_defaults: Optional[dict] = None):
    """`sampler_options`: SCHEDULER_OPTIONS values applied to every sampler (None: each
    sampler's defaults: DDIM leading + steps_offset 1, DDPM leading, DPM-Solver++ linspace).
    `sample_aug_level`: a super-resolution stage's default augmentation level (a fraction of
    the timesteps). `thresholding`: what every sampler does to its predicted x_0 by default
    (None: nothing, or a converted scheduler's clip_sample)."""
    unknown = sorted(set(sampler_options or {}) - set(options.SCHEDULER_OPTIONS))
    if unknown:
      raise UserError(f"unknown sampler options {unknown} (config.<stage>.scheduler: "
                      f"{list(options.SCHEDULER_OPTIONS)})")
    self.sampler_options = dict(sampler_options or {})
    self.codec, self.codec_params = codec, codec_params
    self.model, self.params = model, params
    self.schedule, self.parameterization = schedule, parameterization
    self.class_names = list(class_names)
    self.sample_aug_level, self.name = float(sample_aug_level), name
    self.thresholding = thresholding
    # The stage's own sampler, steps, guidance and eta (config.<stage>.sample), used by a
    # cascade for the stages a call gives no value for.
    self.sample_defaults = {**dict(sampler="ddim", steps=50, guidance=1.0, eta=0.0),
                            **(sample_defaults or {})}
    self.checkpoint_step: Optional[int] = None  # set when loaded from a workdir
    self._compiled, self._encode = {}, None

  @classmethod
  def from_parts(cls, config: ml_collections.ConfigDict,
                 parts: load.StageParts) -> "DiffusionPipeline":
    block = config[parts.name]
    pipe = cls(codec=parts.codec, codec_params=parts.codec_params, model=parts.model,
               params=parts.params, schedule=parts.schedule,
               parameterization=block.diffusion.parameterization,
               class_names=parts.meta.get("class_names", ()),
               sampler_options=options.scheduler_options(config, parts.name),
               sample_aug_level=float(block.lowres.sample_aug_level), name=parts.name,
               thresholding=options.stage_thresholding(block),
               sample_defaults=options.stage_sample_defaults(block))
    pipe.checkpoint_step = parts.step
    return pipe

  @property
  def checkpoint_steps(self) -> dict:
    """{stage name: checkpoint step} of the parameters (None: not loaded from a workdir)."""
    return {self.name: self.checkpoint_step}

  @classmethod
  def from_workdir(cls, workdir: str, step: Optional[int] = None, lora_scale: float = 1.0):
    """Loads any workdir (see the module function `from_workdir`)."""
    return from_workdir(workdir, step, lora_scale)

  # ---- the codec, by the names of the latent pipeline ----------------------------------------
  @property
  def latent_shape(self) -> tuple:
    return tuple(self.codec.shape)

  @property
  def latent_scale(self) -> float:
    return float(getattr(self.codec, "scale", 1.0))

  @property
  def autoencoder(self):
    return getattr(self.codec, "autoencoder", None)

  @property
  def ae_params(self):
    return self.codec_params

  @property
  def image_size(self) -> int:
    return int(getattr(self.codec, "image_size", 0) or self.codec.shape[0])

  @property
  def image_channels(self) -> int:
    ae = self.autoencoder
    return int(ae.in_channels) if ae is not None else int(self.codec.shape[-1])

  @property
  def is_super_resolution(self) -> bool:
    return self.model.lowres_channels > 0

  def describe(self) -> str:
    """One line: the stage, its space and its conditioning."""
    low = " | conditioned on lower-resolution images" if self.is_super_resolution else ""
    return (f"{self.name}: {self.codec.kind} space {list(self.latent_shape)} -> "
            f"{self.image_size}x{self.image_size} images | conditioning: "
            f"{self.model.cond_kind}{low} | classes: {self.class_names}")

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

  def negative_condition(self, num_samples: int, negative_labels=None,
                         negative_prompt=None) -> dict:
    """The condition of guidance's unconditional branch: the null label / empty prompt, or
    `negative_labels` (class models) / `negative_prompt` (text models) in its place."""
    if negative_labels is None and negative_prompt is None:
      return self.model.null_condition(num_samples)
    kind = self.model.cond_kind
    if kind == "class" and negative_prompt is not None:
      raise UserError("this model is class-conditional: give negative_labels, not a "
                      "negative_prompt")
    if kind in TEXT_KINDS and negative_labels is not None:
      raise UserError("this model is text-conditional: give a negative_prompt, not "
                      "negative_labels")
    if kind not in ("class",) + TEXT_KINDS:
      raise UserError("this model is unconditional: it has no negative prompt or label")
    return self.condition(num_samples, negative_labels, negative_prompt)

  def encode(self, images, seed: Optional[int] = None) -> np.ndarray:
    """Images (see `init_image` of `sample`) in the space the sampler runs in: the latent
    scale times the posterior mode (seed None) or a posterior sample."""
    x = inputs.as_images(images, self.image_size, self.image_channels, "images")
    self._encode = self._encode or jax.jit(self.codec.encode)
    rng = None if seed is None else program.encode_key(jax.random.key(seed))
    return np.asarray(self._encode(self.codec_params, jnp.asarray(x), rng))

  def resolve_thresholding(self, thresholding=None):
    """The Thresholding a call uses (see `options.resolve_thresholding`)."""
    return options.resolve_thresholding(self.thresholding, thresholding)

  def aug_steps(self, aug_level: Optional[float]) -> int:
    """An augmentation level (fraction of the timesteps, None: the stage's default) as the
    integer level the UNet embeds (0: the low-resolution image is used as it is)."""
    level = self.sample_aug_level if aug_level is None else float(aug_level)
    if not 0.0 <= level < 1.0:
      raise UserError(f"aug_level={level} must be in [0, 1)")
    return int(round(level * self.schedule.num_timesteps))

  # ---- sampling -----------------------------------------------------------------------------
  def sample(self, num_samples: int, *, sampler: str = "ddim", steps: int = 50,
             guidance: float = 1.0, eta: float = 0.0, seed: int = 0, labels=None,
             prompt=None, trajectory: bool = False,
             progress: Optional[Callable[[int], None]] = None, as_uint8: bool = True,
             latents=None, timestep_spacing: Optional[str] = None,
             steps_offset: Optional[int] = None, lowres=None,
             aug_level: Optional[float] = None, rng: Optional[jax.Array] = None,
             negative_prompt=None, negative_labels=None, init_image=None,
             init_latents=None, strength: Optional[float] = None, mask=None,
             use_karras_sigmas: Optional[bool] = None,
             final_sigmas_type: Optional[str] = None, thresholding=None,
             guidance_rescale: float = 0.0):
    """Draws `num_samples` images (NHWC uint8, or float in [-1, 1] with as_uint8=False).

    With trajectory=True also returns the decoded x_t after every step, [steps, N, H, W, C].
    `progress(t)` is called on the host at each denoiser evaluation (t: the timestep).
    `latents` [N, *latent_shape] replaces the x_T drawn from `seed` (the sampler's noise
    still comes from `seed`). `timestep_spacing` ('leading', 'linspace', 'trailing') and
    `steps_offset` override the workdir's scheduler settings. A super-resolution stage needs
    `lowres` (float images in [-1, 1], [N, h, w, C]) and noises them to `aug_level`.
    `rng` replaces `jax.random.key(seed)`. `use_karras_sigmas` ("DPM++ 2M Karras") and
    `final_sigmas_type` ('zero', 'sigma_min') override the workdir's DPM-Solver++ settings.
    `thresholding` ('none', 'static', 'dynamic' or a `Thresholding`; None: the stage's
    config.<stage>.sample.thresholding) is applied to the predicted x_0 at every step.
    `guidance_rescale` (phi, Lin et al. 2023; diffusers' StableDiffusionPipeline option, for
    zero-terminal-SNR models) rescales the guided output towards the conditional one's
    standard deviation; 0 leaves guidance as it is.

    `negative_prompt` (a string or one per sample; text models) / `negative_labels` (class
    models) replace the empty prompt / null label in guidance's unconditional branch.
    `init_image` (1 or N images, `image_size` square, uint8 or float in [-1, 1]) or
    `init_latents` (1 or N, already in the sampler's space, e.g. from `encode`) make this
    image-to-image: of the `steps`-step schedule the last int(steps * strength) steps run
    (default strength 0.8), from the init latents (a posterior sample drawn from the seed)
    noised to the first of them; `latents` is then that noise. `mask` (white / 1 = repaint,
    see ldm_jax.sampling.inputs) with an init image inpaints: after every step the known
    region is the init latents noised to that step's timestep, and at the end the init
    latents themselves.
    """
    if steps < 1:
      raise UserError(f"steps={steps} must be at least 1")
    if not np.isfinite(guidance) or not np.isfinite(eta):
      raise UserError(f"guidance={guidance} and eta={eta} must be finite")
    if not 0.0 <= guidance_rescale <= 1.0:
      raise UserError(f"guidance_rescale={guidance_rescale} must be in [0, 1]")
    opts = dict(self.sampler_options)
    if timestep_spacing is not None:
      opts["timestep_spacing"] = timestep_spacing
    if steps_offset is not None:
      opts["steps_offset"] = int(steps_offset)
    if final_sigmas_type not in (None, "zero", "sigma_min"):
      raise UserError(f"final_sigmas_type={final_sigmas_type!r}: one of 'zero', 'sigma_min'")
    for key, value in (("use_karras_sigmas", use_karras_sigmas),
                       ("final_sigmas_type", final_sigmas_type)):
      if value is not None:
        opts[key] = value
    rule = self.resolve_thresholding(thresholding)
    if rule is not None:
      # Our own rule: DDIM re-derives eps from the thresholded x_0, as ADM (a converted
      # scheduler's clip_sample keeps diffusers' default, the model's eps).
      opts.update(thresholding=rule, use_clipped_model_output=True)
    if latents is not None:
      latents = np.asarray(latents, np.float32)
      want = (int(num_samples),) + self.latent_shape
      if latents.shape != want:
        raise UserError(f"latents of shape {latents.shape}, expected {want}")
    if self.is_super_resolution != (lowres is not None):
      raise UserError(f"stage {self.name!r}: lowres images are "
                      f"{'required' if self.is_super_resolution else 'not used'} here")
    if lowres is not None:
      lowres = jnp.asarray(lowres, jnp.float32)
      if lowres.shape[0] != num_samples or lowres.shape[-1] != self.latent_shape[-1]:
        raise UserError(f"lowres images of shape {lowres.shape} for {num_samples} samples "
                        f"with {self.latent_shape[-1]} channels")
    cond = self.condition(num_samples, labels, prompt)
    # Always one unconditional condition per sample, so a negative prompt is no new program.
    uncond = self.negative_condition(num_samples, negative_labels, negative_prompt)
    init, start_step = inputs.init_arrays(
        num_samples, int(steps), init_image, init_latents, strength, mask,
        image_size=self.image_size, channels=self.image_channels, latent_shape=self.latent_shape)
    if sampler == "pndm" and (rule is not None or mask is not None or start_step):
      raise UserError("--sampler=pndm (PLMS) combines noise predictions: it takes no x_0 "
                      "thresholding (--thresholding=none), inpainting or strength < 1; use ddim")
    fn = self._program(sampler, int(steps), int(num_samples), bool(trajectory), progress,
                       tuple(sorted(opts.items())), latents is not None, start_step,
                       guidance_rescale > 0)
    try:
      out = fn(self.params, self.codec_params, cond, uncond, jnp.float32(guidance),
               jnp.float32(guidance_rescale), jnp.float32(eta),
               jax.random.key(seed) if rng is None else rng, latents, lowres,
               jnp.int32(self.aug_steps(aug_level) if lowres is not None else 0), init)
    except flax.errors.ScopeParamShapeError as e:  # config.json edited after training
      raise ConfigMismatch(
          f"stage {self.name!r}: the parameters of checkpoint step {self.checkpoint_step} do "
          f"not fit the workdir's config ({str(e).split(' (https://')[0]}); the config "
          "changed since they were saved") from e
    convert = (lambda x: to_uint8(np.asarray(x))) if as_uint8 else np.asarray  # noqa: E731
    if trajectory:
      return convert(out[0]), convert(out[1])
    return convert(out)

  def _program(self, sampler: str, steps: int, num_samples: int, trajectory: bool,
               progress: Optional[Callable[[int], None]], opts: tuple = (),
               given_latents: bool = False, start_step: int = 0, rescaled: bool = False):
    """The compiled program of a call's static settings (built once per such settings)."""
    key = (sampler, steps, num_samples, trajectory, progress is not None, opts,
           given_latents, start_step, rescaled)
    if key not in self._compiled:
      self._compiled[key] = program.compile_sampler(
          model=self.model, codec=self.codec, schedule=self.schedule,
          parameterization=self.parameterization, sampler=sampler, steps=steps,
          num_samples=num_samples, trajectory=trajectory, progress=progress, options=opts,
          given_latents=given_latents, start_step=start_step, rescaled=rescaled)
    return self._compiled[key]


def steps_run(steps: int, strength: Optional[float] = None) -> int:
  """How many sampler steps a call runs: all `steps`, or with an init image (and `strength`,
  default 0.8) the last int(steps * strength)."""
  if strength is None:
    return int(steps)
  return int(steps) - samplers.strength_start_step(int(steps), float(strength))


# The name users and notebooks know: a latent diffusion workdir loads as one stage.
LatentDiffusionPipeline = DiffusionPipeline


