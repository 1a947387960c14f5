"""Euler and Euler-ancestral samplers (Karras et al. 2022, Alg. 1 without churn; k-diffusion's
`sample_euler` / `sample_euler_ancestral`), as diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler compute them.

They step the variance-exploding form x_ve = x / alpha = x_0 + sigma eps (sigma = sqrt((1 - abar)
/ abar)) between the levels sigma_1 > ... > sigma_N > sigma_{N+1} (0, or sigma at t = 0 with
final_sigmas_type='sigma_min'), each sigma_i interpolated linearly in the table at a fractional
timestep t_i (diffusers' interpolation_type='linear'), which the model sees unrounded:

  d  = (x_ve - x0^) / sigma                                          (x0^ thresholded)
  Euler:           x_ve' = x_ve + (sigma' - sigma) d
  Euler-ancestral: s_up = sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2),
                   s_down = sqrt(sigma'^2 - s_up^2),  x_ve' = x_ve + (s_down - sigma) d + s_up z

x_T, the trajectory, the result and inpainting's step hook are in the variance-preserving form
x = x_ve / sqrt(1 + sigma^2) (the model's input, diffusers' `scale_model_input`), so they mean
what they mean for every other sampler; the scan itself carries x_ve in diffusers' order of
operations, so its float32 rounding follows diffusers'. The model always sees the
fractional timestep (float32). Karras sigmas (use_karras_sigmas, Euler only as in diffusers):
the rho = 7 ramp between the first and last interpolated sigma, each timestep the fractional
`sigma_to_timestep` of its sigma.
"""
import jax
import jax.numpy as jnp

from ldm_jax.diffusion.chain import (StepHook, fractional_timesteps, run_chain, step_keys,
                                     step_noise, threshold)
from ldm_jax.diffusion.schedules import DiffusionSchedule, karras_sigmas, sigma_to_timestep
from ldm_jax.diffusion.thresholding import Thresholding


def _table_sigmas(sched: DiffusionSchedule):
  # zero terminal SNR: abar_{T-1} = 2^-24 as diffusers sets it, so sigma stays finite.
  a = jnp.maximum(sched.alphas_cumprod, 2.0 ** -24)
  return jnp.sqrt((1.0 - a) / a)


def euler_levels(sched: DiffusionSchedule, num_steps: int, spacing: str = "linspace",
                 steps_offset: int = 0, use_karras_sigmas: bool = False):
  """(timesteps float32 (N,), sigmas (N,)) of the N steps of diffusers' Euler schedulers.
  Traceable in the schedule (the timesteps of plain spacing are static)."""
  table = _table_sigmas(sched)
  ts = jnp.asarray(fractional_timesteps(spacing, sched.num_timesteps, num_steps, steps_offset))
  sig = jnp.interp(ts, jnp.arange(sched.num_timesteps, dtype=jnp.float32), table)
  if use_karras_sigmas:
    sig = karras_sigmas(sig[-1], sig[0], num_steps)
    ts = sigma_to_timestep(sig, table)
  return ts, sig


def initial_noise_scale(sched: DiffusionSchedule, num_steps: int, spacing: str = "linspace",
                        steps_offset: int = 0, use_karras_sigmas: bool = False):
  """The factor on unit noise that gives the chain's x_T as diffusers starts it: latents times
  `init_noise_sigma` (sigma_max for 'linspace' / 'trailing', sqrt(sigma_max^2 + 1) for
  'leading'), divided by sqrt(1 + sigma_1^2) into the chain's variance-preserving form."""
  _, sig = euler_levels(sched, num_steps, spacing, steps_offset, use_karras_sigmas)
  top = jnp.max(sig)
  init = top if spacing in ("linspace", "trailing") else jnp.sqrt(top * top + 1.0)
  return init / jnp.sqrt(1.0 + sig[0] * sig[0])


def _final_sigma(sched, final_sigmas_type):
  if final_sigmas_type == "zero":
    return jnp.zeros((1,), jnp.float32)
  if final_sigmas_type == "sigma_min":
    return _table_sigmas(sched)[:1]
  raise ValueError(f"unknown final_sigmas_type {final_sigmas_type!r} "
                   "(sampling.final_sigmas_type: 'zero' or 'sigma_min')")


def _x0_ve(x_ve, out, sigma, parameterization):
  """x0^ from the model output at the variance-exploding sample x_ve of level sigma, in
  diffusers' order of operations (the chain's float32 rounding then follows diffusers')."""
  if parameterization == "eps":
    return x_ve - sigma * out
  if parameterization == "v":
    return out * (-sigma / jnp.sqrt(sigma * sigma + 1.0)) + x_ve / (sigma * sigma + 1.0)
  if parameterization == "x0":
    return out
  raise ValueError(f"unknown parameterization {parameterization!r} (eps, v, x0)")


def _sample(denoise_fn, x_T, sched, *, num_steps, rng, model_args, parameterization, spacing,
            steps_offset, use_karras_sigmas, final_sigmas_type, thresholding, return_trajectory,
            start_step, step_hook, ancestral):
  ts, sig = euler_levels(sched, num_steps, spacing, steps_offset, use_karras_sigmas)
  sig_next = jnp.concatenate([sig[1:], _final_sigma(sched, final_sigmas_type)])
  if ancestral:
    up = jnp.sqrt(sig_next ** 2 * (sig ** 2 - sig_next ** 2) / sig ** 2)
    down = jnp.sqrt(sig_next ** 2 - up ** 2)
  else:
    up, down = jnp.zeros_like(sig), sig_next
  if not 0 <= start_step < num_steps:  # (before sig[start_step]; run_chain checks it too)
    raise ValueError(f"start_step={start_step} must be in [0, {num_steps}) for {num_steps} steps")

  # The scan carries x_ve (as diffusers); the trajectory and the step hook see x_ve's VP form.
  def body(x_ve, inp):
    t, s, s_next, s_up, s_down, key, i = inp
    x = x_ve / jnp.sqrt(s * s + 1.0)
    out = jnp.asarray(denoise_fn(x, jnp.full((x.shape[0],), t, jnp.float32), *model_args),
                      jnp.float32)
    x0 = threshold(_x0_ve(x_ve, out, s, parameterization), thresholding)
    x_ve = x_ve + (x_ve - x0) / s * (s_down - s)
    if ancestral:
      x_ve = x_ve + step_noise(key, x) * s_up
    to_vp = jnp.sqrt(s_next * s_next + 1.0)
    if step_hook is None:
      return x_ve, (x_ve / to_vp, x0)
    x = step_hook(x_ve / to_vp, i)
    return x * to_vp, (x, x0)

  xs = (ts, sig, sig_next, up, down, step_keys(rng if ancestral else None, num_steps),
        jnp.arange(num_steps, dtype=jnp.int32))
  x_ve = jnp.asarray(x_T, jnp.float32) * jnp.sqrt(sig[start_step] ** 2 + 1.0)
  # run_chain's own hook would see x_ve: the hook runs in `body` instead.
  out = run_chain(body, x_ve, xs, return_trajectory, start_step)
  last = jnp.sqrt(sig_next[-1] ** 2 + 1.0)
  if return_trajectory:
    return out[0] / last, out[1]
  return out / last


def euler_sample(denoise_fn, x_T: jax.Array, sched: DiffusionSchedule, *, num_steps: int,
                 rng: jax.Array | None = None, model_args: tuple = (),
                 parameterization: str = "eps", spacing: str = "linspace", steps_offset: int = 0,
                 use_karras_sigmas: bool = False, final_sigmas_type: str = "zero",
                 thresholding: Thresholding | None = None, return_trajectory: bool = False,
                 start_step: int = 0, step_hook: StepHook | None = None):
  """Euler (EulerDiscreteScheduler's defaults; deterministic: `rng` is accepted and ignored).
  x_T is the variance-preserving sample at the first level run: for sampling from noise,
  unit noise times `initial_noise_scale`."""
  return _sample(denoise_fn, x_T, sched, num_steps=num_steps, rng=rng, model_args=model_args,
                 parameterization=parameterization, spacing=spacing, steps_offset=steps_offset,
                 use_karras_sigmas=use_karras_sigmas, final_sigmas_type=final_sigmas_type,
                 thresholding=thresholding, return_trajectory=return_trajectory,
                 start_step=start_step, step_hook=step_hook, ancestral=False)


def euler_ancestral_sample(denoise_fn, x_T: jax.Array, sched: DiffusionSchedule, *,
                           num_steps: int, rng: jax.Array, model_args: tuple = (),
                           parameterization: str = "eps", spacing: str = "linspace",
                           steps_offset: int = 0, thresholding: Thresholding | None = None,
                           return_trajectory: bool = False, start_step: int = 0,
                           step_hook: StepHook | None = None):
  """Euler-ancestral (EulerAncestralDiscreteScheduler: final sigma 0, no Karras sigmas); the
  noise of step i is `normal(split(rng, num_steps)[i])`."""
  if rng is None:
    raise ValueError("euler_ancestral_sample needs rng")
  return _sample(denoise_fn, x_T, sched, num_steps=num_steps, rng=rng, model_args=model_args,
                 parameterization=parameterization, spacing=spacing, steps_offset=steps_offset,
                 use_karras_sigmas=False, final_sigmas_type="zero", thresholding=thresholding,
                 return_trajectory=return_trajectory, start_step=start_step,
                 step_hook=step_hook, ancestral=True)


def levels(sched: DiffusionSchedule, num_steps: int, spacing: str = "linspace",
           steps_offset: int = 0, use_karras_sigmas: bool = False):
  """(timesteps, alpha, sigma) of the VP levels before each step (x = alpha x_0 + sigma eps):
  what diffusers' Euler `add_noise` gives (x_0 + sigma_ve eps), in the chain's form."""
  ts, sig = euler_levels(sched, num_steps, spacing, steps_offset, use_karras_sigmas)
  alpha = jax.lax.rsqrt(1.0 + sig * sig)
  return ts, alpha, sig * alpha

