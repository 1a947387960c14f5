"""PLMS (Liu et al. 2022, "pseudo linear multistep"; the `--plms` sampler of CompVis'
txt2img) as diffusers' PNDMScheduler runs it with skip_prk_steps=True (Stable Diffusion 1.x's
scheduler_config.json), in one `lax.scan`.

With the 'leading' timesteps t_1 > ... > t_N (stride r = T // N, `steps_offset`), the model is
called N + 1 times, at t_1, t_2, t_2, t_3, ..., t_N (t_2 twice: the second call redoes the
first step with the mean of two outputs, a Heun-like start). Call k combines the outputs e_k
with the stored ones (Adams-Bashforth: 1; (e_2 + e_1) / 2 on the redone step; (3, -1) / 2;
(23, -16, 5) / 12; then (55, -59, 37, -9) / 24) into e' and takes the PNDM transfer (paper
eq. 9) from abar = abar_t to abar' = abar_{t - r} (abar_0 or 1 below 0):

  x' = sqrt(abar' / abar) x - (abar' - abar) e' / (abar sqrt(1 - abar')
                                                   + sqrt(abar (1 - abar) abar'))

(v-prediction: e' = sqrt(abar) e' + sqrt(1 - abar) x first, as diffusers). PLMS combines noise
predictions, so x_0 thresholding, image-to-image from a later step and inpainting's per-step
blend are refused (DDIM does them).
"""
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.chain import StepHook, run_chain, timesteps
from ldm_jax.diffusion.schedules import DiffusionSchedule
from ldm_jax.diffusion.thresholding import Thresholding

_AB = {0: (1.0, 0.0, 0.0, 0.0), 1: (0.5, 0.5, 0.0, 0.0), 2: (1.5, -0.5, 0.0, 0.0),
       3: (23 / 12, -16 / 12, 5 / 12, 0.0)}
_AB4 = (55 / 24, -59 / 24, 37 / 24, -9 / 24)


def plms_calls(num_train_timesteps: int, num_steps: int, steps_offset: int = 0):
  """(model timesteps, transfer-from timesteps, transfer-to timesteps) of each model call,
  int64 arrays of length N + 1 (1 for N = 1), as PNDMScheduler(skip_prk_steps=True)."""
  ts = timesteps("leading", num_train_timesteps, num_steps, steps_offset)  # descending
  r = num_train_timesteps // num_steps
  calls = ts if num_steps == 1 else np.concatenate([ts[:1], ts[1:2], ts[1:]])
  frm, to = calls.copy(), calls - r
  if num_steps > 1:  # the redone first step: from t_1 to t_2 again
    frm[1], to[1] = calls[0], calls[1]
  return calls, frm, to


def pndm_sample(denoise_fn, x_T: jax.Array, sched: DiffusionSchedule, *, num_steps: int,
                rng: jax.Array | None = None, model_args: tuple = (),
                parameterization: str = "eps", steps_offset: int = 1,
                set_alpha_to_one: bool = False, spacing: str = "leading",
                thresholding: Thresholding | None = None, return_trajectory: bool = False,
                start_step: int = 0, step_hook: StepHook | None = None):
  """PLMS (PNDMScheduler's skip_prk_steps path; deterministic: `rng` is ignored). Defaults are
  Stable Diffusion 1.x's (steps_offset=1, set_alpha_to_one=False). The trajectory has one
  entry per model call (N + 1)."""
  del rng
  if spacing != "leading":
    raise ValueError(f"the pndm sampler has 'leading' timesteps only, got {spacing!r} "
                     "(sampling.timestep_spacing)")
  if parameterization not in ("eps", "v"):
    raise ValueError(f"the pndm sampler needs an eps or v model, got {parameterization!r}")
  if thresholding is not None or start_step or step_hook is not None:
    raise ValueError("the pndm sampler combines noise predictions: no x_0 thresholding, "
                     "image-to-image from a later step or inpainting (use ddim)")
  calls, frm, to = plms_calls(sched.num_timesteps, num_steps, steps_offset)
  a = sched.alphas_cumprod
  final = jnp.float32(1.0) if set_alpha_to_one else a[0]
  a_t = a[frm]
  a_prev = jnp.where(to >= 0, a[np.maximum(to, 0)], final)
  coef = np.array([_AB.get(k, _AB4) for k in range(len(calls))], np.float32)
  push = np.arange(len(calls)) != 1  # the redone step's output is not stored
  redo = np.arange(len(calls)) == 1  # ... and starts from the first step's sample

  def body(carry, inp):
    x, start, h1, h2, h3 = carry
    t, at, ap, c, keep, again = inp
    out = jnp.asarray(denoise_fn(x, jnp.full((x.shape[0],), t, jnp.int32), *model_args),
                      jnp.float32)
    e = c[0] * out + c[1] * h1 + c[2] * h2 + c[3] * h3
    src = jnp.where(again, start, x)
    if parameterization == "v":
      e = jnp.sqrt(at) * e + jnp.sqrt(1.0 - at) * src
    x0 = (src - jnp.sqrt(1.0 - at) * e) / jnp.sqrt(at)
    denom = at * jnp.sqrt(1.0 - ap) + jnp.sqrt(at * (1.0 - at) * ap)
    new = jnp.sqrt(ap / at) * src - (ap - at) * e / denom
    h1, h2, h3 = (jnp.where(keep, out, h1), jnp.where(keep, h1, h2), jnp.where(keep, h2, h3))
    return (new, src, h1, h2, h3), (new, x0)

  x_T = jnp.asarray(x_T, jnp.float32)
  zero = jnp.zeros_like(x_T)
  xs = (jnp.asarray(calls, jnp.int32), a_t, a_prev, jnp.asarray(coef), jnp.asarray(push),
        jnp.asarray(redo))
  out = run_chain(body, (x_T, x_T, zero, zero, zero), xs, return_trajectory)
  return out
