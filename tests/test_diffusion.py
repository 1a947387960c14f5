"""Diffusion math: schedules, objectives and samplers against independent numpy references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion as D

T = 1000
SHAPE = (2, 4, 4, 3)
SCHED = D.make_schedule("scaled_linear", T)
A64 = np.cumprod(1.0 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T) ** 2)  # float64 abar


def toy_eps(xp, abar_table):
  """An eps-model usable from numpy and JAX: eps = sigma_t x + 0.1 alpha_t sin(3x) (O(1) values)."""
  def fn(x, t):
    a = xp.reshape(abar_table[t], (-1,) + (1,) * (x.ndim - 1))
    return xp.sqrt(1.0 - a) * x + 0.1 * xp.sqrt(a) * xp.sin(3.0 * x)
  return fn


JAX_EPS = toy_eps(jnp, SCHED.alphas_cumprod)
NP_EPS = toy_eps(np, A64)


def x_T_and_noise(num_steps, seed=0):
  rng = jax.random.PRNGKey(seed)
  x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(seed + 100), SHAPE), np.float64)
  keys = jax.random.split(rng, num_steps)  # the documented per-step noise
  z = [np.asarray(jax.random.normal(k, SHAPE, jnp.float32), np.float64) for k in keys]
  return rng, x_T, z


# ----------------------------------------------------------------------------------- schedules

def test_beta_schedules_match_formulas():
  b0, b1, s = 0.00085, 0.012, 0.008
  idx = np.array([0, 1, 137, 500, 999])
  lin = D.beta_schedule("linear", T)
  np.testing.assert_allclose(lin[idx], b0 + (b1 - b0) * idx / (T - 1), rtol=1e-12)
  sl = D.beta_schedule("scaled_linear", T)
  np.testing.assert_allclose(sl[idx], (b0 ** .5 + (b1 ** .5 - b0 ** .5) * idx / (T - 1)) ** 2,
                             rtol=1e-12)
  f = lambda i: np.cos((i / T + s) / (1 + s) * np.pi / 2) ** 2
  cos = D.beta_schedule("cosine", T)
  np.testing.assert_allclose(cos[idx], np.minimum(1 - f(idx + 1) / f(idx), 0.999), rtol=1e-12)
  assert cos[-1] == 0.999 and cos.dtype == np.float64
  # The stored tables follow from the betas.
  a = np.cumprod(1 - sl)
  np.testing.assert_allclose(SCHED.alphas_cumprod, a, rtol=1e-6)
  np.testing.assert_allclose(SCHED.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - a), rtol=1e-6)
  np.testing.assert_allclose(SCHED.log_snr, np.log(a / (1 - a)), rtol=1e-5, atol=1e-5)
  assert SCHED.alphas_cumprod.dtype == jnp.float32 and SCHED.num_timesteps == T
  assert len(jax.tree.leaves(SCHED)) == len(D.DiffusionSchedule._fields)  # a pytree of arrays


def test_unknown_names_raise_with_config_key():
  with pytest.raises(ValueError, match=r"diffusion\.schedule.*'scaled_linear'.*'cosine'"):
    D.make_schedule("sqrt_linear", T)
  with pytest.raises(ValueError, match=r"diffusion\.parameterization.*'v'"):
    D.target(SCHED, jnp.zeros(SHAPE), jnp.zeros(SHAPE), jnp.zeros(2, jnp.int32), "velocity")
  with pytest.raises(ValueError, match=r"sampling\.timestep_spacing"):
    D.timesteps("uniform", T, 10)
  with pytest.raises(ValueError, match=r"sampling\.sampler.*'dpmpp_2m'"):
    D.sample("heun", JAX_EPS, jnp.zeros(SHAPE), SCHED, num_steps=2)
  with pytest.raises(ValueError, match="strictly decreasing"):  # leading + offset 1 reaches T
    D.timesteps("leading", T, T, steps_offset=1)


def test_zero_terminal_snr():
  betas = D.beta_schedule("scaled_linear", T)
  sched = D.make_schedule("scaled_linear", T, zero_terminal_snr=True)
  a = np.cumprod(1 - D.rescale_zero_terminal_snr(betas))
  assert a[-1] == 0.0 and sched.alphas_cumprod[-1] == 0.0 and np.isneginf(sched.log_snr[-1])
  np.testing.assert_allclose(a[0], 1 - betas[0], rtol=1e-12)
  assert np.all(np.diff(a) < 0)
  # Min-SNR weights stay finite at SNR = 0.
  t = jnp.array([0, T - 1])
  for p in D.PARAMETERIZATIONS:
    assert np.all(np.isfinite(D.min_snr_weights(sched, t, 5.0, p)))


# ---------------------------------------------------------------------------------- objectives

@pytest.mark.parametrize("p", ["eps", "v", "x0"])
def test_parameterization_round_trips(p):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
  x0, noise = jax.random.normal(k1, SHAPE), jax.random.normal(k2, SHAPE)
  t = jnp.array([3, 871])
  x_t = D.q_sample(SCHED, x0, t, noise)
  tgt = D.target(SCHED, x0, noise, t, p)
  x0_hat, eps_hat = D.predict_x0_and_eps(SCHED, x_t, t, tgt, p)  # the perfect model
  np.testing.assert_allclose(x0_hat, x0, atol=1e-5)
  np.testing.assert_allclose(eps_hat, noise, atol=1e-5)
  out = jax.random.normal(k3, SHAPE)  # any output -> (x0, eps) -> back
  x0_hat, eps_hat = D.predict_x0_and_eps(SCHED, x_t, t, out, p)
  np.testing.assert_allclose(D.target(SCHED, x0_hat, eps_hat, t, p), out, atol=1e-5)
  np.testing.assert_allclose(D.q_sample(SCHED, x0_hat, t, eps_hat), x_t, atol=1e-5)


def test_q_sample_marginal_statistics():
  t = jnp.full((20000,), 600)
  x = D.q_sample(SCHED, jnp.full((20000, 4), 1.5), t, jax.random.normal(jax.random.PRNGKey(2),
                                                                       (20000, 4)))
  a = A64[600]
  assert abs(float(jnp.mean(x)) - 1.5 * np.sqrt(a)) < 0.01
  assert abs(float(jnp.std(x)) - np.sqrt(1 - a)) < 0.01


def test_ddpm_posterior_against_ho_eq7():
  betas = 1 - A64 / np.concatenate([[1.0], A64[:-1]])
  x0, x_t = np.random.RandomState(0).randn(2, 4, *SHAPE[1:])
  t = np.array([0, 1, 10, 999])
  mean, var, log_var = D.ddpm_posterior(SCHED, jnp.asarray(x0, jnp.float32),
                                        jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
  a, a_prev, b = A64[t], np.where(t > 0, A64[t - 1], 1.0), betas[t]
  r = lambda v: v.reshape(-1, 1, 1, 1)
  mean_ref = (r(np.sqrt(a_prev) * b / (1 - a)) * x0
              + r(np.sqrt(1 - b) * (1 - a_prev) / (1 - a)) * x_t)
  var_ref = (1 - a_prev) / (1 - a) * b
  np.testing.assert_allclose(mean, mean_ref, atol=1e-5)
  np.testing.assert_allclose(var[:, 0, 0, 0], var_ref, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(log_var[1:, 0, 0, 0], np.log(var_ref[1:]), rtol=1e-5)
  assert var[0, 0, 0, 0] == 0 and log_var[0, 0, 0, 0] == log_var[1, 0, 0, 0]


def test_snr_min_snr_and_loss():
  t = jnp.array([0, 250, 999])
  r = A64[[0, 250, 999]] / (1 - A64[[0, 250, 999]])
  np.testing.assert_allclose(D.snr(SCHED, t), r, rtol=1e-4)
  g = 5.0
  np.testing.assert_allclose(D.min_snr_weights(SCHED, t, g, "eps"), np.minimum(r, g) / r, rtol=1e-4)
  np.testing.assert_allclose(D.min_snr_weights(SCHED, t, g, "v"), np.minimum(r, g) / (r + 1),
                             rtol=1e-4)
  np.testing.assert_allclose(D.min_snr_weights(SCHED, t, g, "x0"), np.minimum(r, g), rtol=1e-4)
  # Each weighted loss is min(SNR, gamma) times the x0-space squared error (Hang et al. eq. 6).
  k = jax.random.split(jax.random.PRNGKey(3), 3)
  x0, noise, out = (jax.random.normal(kk, (3, 8)) for kk in k)
  x_t = D.q_sample(SCHED, x0, t, noise)
  for p in D.PARAMETERIZATIONS:
    w = D.min_snr_weights(SCHED, t, g, p)
    x0_hat, _ = D.predict_x0_and_eps(SCHED, x_t, t, out, p)
    per_ex = jnp.mean((out - D.target(SCHED, x0, noise, t, p)) ** 2, axis=1)
    np.testing.assert_allclose(w * per_ex, np.minimum(r, g) * jnp.mean((x0_hat - x0) ** 2, axis=1),
                               rtol=2e-3)
  o, tg, w = np.random.RandomState(1).randn(3, 4, 5)
  np.testing.assert_allclose(D.diffusion_loss(jnp.asarray(o), jnp.asarray(tg)),
                             np.mean((o - tg) ** 2), rtol=1e-5)
  w = w[:, 0] ** 2
  np.testing.assert_allclose(D.diffusion_loss(jnp.asarray(o), jnp.asarray(tg), jnp.asarray(w)),
                             np.mean(w * np.mean((o - tg) ** 2, axis=1)), rtol=1e-5)


# ------------------------------------------------------------------ samplers: exact Gaussian case

# Data x_0 ~ N(MU, S^2), so E[eps | x_t] = sigma (x_t - alpha MU) / (alpha^2 S^2 + sigma^2) exactly.
MU, S = 0.5, 0.8


def gaussian_eps(x, t):
  a = SCHED.alphas_cumprod[t][:, None]
  return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * S * S + 1 - a)


def gaussian_level(abar, z):
  """The probability-flow ODE keeps z-scores: x = alpha MU + sqrt(alpha^2 S^2 + sigma^2) z."""
  return np.sqrt(abar) * MU + np.sqrt(abar * S * S + 1 - abar) * z


def test_ddim_solves_probability_flow_ode_on_gaussian_data():
  z = np.linspace(-2.5, 2.5, 64).reshape(4, 16)
  errs = {}
  for n in (50, 500):
    ts = D.timesteps("leading", T, n, steps_offset=1)
    x = D.ddim_sample(gaussian_eps, gaussian_level(A64[ts[0]], z), SCHED, num_steps=n)
    errs[n] = np.abs(np.asarray(x) - gaussian_level(A64[0], z)).max()  # SD's final level abar_0
  assert errs[500] < 0.01 and errs[50] / errs[500] > 5  # first-order convergence to the exact map
  # Inversion (DDIM run forwards) lands on the exact x_T, and undoes the sampler.
  invert = jax.jit(functools.partial(D.ddim_invert, gaussian_eps, num_steps=500))
  x_T = gaussian_level(A64[ts[0]], z)
  assert np.abs(np.asarray(invert(gaussian_level(A64[0], z), SCHED)) - x_T).max() < 0.012
  assert np.abs(np.asarray(invert(x, SCHED)) - x_T).max() < 0.025
  # DPM-Solver++(2M) follows the same ODE (its last step lands on E[x_0 | x_t] at sigma = 0).
  ts = D.dpm_solver_timesteps("linspace", T, 50)
  x = D.dpm_solver_pp_2m_sample(gaussian_eps, gaussian_level(A64[ts[0]], z), SCHED, num_steps=50)
  assert np.abs(np.asarray(x) - gaussian_level(1.0, z)).max() < 0.04


# ------------------------------------------------------- samplers: step-by-step numpy references

@functools.cache
def jitted(sampler, num_steps, **static):
  """One compiled sampler per configuration, shared by tests; eta and rng stay runtime values."""
  return jax.jit(functools.partial(D.SAMPLERS[sampler], JAX_EPS, num_steps=num_steps,
                                   return_trajectory=True, **static))


def check_trajectory(result, ref_traj):
  final, traj = result
  assert isinstance(traj, D.Trajectory) and traj.x.shape == traj.pred_x0.shape
  assert traj.x.shape == (len(ref_traj),) + SHAPE
  np.testing.assert_array_equal(traj.x[-1], final)
  np.testing.assert_allclose(traj.x, np.stack(ref_traj), atol=1e-5)


def test_ddpm_matches_python_loop():
  ts = [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]  # leading, 10 of 1000, offset 0
  np.testing.assert_array_equal(D.timesteps("leading", T, 10), ts)
  rng, x, z = x_T_and_noise(10)
  result, ref = jitted("ddpm", 10)(x, SCHED, rng=rng), []
  for i, t in enumerate(ts):  # respaced betas b' = 1 - abar_t / abar_prev; Ho et al. eq. 7
    a, a_prev = A64[t], (A64[ts[i + 1]] if i + 1 < len(ts) else 1.0)
    b = 1 - a / a_prev
    x0 = (x - np.sqrt(1 - a) * NP_EPS(x, t)) / np.sqrt(a)
    mean = np.sqrt(a_prev) * b / (1 - a) * x0 + np.sqrt(1 - b) * (1 - a_prev) / (1 - a) * x
    x = mean + np.sqrt((1 - a_prev) / (1 - a) * b) * z[i]
    ref.append(x)
  check_trajectory(result, ref)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_python_loop(eta):
  ts = [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]  # SD: leading, steps_offset=1
  np.testing.assert_array_equal(D.timesteps("leading", T, 10, steps_offset=1), ts)
  rng, x, z = x_T_and_noise(10, seed=1)
  result, ref = jitted("ddim", 10)(x, SCHED, rng=rng, eta=eta), []
  for i, t in enumerate(ts):  # Song et al. eq. 12, final level abar_0 (set_alpha_to_one=False)
    a, a_prev = A64[t], A64[ts[i + 1] if i + 1 < len(ts) else 0]
    eps = NP_EPS(x, t)
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    s = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - s ** 2) * eps + s * z[i]
    ref.append(x)
  check_trajectory(result, ref)


def dpm_reference(x, ts, final_abar, lower_order_final=True):
  """Lu et al. 2022 (DPM-Solver++ Alg. 2, midpoint form), written step by step in float64."""
  lam = lambda a: 0.5 * np.log(a / (1 - a))
  n, x0_prev, h_prev, traj = len(ts), None, None, []
  for i, t in enumerate(ts):
    a = A64[t]
    a_next = A64[ts[i + 1]] if i + 1 < n else final_abar
    x0 = (x - np.sqrt(1 - a) * NP_EPS(x, t)) / np.sqrt(a)
    if a_next == 1.0:  # sigma' = 0: the step returns the data prediction
      traj.append(x0)
      continue
    h = lam(a_next) - lam(a)
    d = x0
    if i > 0 and not (i == n - 1 and lower_order_final and n < 15):
      d = x0 + 0.5 * (h / h_prev) * (x0 - x0_prev)
    x = np.sqrt((1 - a_next) / (1 - a)) * x - np.sqrt(a_next) * np.expm1(-h) * d
    x0_prev, h_prev = x0, h
    traj.append(x)
  return traj


@pytest.mark.parametrize("n,final", [(10, "zero"), (20, "sigma_min")])
def test_dpm_solver_pp_2m_matches_python_loop(n, final):
  ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(int)  # diffusers 'linspace'
  np.testing.assert_array_equal(D.dpm_solver_timesteps("linspace", T, n), ts)
  _, x, _ = x_T_and_noise(n, seed=2)
  result = jitted("dpmpp_2m", n, final_sigmas_type=final)(x, SCHED)
  check_trajectory(result, dpm_reference(x, ts, 1.0 if final == "zero" else A64[0]))


def test_parameterizations_give_the_same_chain():
  """The same predictor handed to DDIM as eps, v or x0 gives the same samples."""
  _, x, _ = x_T_and_noise(6, seed=3)
  results = {}
  for p in D.PARAMETERIZATIONS:
    def fn(x_t, t, p=p):
      x0, eps = D.predict_x0_and_eps(SCHED, x_t, t, JAX_EPS(x_t, t), "eps")
      return D.target(SCHED, x0, eps, t, p)
    results[p] = D.ddim_sample(fn, x, SCHED, num_steps=6, parameterization=p)
  for p in ("v", "x0"):
    np.testing.assert_allclose(results[p], results["eps"], atol=1e-4)


# ---------------------------------------------------------------------- guidance, tracing

def cond_model(counter):
  def model_fn(x, t, c):
    counter.append(x.shape[0])
    return x * c[:, None, None, None] + 0.01 * t[:, None, None, None]
  return model_fn


def test_cfg_one_batched_call_and_scale_one_is_conditional():
  calls = []
  model = cond_model(calls)
  x, t = jnp.ones(SHAPE), jnp.array([5, 7])
  cond, uncond = jnp.array([2.0, 3.0]), jnp.array([0.5])  # uncond broadcast from batch 1
  out_c, out_u = model(x, t, cond), model(x, t, jnp.array([0.5, 0.5]))
  calls.clear()
  np.testing.assert_allclose(D.cfg_denoise(model, x, t, cond, uncond, 1.0), out_c, atol=1e-6)
  assert calls == [4]  # one call on the doubled batch
  np.testing.assert_allclose(D.cfg_denoise(model, x, t, cond, uncond, 0.0), out_u, atol=1e-6)
  np.testing.assert_allclose(D.guided(model)(x, t, cond, uncond, jnp.array([7.5, 2.0])),
                             out_u + jnp.array([7.5, 2.0])[:, None, None, None] * (out_c - out_u),
                             rtol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_runtime_values_do_not_retrace(sampler):
  traces = []
  run = jax.jit(functools.partial(D.sample, sampler, D.guided(cond_model(traces)), num_steps=4))
  x, cond, uncond = jnp.ones(SHAPE), jnp.array([2.0, 3.0]), jnp.zeros((1,))
  extra = {"eta": 0.0} if sampler == "ddim" else {}
  first = run(x, SCHED, rng=jax.random.PRNGKey(0), model_args=(cond, uncond, 1.0), **extra)
  extra = {"eta": 0.5} if sampler == "ddim" else {}
  second = run(x, SCHED, rng=jax.random.PRNGKey(1), model_args=(cond, uncond, 7.5), **extra)
  assert len(traces) == 1 and not np.allclose(first, second)


# Parity with diffusers' schedulers: tests/test_parity_schedulers.py
