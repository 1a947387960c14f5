"""Noise schedules of the discrete diffusion q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

With betas b_t (t = 0 .. T-1, index 0 is the first, least noisy step):

  alpha_t = 1 - b_t,   abar_t = prod_{s <= t} alpha_s,   SNR(t) = abar_t / (1 - abar_t).

Names of the beta schedules follow diffusers, not CompVis: our `scaled_linear` (betas linear in
sqrt, the LDM / Stable Diffusion schedule) is what CompVis' `make_beta_schedule` calls "linear",
and our `linear` is CompVis' "sqrt_linear". Tables are built in float64 numpy, stored as float32.
"""
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def beta_schedule(kind: str, num_timesteps: int, beta_start: float = 0.00085,
                  beta_end: float = 0.012, cosine_s: float = 0.008) -> np.ndarray:
  """The betas b_0 .. b_{T-1} as float64.

  linear:         b_t = linspace(beta_start, beta_end, T)[t]
  scaled_linear:  b_t = linspace(sqrt(beta_start), sqrt(beta_end), T)[t]^2        (LDM, SD)
  cosine:         abar(u) = cos^2(pi/2 (u + s) / (1 + s)),
                  b_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999)
                  (Nichol & Dhariwal 2021, eq. 17; `beta_start`/`beta_end` are unused)
  """
  if num_timesteps < 1:
    raise ValueError(f"diffusion.num_timesteps must be >= 1, got {num_timesteps}")
  if kind == "linear":
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  if kind == "scaled_linear":
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
  if kind == "cosine":
    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    abar = np.cos((u + cosine_s) / (1.0 + cosine_s) * np.pi / 2) ** 2
    return np.clip(1.0 - abar[1:] / abar[:-1], 0.0, 0.999)
  raise ValueError(f"unknown beta schedule {kind!r} (diffusion.schedule: one of "
                   f"{', '.join(repr(k) for k in BETA_SCHEDULES)})")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so that sqrt(abar_{T-1}) = 0.

    sqrt(abar)' = (sqrt(abar) - sqrt(abar_{T-1})) * sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_{T-1}))

  which keeps abar_0 and gives SNR(T-1) = 0 (so b_{T-1} = 1). Pair it with 'v' or 'x0'
  prediction: an 'eps' model cannot recover x_0 where abar = 0.
  """
  betas = np.asarray(betas, np.float64)
  sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
  first, last = sqrt_abar[0], sqrt_abar[-1]
  sqrt_abar = (sqrt_abar - last) * first / (first - last)
  abar = sqrt_abar ** 2
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return 1.0 - alphas


class DiffusionSchedule(NamedTuple):
  """Per-timestep tables, each float32 of shape (T,). A NamedTuple, hence a JAX pytree.

  betas                           b_t
  alphas                          alpha_t = 1 - b_t
  alphas_cumprod                  abar_t
  alphas_cumprod_prev             abar_{t-1}, with abar_{-1} = 1
  sqrt_alphas_cumprod             sqrt(abar_t)        (the signal scale "alpha" of VDM, DPM-Solver)
  sqrt_one_minus_alphas_cumprod   sqrt(1 - abar_t)      (the noise scale "sigma")
  log_snr                         log(abar_t / (1 - abar_t))   (-inf at zero terminal SNR)
  posterior_variance              btilde_t = (1 - abar_{t-1}) / (1 - abar_t) b_t  (Ho et al. eq. 7)
  posterior_log_variance_clipped  log btilde_t, with btilde_0 (= 0) replaced by btilde_1
  posterior_mean_coef1            sqrt(abar_{t-1}) b_t / (1 - abar_t)             (multiplies x_0)
  posterior_mean_coef2            sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)   (multiplies x_t)
  """
  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  log_snr: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef1: jnp.ndarray
  posterior_mean_coef2: jnp.ndarray

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def schedule_from_betas(betas: np.ndarray) -> DiffusionSchedule:
  """All tables of `DiffusionSchedule` from betas, computed in float64 and stored as float32."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or betas.size < 2:
    raise ValueError(f"betas must be a 1-D array of at least 2 values, got shape {betas.shape}")
  if np.any(betas <= 0) or np.any(betas > 1):
    raise ValueError("betas must lie in (0, 1]")
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  one_minus = 1.0 - abar
  with np.errstate(divide="ignore"):
    log_snr = np.log(abar) - np.log(one_minus)
  post_var = betas * (1.0 - abar_prev) / one_minus
  post_log_var = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
  tables = dict(
      betas=betas, alphas=alphas, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev,
      sqrt_alphas_cumprod=np.sqrt(abar), sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus),
      log_snr=log_snr, posterior_variance=post_var, posterior_log_variance_clipped=post_log_var,
      posterior_mean_coef1=np.sqrt(abar_prev) * betas / one_minus,
      posterior_mean_coef2=np.sqrt(alphas) * (1.0 - abar_prev) / one_minus)
  return DiffusionSchedule(**{k: jnp.asarray(v, jnp.float32) for k, v in tables.items()})


def make_schedule(kind: str = "scaled_linear", num_timesteps: int = 1000,
                  beta_start: float = 0.00085, beta_end: float = 0.012, cosine_s: float = 0.008,
                  zero_terminal_snr: bool = False) -> DiffusionSchedule:
  """`beta_schedule`, optionally `rescale_zero_terminal_snr`, then `schedule_from_betas`."""
  betas = beta_schedule(kind, num_timesteps, beta_start, beta_end, cosine_s)
  if zero_terminal_snr:
    betas = rescale_zero_terminal_snr(betas)
  return schedule_from_betas(betas)


def karras_sigmas(sigma_min, sigma_max, num_steps: int, rho: float = 7.0) -> jnp.ndarray:
  """Karras et al. 2022 (EDM), eq. 5: N noise levels sigma = sqrt((1 - abar) / abar), descending,

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,

  i = 0 .. N-1 (N = 1: sigma_max alone). The ends may be traced values."""
  if num_steps < 1:
    raise ValueError(f"sampling.num_steps must be >= 1, got {num_steps}")
  ramp = jnp.linspace(0.0, 1.0, num_steps)
  lo = jnp.asarray(sigma_min, jnp.float32) ** (1.0 / rho)
  hi = jnp.asarray(sigma_max, jnp.float32) ** (1.0 / rho)
  return (hi + ramp * (lo - hi)) ** rho


def sigma_to_timestep(sigmas, table_sigmas) -> jnp.ndarray:
  """The fractional timesteps of noise levels `sigmas`: log sigma interpolated linearly in the
  (increasing) table of sigma_t, t = 0 .. T-1, and clamped to [0, T-1] outside it."""
  table = jnp.log(jnp.asarray(table_sigmas, jnp.float32))
  index = jnp.arange(table.shape[0], dtype=jnp.float32)
  return jnp.interp(jnp.log(jnp.maximum(jnp.asarray(sigmas, jnp.float32), 1e-10)), table, index)


def stage_schedule(stage) -> DiffusionSchedule:
  """The schedule of a diffusion stage's config block (`stage.diffusion`: schedule,
  num_timesteps, beta_start, beta_end, zero_terminal_snr)."""
  d = stage.diffusion
  return make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end,
                       zero_terminal_snr=d.zero_terminal_snr)
