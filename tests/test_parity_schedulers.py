"""Our samplers against diffusers' DDPM / DDIM / DPM-Solver++(2M) / Euler / Euler-ancestral
schedulers.

Both sides see the same model: a fixed nonlinear function of (x, t) evaluated in float32 from
the same float32 abar table, and the same per-step noise (ours: `split(rng, N)[i]`, passed to
diffusers as `variance_noise` or through its noise hook). Whole trajectories must agree to 1e-5.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion as D

torch = pytest.importorskip("torch", exc_type=ImportError)
diffusers = pytest.importorskip("diffusers", exc_type=ImportError)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


T = 1000
SHAPE = (2, 4, 4, 3)
SCHED = D.make_schedule("scaled_linear", T)
SD = dict(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085,
          beta_end=0.012)  # Stable Diffusion's scheduler_config.json
TOL = 1e-5


def toy_model(xp, abar_table):
  """model(x, t) = sigma_t x + 0.1 alpha_t sin(3x) + 0.05 cos(t / 100): O(1) outputs in x and t,
  read as eps or v."""
  def fn(x, t):
    shape = (-1,) + (1,) * (x.ndim - 1)
    a = xp.reshape(abar_table[t], shape)
    tt = xp.reshape(t, shape) * 0.01  # float32 on both sides
    return xp.sqrt(1.0 - a) * x + 0.1 * xp.sqrt(a) * xp.sin(3.0 * x) + 0.05 * xp.cos(tt)
  return fn


JAX_MODEL = toy_model(jnp, SCHED.alphas_cumprod)


def x_T_and_noise(num_steps, seed):
  rng = jax.random.PRNGKey(seed)
  x_T = np.array(jax.random.normal(jax.random.PRNGKey(seed + 100), SHAPE))
  z = [np.array(jax.random.normal(k, SHAPE, jnp.float32)) for k in jax.random.split(rng, num_steps)]
  return rng, x_T, z


def reference(scheduler, num_steps, seed, step_kw=None, noise_kw=True):
  """diffusers' trajectory [N, *SHAPE] and timesteps, fed our x_T and noise."""
  scheduler.set_timesteps(num_steps)
  fn = toy_model(torch, scheduler.alphas_cumprod.float())
  _, x_T, z = x_T_and_noise(num_steps, seed)
  x, traj = torch.from_numpy(x_T), []
  for i, t in enumerate(scheduler.timesteps):
    extra = {"variance_noise": torch.from_numpy(z[i])} if noise_kw else {}
    x = scheduler.step(fn(x, torch.tensor([int(t)])), t, x, **(step_kw or {}),
                       **extra).prev_sample
    traj.append(x.numpy())
  return np.stack(traj), scheduler.timesteps.numpy()


def max_err(traj, ref):
  return float(np.abs(np.asarray(traj.x) - ref).max())


def test_zero_terminal_snr_rescale_matches():
  betas = D.beta_schedule("scaled_linear", T)
  ref = diffusers.schedulers.scheduling_ddim.rescale_zero_terminal_snr(torch.from_numpy(betas))
  np.testing.assert_allclose(D.rescale_zero_terminal_snr(betas), ref.numpy(), atol=1e-10)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddpm(pred, monkeypatch):
  param = "eps" if pred == "epsilon" else "v"
  errs = {}
  cases = (((50, "leading", 1), (20, "trailing", 0), (20, "linspace", 0)) if param == "eps" else
           ((30, "linspace", 0),))
  for n, spacing, offset in cases:
    sched = diffusers.DDPMScheduler(**SD, prediction_type=pred, clip_sample=False,
                                    timestep_spacing=spacing, steps_offset=offset)
    _, _, z = x_T_and_noise(n, seed=3)
    noise = iter(z)  # DDPMScheduler.step draws its noise with randn_tensor: hand it ours
    monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, "randn_tensor",
                        lambda *a, **k: torch.from_numpy(next(noise)))
    ref, ts = reference(sched, n, seed=3, noise_kw=False)
    rng, x_T, _ = x_T_and_noise(n, seed=3)
    np.testing.assert_array_equal(D.timesteps(spacing, T, n, offset), ts)
    _, traj = D.ddpm_sample(JAX_MODEL, x_T, SCHED, num_steps=n, rng=rng, parameterization=param,
                            spacing=spacing, steps_offset=offset, return_trajectory=True)
    errs[f"{spacing} {n}"] = max_err(traj, ref)
  print(f"ddpm {pred} max |ours - diffusers|:", errs)
  assert max(errs.values()) <= TOL, errs


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddim(pred):
  param = "eps" if pred == "epsilon" else "v"
  errs = {}
  cases = (  # (steps, spacing, steps_offset, set_alpha_to_one, eta)
      ((20, "leading", 1, False, 0.0),   # SD 1.x
       (8, "trailing", 0, False, 1.0),
       (20, "linspace", 0, False, 0.0),  # the step goes to t - T // N, not the next listed t
       (30, "trailing", 0, True, 0.0)) if param == "eps" else
      ((10, "leading", 1, False, 0.5),
       (25, "trailing", 0, True, 0.0)))
  for n, spacing, offset, one, eta in cases:
    sched = diffusers.DDIMScheduler(**SD, prediction_type=pred, clip_sample=False,
                                    set_alpha_to_one=one, steps_offset=offset,
                                    timestep_spacing=spacing)
    ref, ts = reference(sched, n, seed=4, step_kw={"eta": eta})
    rng, x_T, _ = x_T_and_noise(n, seed=4)
    np.testing.assert_array_equal(D.timesteps(spacing, T, n, offset), ts)
    _, traj = D.ddim_sample(JAX_MODEL, x_T, SCHED, num_steps=n, rng=rng, eta=eta,
                            parameterization=param, spacing=spacing, steps_offset=offset,
                            set_alpha_to_one=one, return_trajectory=True)
    errs[f"{spacing}+{offset} {n} eta={eta} one={one}"] = max_err(traj, ref)
  print(f"ddim {pred} max |ours - diffusers|:", errs)
  assert max(errs.values()) <= TOL, errs


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_dpm_solver_pp_2m(pred):
  param = "eps" if pred == "epsilon" else "v"
  errs = {}
  cases = (  # (steps, spacing, steps_offset, final_sigmas_type)
      ((20, "linspace", 0, "zero"),
       (25, "trailing", 0, "sigma_min")) if param == "eps" else  # 2nd order on the last step
      ((10, "leading", 1, "zero"),
       (6, "linspace", 0, "sigma_min")))
  for n, spacing, offset, final in cases:
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD, prediction_type=pred, timestep_spacing=spacing, steps_offset=offset,
        final_sigmas_type=final)
    ref, ts = reference(sched, n, seed=5, noise_kw=False)
    _, x_T, _ = x_T_and_noise(n, seed=5)
    np.testing.assert_array_equal(D.dpm_solver_timesteps(spacing, T, n, offset), ts)
    _, traj = D.dpm_solver_pp_2m_sample(JAX_MODEL, x_T, SCHED, num_steps=n,
                                        parameterization=param, spacing=spacing,
                                        steps_offset=offset, final_sigmas_type=final,
                                        return_trajectory=True)
    errs[f"{spacing}+{offset} {n} {final}"] = max_err(traj, ref)
  print(f"dpm++(2m) {pred} max |ours - diffusers|:", errs)
  assert max(errs.values()) <= TOL, errs


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_dpm_solver_pp_2m_karras(pred):
  """"DPM++ 2M Karras": Karras sigmas, each final sigma type, with and without the
  first-order last step (lower_order_final, N < 15)."""
  param = "eps" if pred == "epsilon" else "v"
  errs = {}
  cases = (  # (steps, final_sigmas_type, lower_order_final)
      ((20, "zero", True), (8, "sigma_min", True), (25, "sigma_min", True))
      if param == "eps" else ((10, "zero", True), (6, "sigma_min", False)))
  for n, final, lof in cases:
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD, prediction_type=pred, use_karras_sigmas=True, final_sigmas_type=final,
        lower_order_final=lof)
    ref, ts = reference(sched, n, seed=6, noise_kw=False)
    _, x_T, _ = x_T_and_noise(n, seed=6)
    ours_ts, ours_sig = D.samplers.dpm_solver_karras_levels(SCHED, n)
    np.testing.assert_array_equal(np.asarray(ours_ts), ts)
    np.testing.assert_allclose(np.asarray(ours_sig), sched.sigmas.numpy()[:-1], rtol=1e-6)
    _, traj = D.dpm_solver_pp_2m_sample(JAX_MODEL, x_T, SCHED, num_steps=n,
                                        parameterization=param, final_sigmas_type=final,
                                        lower_order_final=lof, use_karras_sigmas=True,
                                        return_trajectory=True)
    errs[f"karras {n} {final} lower_order_final={lof}"] = max_err(traj, ref)
  print(f"dpm++(2m) karras {pred} max |ours - diffusers|:", errs)
  assert max(errs.values()) <= TOL, errs


def float_t_model(xp):
  """model(x, t) = 0.8 x + 0.1 sin(3x) + 0.05 cos(t / 100), t fractional (the Euler schedulers
  hand the model float timesteps)."""
  def fn(x, t):
    tt = xp.reshape(t, (-1,) + (1,) * (x.ndim - 1)) * 0.01
    return 0.8 * x + 0.1 * xp.sin(3.0 * x) + 0.05 * xp.cos(tt)
  return fn


def euler_reference(scheduler, num_steps, seed):
  """diffusers' Euler loop as its pipelines run it (latents * init_noise_sigma, then
  scale_model_input before each call), the trajectory in the chain's variance-preserving form."""
  scheduler.set_timesteps(num_steps)
  fn = float_t_model(torch)
  _, x_T, _ = x_T_and_noise(num_steps, seed)
  x, traj = torch.from_numpy(x_T) * scheduler.init_noise_sigma, []
  for i, t in enumerate(scheduler.timesteps):
    inp = scheduler.scale_model_input(x, t)
    x = scheduler.step(fn(inp, t.reshape(1).float()), t, x).prev_sample
    traj.append(x.numpy() / np.sqrt(1.0 + float(scheduler.sigmas[i + 1]) ** 2))
  return np.stack(traj), scheduler


@pytest.mark.parametrize("ancestral", [False, True])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_euler(pred, ancestral, monkeypatch):
  """Euler / Euler-ancestral: every spacing, v-prediction, Karras sigmas and both final sigma
  types (Euler only, as in diffusers), zero terminal SNR; the noise of the ancestral steps is
  ours, handed to diffusers' randn_tensor."""
  param = "eps" if pred == "epsilon" else "v"
  cases = (  # (steps, spacing, steps_offset, use_karras_sigmas, final_sigmas_type, zero snr)
      [(20, "linspace", 0, False, "zero", False), (25, "leading", 1, False, "zero", False),
       (10, "trailing", 0, False, "zero", False)])
  if not ancestral:
    cases += [(15, "linspace", 0, True, "zero", False), (12, "leading", 1, True, "sigma_min", False),
              (8, "trailing", 0, False, "sigma_min", False)]
  if param == "v":
    cases += [(10, "trailing", 0, False, "zero", True)]
  errs = {}
  for n, spacing, offset, karras, final, zsnr in cases:
    kw = dict(**SD, prediction_type=pred, timestep_spacing=spacing, steps_offset=offset,
              rescale_betas_zero_snr=zsnr)
    if ancestral:
      sched = diffusers.EulerAncestralDiscreteScheduler(**kw)
      _, _, z = x_T_and_noise(n, seed=7)
      noise = iter(z)
      monkeypatch.setattr(diffusers.schedulers.scheduling_euler_ancestral_discrete,
                          "randn_tensor", lambda *a, **k: torch.from_numpy(next(noise)))
    else:
      sched = diffusers.EulerDiscreteScheduler(**kw, use_karras_sigmas=karras,
                                               final_sigmas_type=final)
    ref, sched = euler_reference(sched, n, seed=7)
    ours_sched = D.make_schedule("scaled_linear", T, zero_terminal_snr=zsnr)
    ts, sig = D.euler.euler_levels(ours_sched, n, spacing, offset, karras)
    # (diffusers finds the Karras timesteps in float64, we in float32)
    np.testing.assert_allclose(np.asarray(ts), sched.timesteps.numpy(), rtol=2e-5)
    np.testing.assert_allclose(np.asarray(sig), sched.sigmas.numpy()[:-1], rtol=1e-5)
    rng, x_T, _ = x_T_and_noise(n, seed=7)
    opts = dict(spacing=spacing, steps_offset=offset)
    if not ancestral:
      opts.update(use_karras_sigmas=karras, final_sigmas_type=final)
    name = "euler_a" if ancestral else "euler"
    scale = D.samplers.initial_noise_scale(name, ours_sched, n, **opts)
    _, traj = D.sample(name, float_t_model(jnp), x_T * scale, ours_sched, num_steps=n, rng=rng,
                       parameterization=param, return_trajectory=True, **opts)
    errs[f"{spacing}+{offset} {n} karras={karras} {final} zsnr={zsnr}"] = max_err(traj, ref)
  print(f"{'euler_a' if ancestral else 'euler'} {pred} max |ours - diffusers|:", errs)
  # At zero terminal SNR sigma_1 = 4096 (abar = 2^-24) and the first step's x_ve + (sigma_2 -
  # sigma_1) d cancels to ~sigma_2 / sigma_1 of x_ve: one float32 ulp of x_ve at the start
  # (ours x_T sqrt(1 + sigma_1^2), diffusers' noise sigma_max) becomes ~4e-5 there, on both
  # sides; everywhere else the float32 floor is 1e-6.
  assert all(e <= (1e-4 if "zsnr=True" in k else TOL) for k, e in errs.items()), errs


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_pndm_plms(pred):
  """PLMS as PNDMScheduler(skip_prk_steps=True) runs it (SD 1.x's scheduler): N + 1 model
  calls, the second redoing the first step."""
  param = "eps" if pred == "epsilon" else "v"
  errs = {}
  for n, offset, one in ((50, 1, False), (7, 0, True), (1, 1, False), (2, 1, False)):
    sched = diffusers.PNDMScheduler(**SD, prediction_type=pred, skip_prk_steps=True,
                                    steps_offset=offset, set_alpha_to_one=one)
    ref, ts = reference(sched, n, seed=8, noise_kw=False)
    calls, _, _ = D.pndm.plms_calls(T, n, offset)
    np.testing.assert_array_equal(calls, ts)
    _, x_T, _ = x_T_and_noise(n, seed=8)
    _, traj = D.sample("pndm", JAX_MODEL, x_T, SCHED, num_steps=n, parameterization=param,
                       steps_offset=offset, set_alpha_to_one=one, return_trajectory=True)
    errs[f"{n} offset={offset} one={one}"] = max_err(traj, ref)
  print(f"pndm {pred} max |ours - diffusers|:", errs)
  assert max(errs.values()) <= TOL, errs
