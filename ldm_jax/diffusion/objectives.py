"""Forward process, parameterisations, DDPM posterior and training losses.

Write alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t), so alpha_t^2 + sigma_t^2 = 1 and

  x_t = alpha_t x_0 + sigma_t eps,   eps ~ N(0, I)                              (q_sample)

A network output is one of three exactly interchangeable parameterisations (for fixed x_t, t):

  'eps':  eps                     x_0 = (x_t - sigma_t eps) / alpha_t
  'x0':   x_0                     eps = (x_t - alpha_t x_0) / sigma_t
  'v':    v = alpha_t eps - sigma_t x_0   (Salimans & Ho 2022)
          x_0 = alpha_t x_t - sigma_t v,   eps = sigma_t x_t + alpha_t v

`t` is an int array of shape (B,) (or a scalar) indexing the schedule; per-timestep scalars are
broadcast against the trailing axes of x.
"""
import jax
import jax.numpy as jnp

from ldm_jax.diffusion.schedules import DiffusionSchedule

PARAMETERIZATIONS = ("eps", "v", "x0")


def _check_parameterization(parameterization: str) -> None:
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f"unknown parameterization {parameterization!r} (diffusion.parameterization: "
                     f"one of {', '.join(repr(p) for p in PARAMETERIZATIONS)})")


def extract(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """table[t] reshaped to t.shape + (1,) * (ndim - t.ndim), ready to broadcast against x."""
  t = jnp.asarray(t)
  return jnp.reshape(table[t], t.shape + (1,) * (ndim - t.ndim))


def snr(sched: DiffusionSchedule, t: jax.Array) -> jax.Array:
  """SNR(t) = abar_t / (1 - abar_t), same shape as t."""
  abar = sched.alphas_cumprod[jnp.asarray(t)]
  return abar / (1.0 - abar)


def q_sample(sched: DiffusionSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps  (Ho et al. eq. 4)."""
  a = extract(sched.sqrt_alphas_cumprod, t, x0.ndim)
  s = extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
  return a * x0 + s * noise


def augment(sched: DiffusionSchedule, x: jax.Array, level: jax.Array,
            noise: jax.Array) -> jax.Array:
  """Noise-conditioning augmentation (Cascaded Diffusion Models, Imagen) of a conditioning
  image: `level` (int [B] or scalar) 0 keeps x, level s >= 1 gives q_sample at t = s - 1."""
  level = jnp.broadcast_to(jnp.asarray(level, jnp.int32), x.shape[:1])
  noised = q_sample(sched, x, jnp.maximum(level - 1, 0), noise)
  keep = (level == 0).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x, noised)


def target(sched: DiffusionSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array,
           parameterization: str = "eps") -> jax.Array:
  """What the network regresses: eps, x_0, or v = alpha_t eps - sigma_t x_0."""
  _check_parameterization(parameterization)
  if parameterization == "eps":
    return noise
  if parameterization == "x0":
    return x0
  a = extract(sched.sqrt_alphas_cumprod, t, x0.ndim)
  s = extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
  return a * noise - s * x0


def predict_x0_and_eps(sched: DiffusionSchedule, x_t: jax.Array, t: jax.Array,
                       model_out: jax.Array, parameterization: str = "eps"
                       ) -> tuple[jax.Array, jax.Array]:
  """(x_0, eps) implied by a model output at (x_t, t); see the module docstring.

  'eps' divides by alpha_t (infinite where abar_t = 0, i.e. at zero terminal SNR) and 'x0'
  divides by sigma_t; 'v' divides by nothing.
  """
  _check_parameterization(parameterization)
  a = extract(sched.sqrt_alphas_cumprod, t, x_t.ndim)
  s = extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
  if parameterization == "eps":
    return (x_t - s * model_out) / a, model_out
  if parameterization == "x0":
    return model_out, (x_t - a * model_out) / s
  return a * x_t - s * model_out, s * x_t + a * model_out


def ddpm_posterior(sched: DiffusionSchedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q(x_{t-1} | x_t, x_0) = N(mu~_t, b~_t I)  (Ho et al. eq. 6-7):

    mu~_t = sqrt(abar_{t-1}) b_t / (1 - abar_t) x_0
          + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
    b~_t  = (1 - abar_{t-1}) / (1 - abar_t) b_t

  Returns (mean, variance, log_variance_clipped); the latter two have shape t.shape + (1, ...)
  (broadcastable against x), and the log-variance at t = 0 is that of t = 1 (improved DDPM).
  """
  c1 = extract(sched.posterior_mean_coef1, t, x_t.ndim)
  c2 = extract(sched.posterior_mean_coef2, t, x_t.ndim)
  var = extract(sched.posterior_variance, t, x_t.ndim)
  log_var = extract(sched.posterior_log_variance_clipped, t, x_t.ndim)
  return c1 * x0 + c2 * x_t, var, log_var


def min_snr_weights(sched: DiffusionSchedule, t: jax.Array, gamma: float,
                    parameterization: str = "eps") -> jax.Array:
  """Min-SNR-gamma loss weights (Hang et al. 2023), shape t.shape.

  Expressed as weights on the loss of each parameterisation's own target, they equal
  min(SNR, gamma) on the x_0 loss:
    'eps': min(SNR, gamma) / SNR      (taken as 1 where SNR = 0)
    'v':   min(SNR, gamma) / (SNR + 1)
    'x0':  min(SNR, gamma)
  """
  _check_parameterization(parameterization)
  r = snr(sched, t)
  clipped = jnp.minimum(r, gamma)
  if parameterization == "eps":
    return jnp.minimum(gamma / r, 1.0)  # = min(SNR, gamma) / SNR, finite at SNR = 0
  if parameterization == "v":
    return clipped / (r + 1.0)
  return clipped


def diffusion_loss(model_out: jax.Array, target: jax.Array,
                   weights: jax.Array | None = None) -> jax.Array:
  """The 'simple' loss: mean over the batch of w_b * mean_{pixels} (model_out - target)^2.

  `weights` (shape (B,), e.g. `min_snr_weights`) default to 1; the result is a float32 scalar.
  """
  err = jnp.square(model_out.astype(jnp.float32) - target.astype(jnp.float32))
  per_example = jnp.mean(err, axis=tuple(range(1, err.ndim)))
  if weights is not None:
    per_example = per_example * weights.astype(jnp.float32)
  return jnp.mean(per_example)
