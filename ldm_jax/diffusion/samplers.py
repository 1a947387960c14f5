"""Reverse-process samplers, each ONE `jax.lax.scan` over per-step tables; none holds a model.

Every sampler takes `denoise_fn(x_t, t, *model_args) -> model_out` (t of shape (B,): int32, or
float32 for the Euler samplers; the output in `parameterization`), starts from x_T and visits timesteps t_1 > t_2 > ... > t_N. Writing
abar = abar_{t_i}, abar' = the next level, and (x0^, eps^) the model's prediction at (x, t_i):

DDPM, ancestral, fixed small variance; respaced (improved DDPM) for N < T, so b' = 1 - abar / abar'
and abar' = 1 after the last step:
  x' = sqrt(abar') b' / (1 - abar) x0^ + sqrt(1 - b') (1 - abar') / (1 - abar) x
       + sqrt((1 - abar') / (1 - abar) b') z
DDIM (Song et al. 2021, eq. 12); after the last step abar' = abar_0 (set_alpha_to_one=False) or 1:
  s   = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')
  x'  = sqrt(abar') x0^ + sqrt(1 - abar' - s^2) eps^ + s z
DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), alpha = sqrt(abar), sigma = sqrt(1 - abar),
lambda = log(alpha / sigma), h = lambda' - lambda, h_ = lambda - lambda_prev (the previous h):
  x'  = (sigma' / sigma) x - alpha' (e^-h - 1) (D0 + D1 / 2),   D0 = x0^_i,
  D1  = (h / h_) (x0^_i - x0^_{i-1});   D1 = 0 on the first step and on first-order final steps.
With Karras sigmas ("DPM++ 2M Karras") the levels are sigma_i = (smax^(1/7) + i/(N-1)
(smin^(1/7) - smax^(1/7)))^7 between the table's ends (sigma = sqrt((1 - abar) / abar),
alpha = 1 / sqrt(1 + sigma^2)), the model evaluated at the rounded matching timestep.
Euler and Euler-ancestral (`ldm_jax.diffusion.euler`): diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler; their model sees fractional (float32) timesteps, and their x_T
from noise is unit noise times `initial_noise_scale` (diffusers' init_noise_sigma).

Every sampler takes `thresholding` (`ldm_jax.diffusion.thresholding`: none, static clipping or
Imagen's dynamic thresholding), applied to x0^ at every step before it is used.

Timesteps follow diffusers ('leading', 'linspace', 'trailing' spacings, `steps_offset`). The noise
of step i is `jax.random.normal(jax.random.split(rng, num_steps)[i], x_T.shape, jnp.float32)`.
Jit with `num_steps` (and the other str/bool options) static; eta, rng, guidance scale and the
schedule are runtime values, so changing them does not retrace:

  run = jax.jit(functools.partial(ddim_sample, guided(model_fn), num_steps=50))
  x0 = run(x_T, sched, rng=key, eta=0.0, model_args=(cond, uncond, scale))

Image-to-image and inpainting (SDEdit; diffusers' img2img and legacy inpaint pipelines) use two
keywords every sampler takes: `start_step` (static) runs only steps start_step .. N-1 of the
N-step schedule, x_T then being the sample at that step's level (`sampler_levels`; DPM-Solver++
makes its first step run first order); `step_hook(x, i)` rewrites x after step i inside the
scan (the mask blend).
"""
import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.chain import (SPACINGS, DenoiseFn, StepHook, Trajectory,  # noqa: F401
                                     dpm_solver_timesteps, previous_timesteps, run_chain,
                                     step_keys, step_noise, threshold, timesteps, x0_at_level)
from ldm_jax.diffusion.euler import euler_ancestral_sample, euler_sample
from ldm_jax.diffusion.euler import initial_noise_scale as euler_noise_scale
from ldm_jax.diffusion.euler import levels as euler_vp_levels
from ldm_jax.diffusion.objectives import predict_x0_and_eps
from ldm_jax.diffusion.pndm import pndm_sample
from ldm_jax.diffusion.schedules import DiffusionSchedule, karras_sigmas, sigma_to_timestep
from ldm_jax.diffusion.thresholding import Thresholding


def _predict(denoise_fn, sched, x, t, model_args, parameterization, thresholding,
             recompute_eps=False):
  """(x0^, eps^) from one model call at the scalar timestep t, broadcast to the batch; x0^
  thresholded, and eps^ re-derived from it when `recompute_eps` (ADM's DDIM; diffusers'
  use_clipped_model_output)."""
  tb = jnp.full((x.shape[0],), t, jnp.int32)
  out = jnp.asarray(denoise_fn(x, tb, *model_args), jnp.float32)
  x0, eps = predict_x0_and_eps(sched, x, tb, out, parameterization)
  if thresholding is not None:
    x0 = thresholding(x0)
    if recompute_eps:
      a = sched.alphas_cumprod[t]
      eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
  return x0, eps


def ddpm_sample(denoise_fn: DenoiseFn, x_T: jax.Array, sched: DiffusionSchedule, *,
                num_steps: int, rng: jax.Array, model_args: tuple = (),
                parameterization: str = "eps", spacing: str = "leading", steps_offset: int = 0,
                thresholding: Thresholding | None = None, return_trajectory: bool = False,
                start_step: int = 0, step_hook: StepHook | None = None):
  """Ancestral sampling from p(x_{t'} | x_t) = q(x_{t'} | x_t, x0^) with the fixed small variance.

  With num_steps = T (and the defaults) this is Ho et al.'s chain; fewer steps respace it, the
  betas recomputed from the kept abar (improved DDPM; diffusers DDPMScheduler, clip_sample off).
  Each step goes to the next listed timestep, as diffusers' DDPMScheduler (not DDIM's t - T // N).
  """
  if rng is None:
    raise ValueError("ddpm_sample needs rng")
  ts = timesteps(spacing, sched.num_timesteps, num_steps, steps_offset)
  a_t = sched.alphas_cumprod[ts]
  a_prev = jnp.concatenate([sched.alphas_cumprod[ts[1:]], jnp.ones((1,), jnp.float32)])
  beta = 1.0 - a_t / a_prev
  coef_x0 = jnp.sqrt(a_prev) * beta / (1.0 - a_t)
  coef_xt = jnp.sqrt(a_t / a_prev) * (1.0 - a_prev) / (1.0 - a_t)
  std = jnp.sqrt(beta * (1.0 - a_prev) / (1.0 - a_t))  # 0 on the last step

  def body(x, inp):
    t, c0, ct, s, key = inp
    x0, _ = _predict(denoise_fn, sched, x, t, model_args, parameterization, thresholding)
    x = c0 * x0 + ct * x + s * step_noise(key, x)
    return x, (x, x0)

  xs = (jnp.asarray(ts, jnp.int32), coef_x0, coef_xt, std, step_keys(rng, num_steps))
  return run_chain(body, jnp.asarray(x_T, jnp.float32), xs, return_trajectory, start_step,
              step_hook)


def _ddim_tables(sched, num_steps, spacing, steps_offset, set_alpha_to_one):
  ts = timesteps(spacing, sched.num_timesteps, num_steps, steps_offset)
  prev = previous_timesteps(ts, sched.num_timesteps)
  a = sched.alphas_cumprod
  final = jnp.float32(1.0) if set_alpha_to_one else a[0]
  return ts, prev, a[ts], jnp.where(prev >= 0, a[np.maximum(prev, 0)], final)


def ddim_sample(denoise_fn: DenoiseFn, x_T: jax.Array, sched: DiffusionSchedule, *,
                num_steps: int, rng: jax.Array | None = None, eta: float | jax.Array = 0.0,
                model_args: tuple = (), parameterization: str = "eps", spacing: str = "leading",
                steps_offset: int = 1, set_alpha_to_one: bool = False,
                thresholding: Thresholding | None = None, recompute_eps: bool = False,
                return_trajectory: bool = False, start_step: int = 0,
                step_hook: StepHook | None = None):
  """DDIM with stochasticity eta (0: deterministic, 1: DDPM's posterior variance).

  Defaults are Stable Diffusion's DDIMScheduler (leading spacing, steps_offset=1,
  set_alpha_to_one=False, no thresholding). With `thresholding`, eps^ stays the model's unless
  `recompute_eps` (diffusers' default; ADM re-derives it from the thresholded x0^). Each step
  goes to t - T // N (`previous_timesteps`) as diffusers' DDIMScheduler computes it for every
  spacing: for 'leading' that is the next listed timestep, for 'linspace' it is not. With
  rng=None the noise term is dropped, so eta > 0 needs an rng.
  """
  if rng is None and isinstance(eta, (int, float)) and eta != 0:
    raise ValueError("ddim_sample with eta > 0 needs rng")
  ts, _, a_t, a_prev = _ddim_tables(sched, num_steps, spacing, steps_offset, set_alpha_to_one)
  var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
  eta = jnp.asarray(eta, jnp.float32)

  def body(x, inp):
    t, at_prev, v, key = inp
    x0, eps = _predict(denoise_fn, sched, x, t, model_args, parameterization, thresholding,
                       recompute_eps)
    s = eta * jnp.sqrt(v)
    x = (jnp.sqrt(at_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - at_prev - s * s, 0.0)) * eps
         + s * step_noise(key, x))
    return x, (x, x0)

  xs = (jnp.asarray(ts, jnp.int32), a_prev, var, step_keys(rng, num_steps))
  return run_chain(body, jnp.asarray(x_T, jnp.float32), xs, return_trajectory, start_step,
              step_hook)


def ddim_invert(denoise_fn: DenoiseFn, x_0: jax.Array, sched: DiffusionSchedule, *,
                num_steps: int, model_args: tuple = (), parameterization: str = "eps",
                spacing: str = "leading", steps_offset: int = 1, set_alpha_to_one: bool = False,
                return_trajectory: bool = False):
  """Deterministic DDIM run forwards (x_0 -> x_T), visiting `ddim_sample`'s levels in reverse.

  From the level abar' (timestep t', model evaluated at max(t', 0)) to abar:
    x = sqrt(abar) x0^ + sqrt(1 - abar) eps^.
  `x_0` is at ddim_sample's final level (abar_0, or 1 with set_alpha_to_one).
  """
  ts, prev, a_t, _ = _ddim_tables(sched, num_steps, spacing, steps_offset, set_alpha_to_one)

  def body(x, inp):
    t_from, at = inp
    x0, eps = _predict(denoise_fn, sched, x, t_from, model_args, parameterization, None)
    x = jnp.sqrt(at) * x0 + jnp.sqrt(1.0 - at) * eps
    return x, (x, x0)

  xs = (jnp.asarray(np.maximum(prev, 0)[::-1], jnp.int32), a_t[::-1])
  return run_chain(body, jnp.asarray(x_0, jnp.float32), xs, return_trajectory)


def dpm_solver_karras_levels(sched: DiffusionSchedule, num_steps: int):
  """(timesteps int32 (N,), sigmas (N,)) of DPMSolverMultistepScheduler with
  use_karras_sigmas: Karras' rho = 7 ramp between the table's sigma_max = sigma_{T-1} and
  sigma_min = sigma_0 (sigma_t = sqrt((1 - abar_t) / abar_t)), each level's model timestep
  the rounded fractional timestep of its sigma. The solver steps between these sigmas; the
  model sees the rounded timesteps. Traceable (the schedule may be a runtime value)."""
  if not 1 <= num_steps < sched.num_timesteps:
    raise ValueError(f"sampling.num_steps must be in [1, {sched.num_timesteps - 1}], "
                     f"got {num_steps}")
  a = jnp.maximum(sched.alphas_cumprod, 2.0 ** -24)
  table = jnp.sqrt((1.0 - a) / a)
  sig = karras_sigmas(table[0], table[-1], num_steps)
  return jnp.round(sigma_to_timestep(sig, table)).astype(jnp.int32), sig


def dpm_solver_pp_2m_sample(denoise_fn: DenoiseFn, x_T: jax.Array, sched: DiffusionSchedule, *,
                            num_steps: int, rng: jax.Array | None = None, model_args: tuple = (),
                            parameterization: str = "eps", spacing: str = "linspace",
                            steps_offset: int = 0, lower_order_final: bool = True,
                            final_sigmas_type: str = "zero",
                            thresholding: Thresholding | None = None,
                            return_trajectory: bool = False, start_step: int = 0,
                            step_hook: StepHook | None = None, use_karras_sigmas: bool = False):
  """DPM-Solver++(2M), multistep data prediction, midpoint form (diffusers' defaults).

  The first step is first order; so is the last when lower_order_final and N < 15, or when
  final_sigmas_type='zero' (the last step then lands on sigma = 0 and returns x0^). With
  'sigma_min' it ends at abar_0 instead. Deterministic: `rng` is accepted and ignored.
  With use_karras_sigmas ("DPM++ 2M Karras") the N levels are `dpm_solver_karras_levels`
  (`spacing` and `steps_offset` are then unused); x0^ always comes from the level's own
  (alpha, sigma), as in diffusers.
  """
  del rng
  if final_sigmas_type not in ("zero", "sigma_min"):
    raise ValueError(f"unknown final_sigmas_type {final_sigmas_type!r} "
                     "(sampling.final_sigmas_type: 'zero' or 'sigma_min')")
  n = num_steps
  a = jnp.maximum(sched.alphas_cumprod, 2.0 ** -24)  # finite lambda at zero terminal SNR
  if use_karras_sigmas:
    ts, sig = dpm_solver_karras_levels(sched, n)
    alpha_n = jax.lax.rsqrt(1.0 + sig * sig)
    sigma_n = sig * alpha_n
  else:
    ts = dpm_solver_timesteps(spacing, sched.num_timesteps, n, steps_offset)
    alpha_n, sigma_n = jnp.sqrt(a[ts]), jnp.sqrt(1.0 - a[ts])
  # The final level: sigma = 0 ('zero') or abar_0 ('sigma_min').
  a_final = jnp.ones((1,), jnp.float32) if final_sigmas_type == "zero" else a[:1]
  alpha = jnp.concatenate([alpha_n, jnp.sqrt(a_final)])
  sigma = jnp.concatenate([sigma_n, jnp.sqrt(1.0 - a_final)])
  lam = jnp.log(alpha) - jnp.log(sigma)  # +inf at sigma = 0
  h = lam[1:] - lam[:-1]
  h_prev = jnp.concatenate([jnp.ones((1,), jnp.float32), h[:-1]])
  second = np.arange(n) >= 1
  if final_sigmas_type == "zero" or (lower_order_final and n < 15):
    second[-1] = False
  second[min(max(start_step, 0), n - 1)] = False  # the first step run has no history
  c = -alpha[1:] * jnp.expm1(-h)
  inv_r = h / h_prev
  coef_x = sigma[1:] / sigma[:-1]
  coef_d0 = jnp.where(second, c * (1.0 + 0.5 * inv_r), c)
  coef_d1 = jnp.where(second, -0.5 * c * inv_r, 0.0)

  def body(carry, inp):
    x, x0_last = carry
    t, al, si, cx, c0, c1 = inp
    out = jnp.asarray(denoise_fn(x, jnp.full((x.shape[0],), t, jnp.int32), *model_args),
                      jnp.float32)
    x0 = x0_at_level(x, out, al, si, parameterization)
    x0 = threshold(x0, thresholding)
    x = cx * x + c0 * x0 + c1 * x0_last
    return (x, x0), (x, x0)

  x_T = jnp.asarray(x_T, jnp.float32)
  xs = (jnp.asarray(ts, jnp.int32), alpha[:-1], sigma[:-1], coef_x, coef_d0, coef_d1)
  return run_chain(body, (x_T, jnp.zeros_like(x_T)), xs, return_trajectory, start_step, step_hook)


SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample, "dpmpp_2m": dpm_solver_pp_2m_sample,
            "euler": euler_sample, "euler_a": euler_ancestral_sample, "pndm": pndm_sample}
# The samplers whose model sees fractional timesteps and whose x_T from noise is scaled
# (`initial_noise_scale`).
EULER = ("euler", "euler_a")


def sample(sampler: str, denoise_fn: DenoiseFn, x_T: jax.Array, sched: DiffusionSchedule,
           **kwargs):
  """`SAMPLERS[sampler](denoise_fn, x_T, sched, **kwargs)`."""
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r} (sampling.sampler: one of "
                     f"{', '.join(repr(s) for s in SAMPLERS)})")
  return SAMPLERS[sampler](denoise_fn, x_T, sched, **kwargs)


def sampler_levels(sampler: str, sched: DiffusionSchedule, num_steps: int, **kwargs):
  """(timesteps int32 [N], alpha [N], sigma [N]) of the levels `sample(sampler, ...,
  num_steps=num_steps, **kwargs)` visits: x_t = alpha x_0 + sigma eps before step i (the
  levels diffusers' `add_noise` uses for img2img and inpainting). The spacing, steps_offset
  and use_karras_sigmas come from kwargs, else the sampler's defaults (other keys ignored)."""
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r} (sampling.sampler: one of "
                     f"{', '.join(repr(s) for s in SAMPLERS)})")
  params = inspect.signature(SAMPLERS[sampler]).parameters
  opts = {k: kwargs.get(k, params[k].default) for k in ("spacing", "steps_offset")}
  if sampler in EULER:
    return euler_vp_levels(sched, num_steps, use_karras_sigmas=(
        sampler == "euler" and bool(kwargs.get("use_karras_sigmas", False))), **opts)
  if sampler == "dpmpp_2m" and kwargs.get("use_karras_sigmas", False):
    ts, sig = dpm_solver_karras_levels(sched, num_steps)
    alpha = jax.lax.rsqrt(1.0 + sig * sig)
    return ts, alpha, sig * alpha
  table = dpm_solver_timesteps if sampler == "dpmpp_2m" else timesteps
  ts = table(opts["spacing"], sched.num_timesteps, num_steps, opts["steps_offset"])
  a = sched.alphas_cumprod[ts]
  if sampler == "dpmpp_2m":  # as the solver: finite lambda at zero terminal SNR
    a = jnp.maximum(a, 2.0 ** -24)
  return jnp.asarray(ts, jnp.int32), jnp.sqrt(a), jnp.sqrt(1.0 - a)


def initial_noise_scale(sampler: str, sched: DiffusionSchedule, num_steps: int, **kwargs):
  """The factor on unit noise that makes x_T for sampling from noise: 1, except for the Euler
  samplers (diffusers' `init_noise_sigma` in the chain's form, `euler.initial_noise_scale`).
  Options as `sampler_levels`."""
  if sampler not in EULER:
    return jnp.float32(1.0)
  params = inspect.signature(SAMPLERS[sampler]).parameters
  opts = {k: kwargs.get(k, params[k].default) for k in ("spacing", "steps_offset")}
  return euler_noise_scale(sched, num_steps, use_karras_sigmas=(
      sampler == "euler" and bool(kwargs.get("use_karras_sigmas", False))), **opts)


def strength_start_step(num_steps: int, strength: float) -> int:
  """The first step of an N-step schedule that image-to-image runs (SDEdit; diffusers'
  img2img `get_timesteps`): the last min(int(N * strength), N) steps run, from the init
  latents noised to the first of them. Raises ValueError when no step would run."""
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength={strength} must be in (0, 1]")
  run = min(int(num_steps * strength), num_steps)
  if run < 1:
    raise ValueError(f"strength={strength} runs int({num_steps} * {strength}) = 0 of "
                     f"{num_steps} steps; raise the strength or the number of steps")
  return num_steps - run


def rescale_guidance(guided_out: jax.Array, cond_out: jax.Array, phi) -> jax.Array:
  """Guidance rescale (Lin et al. 2023, eq. 15-16; diffusers' rescale_noise_cfg): the guided
  output scaled to the conditional output's standard deviation per sample (unbiased, as
  torch.std), mixed with weight phi into the guided one."""
  axes = tuple(range(1, guided_out.ndim))
  std_c = jnp.std(cond_out, axis=axes, keepdims=True, ddof=1)
  std_g = jnp.std(guided_out, axis=axes, keepdims=True, ddof=1)
  return phi * (guided_out * (std_c / std_g)) + (1.0 - phi) * guided_out


def cfg_denoise(model_fn: DenoiseFn, x_t: jax.Array, t: jax.Array, cond: Any, uncond: Any,
                scale: float | jax.Array, *args, rescale=None) -> jax.Array:
  """Classifier-free guidance (Ho & Salimans 2022) from ONE model call on the doubled batch:

    [out_c, out_u] = model_fn([x_t, x_t], [t, t], [cond, uncond], *args)
    out = out_u + scale (out_c - out_u)      then, with `rescale` phi, `rescale_guidance`

  cond/uncond are arrays or pytrees with a leading batch axis (uncond may have batch 1); scale is
  a scalar or shape (B,). Valid for any parameterisation (all are affine in the output).
  """
  b = x_t.shape[0]
  both = jax.tree.map(
      lambda c, u: jnp.concatenate([c, jnp.broadcast_to(u, c.shape).astype(c.dtype)], 0),
      cond, uncond)
  out = model_fn(jnp.concatenate([x_t, x_t], 0), jnp.concatenate([t, t], 0), both, *args)
  out_c, out_u = out[:b], out[b:]
  scale = jnp.asarray(scale, out.dtype)
  scale = jnp.reshape(scale, scale.shape + (1,) * (out.ndim - scale.ndim))
  guided_out = out_u + scale * (out_c - out_u)
  if rescale is None:
    return guided_out
  return rescale_guidance(guided_out, out_c, jnp.asarray(rescale, out.dtype))


def guided(model_fn: DenoiseFn, rescaled: bool = False) -> DenoiseFn:
  """The `denoise_fn(x_t, t, cond, uncond, scale, *args)` of `cfg_denoise`, for the samplers:
  pass model_args=(cond, uncond, scale, *args) so all of them stay runtime values. With
  `rescaled`, `denoise_fn(x_t, t, cond, uncond, scale, phi, *args)` (guidance rescale phi)."""
  if not rescaled:
    return functools.partial(cfg_denoise, model_fn)

  def fn(x_t, t, cond, uncond, scale, phi, *args):
    return cfg_denoise(model_fn, x_t, t, cond, uncond, scale, *args, rescale=phi)
  return fn
