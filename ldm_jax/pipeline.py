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
`ldm_jax/pipeline_runs.py`.

A cascade (`CascadePipeline`) runs its stages one after another, each such a function,
resizing each output to condition the next stage.

Workdirs come from train.py (train states with EMA) or from `python -m ldm_jax.convert`
(parameters only, meta 'format': 'params'; e.g. Stable Diffusion with a frozen CLIP text
encoder, conditioning.kind 'clip', its tokenizer files in workdir/tokenizer). A converted
config carries the reference scheduler's timestep spacing in `config.<stage>.scheduler`.
"""
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import codecs, diffusion, load, sample_inputs
from ldm_jax import workdir as workdir_lib
from ldm_jax.diffusion import samplers
from ldm_jax.diffusion import thresholding as thresholding_lib
from ldm_jax.errors import UserError
from ldm_jax.evaluation.images import to_uint8
from ldm_jax.models.builders import TEXT_KINDS
from ldm_jax.models.denoiser import LOWRES_KEYS, DiffusionModel

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
    unknown = sorted(set(sampler_options or {}) - set(SCHEDULER_OPTIONS))
    if unknown:
      raise UserError(f"unknown sampler options {unknown} (config.<stage>.scheduler: "
                      f"{list(SCHEDULER_OPTIONS)})")
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
               sampler_options=scheduler_options(config, parts.name),
               sample_aug_level=float(block.lowres.sample_aug_level), name=parts.name,
               thresholding=stage_thresholding(block),
               sample_defaults=stage_sample_defaults(block))
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
    x = sample_inputs.as_images(images, self.image_size, self.image_channels, "images")
    self._encode = self._encode or jax.jit(self.codec.encode)
    rng = None if seed is None else _encode_key(jax.random.key(seed))
    return np.asarray(self._encode(self.codec_params, jnp.asarray(x), rng))

  def resolve_thresholding(self, thresholding=None):
    """The Thresholding a call uses (None: leave x_0 alone): `thresholding` given as a kind
    ('none', 'static', 'dynamic') or a Thresholding, else the stage's default."""
    if thresholding is None:
      return self.thresholding
    if isinstance(thresholding, thresholding_lib.Thresholding):
      return thresholding if thresholding.active else None
    default = self.thresholding or thresholding_lib.Thresholding()
    kind = str(thresholding)
    if kind not in thresholding_lib.KINDS:
      raise UserError(f"thresholding={kind!r}: one of {', '.join(thresholding_lib.KINDS)}")
    if kind == "none":
      return None
    if kind == default.kind:
      return default
    return thresholding_lib.Thresholding(
        kind, default.ratio, 1.0 if kind == "static" else DYNAMIC_MAX_VALUE)

  def aug_steps(self, aug_level: Optional[float]) -> int:
    """An augmentation level (fraction of the timesteps, None: the stage's default) as the
    integer level the UNet embeds (0: the low-resolution image is used as it is)."""
    level = self.sample_aug_level if aug_level is None else float(aug_level)
    if not 0.0 <= level < 1.0:
      raise UserError(f"aug_level={level} must be in [0, 1)")
    return int(round(level * self.schedule.num_timesteps))

  # ---- sampling -----------------------------------------------------------------------------
  def _sampler_kwargs(self, sampler: str, options: dict) -> dict:
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

  def _sampler_fn(self, sampler: str, steps: int, num_samples: int, trajectory: bool,
                  progress: Optional[Callable[[int], None]], options: tuple = (),
                  given_latents: bool = False, start_step: int = 0, rescaled: bool = False):
    key = (sampler, steps, num_samples, trajectory, progress is not None, options,
           given_latents, start_step, rescaled)
    if key in self._compiled:
      return self._compiled[key]
    if sampler not in diffusion.SAMPLERS:
      raise UserError(f"unknown sampler {sampler!r}: one of {sorted(diffusion.SAMPLERS)}")
    shape, codec, sched = self.latent_shape, self.codec, self.schedule

    def model_fn(x, t, cond, params):
      if progress is not None:
        jax.debug.callback(lambda t: progress(int(t[0])), t)
      return self.model(params, x, t, cond)

    extra = self._sampler_kwargs(sampler, dict(options))
    try:  # the level of each step: image-to-image and inpainting noise the init latents to it
      _, alpha, sigma = samplers.sampler_levels(sampler, sched, steps, **extra)
      noise_scale = samplers.initial_noise_scale(sampler, sched, steps, **extra)
    except ValueError as e:
      raise UserError(str(e)) from e
    batch = (num_samples,) + shape

    def at_level(z0, noise, i):  # the init latents at step i's level (diffusers' add_noise)
      return alpha[i] * z0 + sigma[i] * noise

    def run(params, codec_params, cond, uncond, scale, rescale, eta, rng, latents, lowres,
            aug_level, init=None):
      r_init, r_steps, r_aug = jax.random.split(rng, 3)
      x_T = (jnp.asarray(latents, jnp.float32) if given_latents else
             jax.random.normal(r_init, batch, jnp.float32))
      hook = z0 = mask = None
      if init is not None:  # x_T is the noise that takes the init latents to t_start
        z0 = (init["latents"] if "latents" in init else
              codec.encode(codec_params, init["images"], _encode_key(rng)))
        z0, noise, mask = jnp.broadcast_to(z0, batch), x_T, init.get("mask")
        x_T = at_level(z0, noise, start_step)
        if mask is not None:  # the legacy inpainting blend, after step i at step i's level
          hook = lambda x, i: mask * x + (1.0 - mask) * at_level(z0, noise, i)  # noqa: E731
      else:  # from noise: the Euler samplers start at diffusers' init_noise_sigma
        x_T = x_T * noise_scale
      if lowres is not None:  # a super-resolution stage: both branches see the same image
        low = codecs.upsample_condition(lowres, shape[0])
        level = jnp.full((num_samples,), aug_level, jnp.int32)
        low = diffusion.augment(sched, low, level, jax.random.normal(r_aug, low.shape))
        cond = {**cond, "lowres": low, "aug_level": level}
        uncond = {**uncond, "lowres": low, "aug_level": level}
      kwargs = dict(num_steps=steps, rng=r_steps, parameterization=self.parameterization,
                    return_trajectory=trajectory, start_step=start_step, step_hook=hook,
                    **extra)
      if sampler == "ddim":
        kwargs["eta"] = eta
      if set(cond) - set(LOWRES_KEYS) and rescaled:
        fn, args = diffusion.guided(model_fn, rescaled=True), (cond, uncond, scale, rescale,
                                                               params)
      elif set(cond) - set(LOWRES_KEYS):
        fn, args = diffusion.guided(model_fn), (cond, uncond, scale, params)
      else:
        fn, args = (lambda x, t, c, p: model_fn(x, t, c, p)), (cond, params)
      out = diffusion.sample(sampler, fn, x_T, sched, model_args=args, **kwargs)
      final, traj = out if trajectory else (out, None)
      if mask is not None:  # the known region exactly as encoded
        final = mask * final + (1.0 - mask) * z0
      dec = lambda z: jnp.clip(codec.decode(codec_params, z), -1, 1)  # noqa: E731
      if trajectory:
        return dec(final), jax.lax.map(dec, traj.x)
      return dec(final)

    fn = jax.jit(run)
    self._compiled[key] = fn
    return fn

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
    see ldm_jax.sample_inputs) with an init image inpaints: after every step the known
    region is the init latents noised to that step's timestep, and at the end the init
    latents themselves.
    """
    if steps < 1:
      raise UserError(f"steps={steps} must be at least 1")
    if not np.isfinite(guidance) or not np.isfinite(eta):
      raise UserError(f"guidance={guidance} and eta={eta} must be finite")
    if not 0.0 <= guidance_rescale <= 1.0:
      raise UserError(f"guidance_rescale={guidance_rescale} must be in [0, 1]")
    options = dict(self.sampler_options)
    if timestep_spacing is not None:
      options["timestep_spacing"] = timestep_spacing
    if steps_offset is not None:
      options["steps_offset"] = int(steps_offset)
    if final_sigmas_type not in (None, "zero", "sigma_min"):
      raise UserError(f"final_sigmas_type={final_sigmas_type!r}: one of 'zero', 'sigma_min'")
    for key, value in (("use_karras_sigmas", use_karras_sigmas),
                       ("final_sigmas_type", final_sigmas_type)):
      if value is not None:
        options[key] = value
    rule = self.resolve_thresholding(thresholding)
    if rule is not None:
      # Our own rule: DDIM re-derives eps from the thresholded x_0, as ADM (a converted
      # scheduler's clip_sample keeps diffusers' default, the model's eps).
      options.update(thresholding=rule, use_clipped_model_output=True)
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
    init, start_step = self._init(num_samples, int(steps), init_image, init_latents, strength,
                                  mask)
    if sampler == "pndm" and (rule is not None or mask is not None or start_step):
      raise UserError("--sampler=pndm (PLMS) combines noise predictions: it takes no x_0 "
                      "thresholding (--thresholding=none), inpainting or strength < 1; use ddim")
    fn = self._sampler_fn(sampler, int(steps), int(num_samples), bool(trajectory), progress,
                          tuple(sorted(options.items())), latents is not None, start_step,
                          guidance_rescale > 0)
    out = fn(self.params, self.codec_params, cond, uncond, jnp.float32(guidance),
             jnp.float32(guidance_rescale), jnp.float32(eta), jax.random.key(seed) if rng is None else rng, latents, lowres,
             jnp.int32(self.aug_steps(aug_level) if lowres is not None else 0), init)
    convert = (lambda x: to_uint8(np.asarray(x))) if as_uint8 else np.asarray  # noqa: E731
    if trajectory:
      return convert(out[0]), convert(out[1])
    return convert(out)

  def _init(self, num_samples: int, steps: int, init_image, init_latents, strength, mask):
    """(the init arrays the sampler takes or None, the first step to run)."""
    if init_image is None and init_latents is None:
      if mask is not None or strength is not None:
        raise UserError(f"{'mask' if mask is not None else 'strength'} needs an init_image "
                        "(or init_latents) to start from")
      return None, 0
    if init_image is not None and init_latents is not None:
      raise UserError("give init_image or init_latents, not both")
    init = {}
    if init_image is not None:
      init["images"] = sample_inputs.as_images(init_image, self.image_size,
                                               self.image_channels)
      n = len(init["images"])
    else:
      z = np.asarray(init_latents, np.float32)
      z = z[None] if z.ndim == len(self.latent_shape) else z
      if z.shape[1:] != self.latent_shape:
        raise UserError(f"init_latents of shape {np.shape(init_latents)}: expected [N, "
                        f"{', '.join(map(str, self.latent_shape))}]")
      init["latents"], n = z, len(z)
    if n not in (1, num_samples):
      raise UserError(f"{n} init images for {num_samples} samples: give 1 or {num_samples}")
    if mask is not None:
      m = sample_inputs.latent_mask(mask, self.image_size, self.latent_shape[0])
      if len(m) not in (1, num_samples):
        raise UserError(f"{len(m)} masks for {num_samples} samples: give 1 or {num_samples}")
      init["mask"] = m
    try:
      start = samplers.strength_start_step(steps, 0.8 if strength is None else float(strength))
    except ValueError as e:
      raise UserError(str(e)) from e
    return jax.tree.map(jnp.asarray, init), start


def _encode_key(rng: jax.Array) -> jax.Array:
  """The key of an init image's posterior sample (apart from the sampler's keys)."""
  return jax.random.fold_in(rng, 3)


def steps_run(steps: int, strength: Optional[float] = None) -> int:
  """How many sampler steps a call runs: all `steps`, or with an init image (and `strength`,
  default 0.8) the last int(steps * strength)."""
  if strength is None:
    return int(steps)
  return int(steps) - samplers.strength_start_step(int(steps), float(strength))


# The name users and notebooks know: a latent diffusion workdir loads as one stage.
LatentDiffusionPipeline = DiffusionPipeline


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

  def __init__(self, stages: Sequence[DiffusionPipeline]):
    if not stages or stages[0].is_super_resolution:
      raise UserError("a cascade starts with a stage that is not conditioned on images")
    self.stages = list(stages)
    self.class_names = self.stages[0].class_names

  @classmethod
  def from_workdir(cls, workdir: str, step: Optional[int] = None):
    return from_workdir(workdir, step)

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


def scheduler_options(config: ml_collections.ConfigDict, stage: str = "ldm") -> dict:
  """config.<stage>.scheduler as a dict ({} when absent: each sampler's defaults)."""
  opts = config[stage].get("scheduler", None)
  return {} if opts is None else dict(opts.to_dict() if hasattr(opts, "to_dict") else opts)
