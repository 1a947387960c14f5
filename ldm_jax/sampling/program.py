"""One sampling call as one jitted program: the whole reverse chain (one `lax.scan` of the
chosen sampler, guidance inside the scanned step), image-to-image's start and inpainting's
blend, a super-resolution stage's augmented low-resolution input, and the codec's decoder."""
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ldm_jax import diffusion
from ldm_jax.diffusion import samplers
from ldm_jax.errors import UserError
from ldm_jax.models import codecs
from ldm_jax.models.denoiser import LOWRES_KEYS, DiffusionModel
from ldm_jax.sampling.options import sampler_kwargs


def compile_sampler(*, model: DiffusionModel, codec: Any, schedule: diffusion.DiffusionSchedule,
                    parameterization: str, sampler: str, steps: int, num_samples: int,
                    trajectory: bool, progress: Optional[Callable[[int], None]],
                    options: tuple = (), given_latents: bool = False, start_step: int = 0,
                    rescaled: bool = False):
  """The jitted program of one sampling call: `run(params, codec_params, cond, uncond, scale,
  rescale, eta, rng, latents, lowres, aug_level, init=None)` -> decoded images in [-1, 1]
  (and the decoded trajectory with trajectory=True). Everything named here is static."""
  if sampler not in diffusion.SAMPLERS:
    raise UserError(f"unknown sampler {sampler!r}: one of {sorted(diffusion.SAMPLERS)}")
  shape, sched = tuple(codec.shape), schedule

  def model_fn(x, t, cond, params):
    if progress is not None:
      jax.debug.callback(lambda t: progress(int(t[0])), t)
    return model(params, x, t, cond)

  extra = sampler_kwargs(sampler, dict(options))
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
            codec.encode(codec_params, init["images"], encode_key(rng)))
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
    kwargs = dict(num_steps=steps, rng=r_steps, parameterization=parameterization,
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

  return jax.jit(run)


def encode_key(rng: jax.Array) -> jax.Array:
  """The key of an init image's posterior sample (apart from the sampler's keys)."""
  return jax.random.fold_in(rng, 3)
