"""What every reverse-process sampler shares: the timestep tables of diffusers' schedulers, the
per-step noise, x_0 from a model output at a noise level, and the one `lax.scan` over steps
(with image-to-image's first step and inpainting's step hook). Pure functions; no sampler here.
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.thresholding import Thresholding

SPACINGS = ("leading", "linspace", "trailing")
DenoiseFn = Callable[..., jax.Array]
# step_hook(x, i) -> x: applied to the sample after step i (its index in the N-step schedule,
# int32), e.g. the mask blend of inpainting; runs inside the scan, so it must be traceable.
StepHook = Callable[[jax.Array, jax.Array], jax.Array]


class Trajectory(NamedTuple):
  x: jax.Array        # (num_steps, *x_T.shape): the sample after each step
  pred_x0: jax.Array  # (num_steps, *x_T.shape): the x_0 predicted at each step


def _unknown_spacing(spacing: str) -> ValueError:
  return ValueError(f"unknown timestep spacing {spacing!r} (sampling.timestep_spacing: "
                    f"one of {', '.join(repr(s) for s in SPACINGS)})")


def _checked(ts: np.ndarray, num_train_timesteps: int, spacing: str) -> np.ndarray:
  ts = np.asarray(ts, np.int64)
  if ts.size and (ts.max() >= num_train_timesteps or ts.min() < 0 or np.any(np.diff(ts) >= 0)):
    raise ValueError(f"timesteps {ts.tolist()} ({spacing!r} spacing) must be strictly decreasing "
                     f"within [0, {num_train_timesteps}); lower num_steps or steps_offset")
  return ts


def timesteps(spacing: str, num_train_timesteps: int, num_steps: int,
              steps_offset: int = 0) -> np.ndarray:
  """Descending int64 timesteps of DDPMScheduler / DDIMScheduler.set_timesteps (diffusers)."""
  T, n = num_train_timesteps, num_steps
  if not 1 <= n <= T:
    raise ValueError(f"sampling.num_steps must be in [1, {T}], got {n}")
  if spacing == "leading":
    ts = np.arange(n)[::-1] * (T // n) + steps_offset
  elif spacing == "linspace":
    ts = np.linspace(0, T - 1, n).round()[::-1]
  elif spacing == "trailing":
    ts = np.round(np.arange(T, 0, -T / n)) - 1
  else:
    raise _unknown_spacing(spacing)
  return _checked(ts, T, spacing)


def previous_timesteps(ts: np.ndarray, num_train_timesteps: int) -> np.ndarray:
  """The timestep each DDIM step goes to: t - T // N as diffusers' DDIMScheduler computes it for
  every spacing (for 'linspace' and some 'trailing' counts that is not the next listed
  timestep; DDPMScheduler takes the next listed one); -1 (below 0) means the final level."""
  prev = np.asarray(ts, np.int64) - num_train_timesteps // len(ts)
  return np.where(prev < 0, -1, prev)


def dpm_solver_timesteps(spacing: str, num_train_timesteps: int, num_steps: int,
                         steps_offset: int = 0) -> np.ndarray:
  """Timesteps of DPMSolverMultistepScheduler.set_timesteps: N + 1 points, the last (0) dropped."""
  T, n = num_train_timesteps, num_steps
  if not 1 <= n < T:
    raise ValueError(f"sampling.num_steps must be in [1, {T - 1}], got {n}")
  if spacing == "linspace":
    ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
  elif spacing == "leading":
    ts = (np.arange(n + 1) * (T // (n + 1)))[::-1][:-1] + steps_offset
  elif spacing == "trailing":
    ts = np.arange(T, 0, -T / n).round() - 1
  else:
    raise _unknown_spacing(spacing)
  return _checked(ts, T, spacing)


def fractional_timesteps(spacing: str, num_train_timesteps: int, num_steps: int,
                         steps_offset: int = 0) -> np.ndarray:
  """Descending float32 timesteps of EulerDiscreteScheduler / EulerAncestralDiscreteScheduler
  (diffusers): 'linspace' keeps linspace(0, T - 1, N)'s fractions (999, 978.6, ...)."""
  T, n = num_train_timesteps, num_steps
  if not 1 <= n <= T:
    raise ValueError(f"sampling.num_steps must be in [1, {T}], got {n}")
  if spacing == "linspace":
    ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
  elif spacing == "leading":
    ts = (np.arange(n) * (T // n)).round()[::-1].astype(np.float32) + steps_offset
  elif spacing == "trailing":
    ts = np.arange(T, 0, -T / n).round().astype(np.float32) - 1
  else:
    raise _unknown_spacing(spacing)
  ts = np.ascontiguousarray(ts, np.float32)
  if ts.max() > T - 1 or ts.min() < 0 or np.any(np.diff(ts) >= 0):
    raise ValueError(f"timesteps {ts.tolist()} ({spacing!r} spacing) must be strictly decreasing "
                     f"within [0, {T - 1}]; lower num_steps or steps_offset")
  return ts


def x0_at_level(x, out, alpha, sigma, parameterization: str):
  """x0^ from a model output at the level x = alpha x_0 + sigma eps (`predict_x0_and_eps`
  reads the schedule's table at t instead; Karras and Euler levels lie between its entries)."""
  if parameterization == "eps":
    return (x - sigma * out) / alpha
  if parameterization == "x0":
    return out
  if parameterization == "v":
    return alpha * x - sigma * out
  raise ValueError(f"unknown parameterization {parameterization!r} (eps, v, x0)")


def threshold(x0, thresholding: Thresholding | None):
  return x0 if thresholding is None else thresholding(x0)


def step_keys(rng, num_steps):
  """The per-step noise keys: step i draws from split(rng, num_steps)[i] (None: no noise)."""
  return None if rng is None else jax.random.split(rng, num_steps)


def step_noise(key, x):
  return jnp.zeros_like(x) if key is None else jax.random.normal(key, x.shape, x.dtype)


def run_chain(body, init, xs, return_trajectory, start_step=0, step_hook=None):
  """scan(body) over xs[start_step:]; body(carry, inp) -> (carry, (x, x0^)); carry is x or
  (x, ...). `step_hook(x, i)` rewrites x after step i."""
  num_steps = len(xs[0])
  if not 0 <= start_step < num_steps:
    raise ValueError(f"start_step={start_step} must be in [0, {num_steps}) for {num_steps} steps")
  xs = jax.tree.map(lambda a: a[start_step:], (xs, jnp.arange(num_steps, dtype=jnp.int32)))

  def scan_body(carry, inp):
    inp, i = inp
    carry, ys = body(carry, inp)
    if step_hook is not None:
      x = step_hook(carry[0] if isinstance(carry, tuple) else carry, i)
      carry = (x,) + carry[1:] if isinstance(carry, tuple) else x
      ys = (x,) + tuple(ys[1:])
    return carry, (ys if return_trajectory else None)

  carry, ys = jax.lax.scan(scan_body, init, xs)
  x = carry[0] if isinstance(carry, tuple) else carry
  return (x, Trajectory(*ys)) if return_trajectory else x
