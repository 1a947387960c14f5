"""x_0 thresholding (none / static / Imagen's dynamic) against closed forms and against
diffusers' `thresholding=True, dynamic_thresholding_ratio, sample_max_value` and `clip_sample`
in DDPM, DDIM (with and without use_clipped_model_output), DPM-Solver++(2M) (incl. Karras
sigmas) and a partial (image-to-image) schedule, on the toy model of test_parity_schedulers
scaled so that its x_0 predictions leave [-1, 1]."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion as D
from ldm_jax.diffusion.thresholding import Thresholding, dynamic_threshold, from_diffusers

torch = pytest.importorskip("torch", exc_type=ImportError)
diffusers = pytest.importorskip("diffusers", exc_type=ImportError)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

T = 1000
SHAPE = (3, 6, 6, 2)
LINEAR = dict(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
SCHED = D.make_schedule("linear", T, 1e-4, 0.02)
TOL = 1e-5
RULES = {  # name -> (diffusers scheduler kwargs, our rule)
    "dynamic": (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5),
                Thresholding("dynamic", 0.9, 2.5)),
    "dynamic_unbounded": (dict(thresholding=True, dynamic_thresholding_ratio=0.995,
                               sample_max_value=1e6), Thresholding("dynamic", 0.995, 0.0)),
    "static": (dict(clip_sample=True, clip_sample_range=1.0), Thresholding("static")),
}


def toy_model(xp, abar_table):
  """A model whose eps is slightly off: x_0 predictions of several units at high noise."""
  def fn(x, t):
    shape = (-1,) + (1,) * (x.ndim - 1)
    a = xp.reshape(abar_table[t], shape)
    tt = xp.reshape(t, shape) * 0.01
    return xp.sqrt(1.0 - a) * x + 0.3 * xp.sqrt(a) * xp.sin(3.0 * x) + 0.02 * xp.cos(tt)
  return fn


JAX_MODEL = toy_model(jnp, SCHED.alphas_cumprod)


def inputs(num_steps, seed):
  rng = jax.random.PRNGKey(seed)
  x_T = np.array(2.0 * jax.random.normal(jax.random.PRNGKey(seed + 100), SHAPE))
  z = [np.array(jax.random.normal(k, SHAPE, jnp.float32)) for k in jax.random.split(rng, num_steps)]
  return rng, x_T, z


def reference(scheduler, num_steps, seed, start=0, step_kw=None, noise_kw=True):
  scheduler.set_timesteps(num_steps)
  fn = toy_model(torch, scheduler.alphas_cumprod.float())
  _, x_T, z = inputs(num_steps, seed)
  x, traj = torch.from_numpy(x_T), []
  for i, t in enumerate(scheduler.timesteps):
    if i < start:
      continue
    extra = {"variance_noise": torch.from_numpy(z[i])} if noise_kw else {}
    x = scheduler.step(fn(x, torch.tensor([int(t)])), t, x, **(step_kw or {}),
                       **extra).prev_sample
    traj.append(x.numpy())
  return np.stack(traj)


def err(traj, ref):
  return float(np.abs(np.asarray(traj.x) - ref).max())


def test_dynamic_threshold_closed_form():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(4, 5, 5, 3)) * np.array([0.3, 1.5, 3.0, 8.0])[:, None, None, None])
  x = x.astype(np.float32)
  out = np.asarray(dynamic_threshold(jnp.asarray(x), 0.9, 0.0))
  for i in range(4):
    s = max(np.quantile(np.abs(x[i]), 0.9), 1.0)
    np.testing.assert_allclose(out[i], np.clip(x[i], -s, s) / s, rtol=1e-6, atol=1e-6)
  # Sample 0 lies inside [-1, 1] mostly: s = 1 is plain clipping.
  np.testing.assert_allclose(out[0], np.clip(x[0], -1, 1), atol=1e-7)
  assert np.abs(out).max() <= 1.0 + 1e-6
  # The upper bound of s, and static clipping.
  capped = np.asarray(dynamic_threshold(jnp.asarray(x), 0.9, 2.0))
  s3 = min(max(np.quantile(np.abs(x[3]), 0.9), 1.0), 2.0)
  np.testing.assert_allclose(capped[3], np.clip(x[3], -s3, s3) / s3, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(Thresholding("static", max_value=1.5)(jnp.asarray(x))),
                                np.clip(x, -1.5, 1.5))
  np.testing.assert_array_equal(np.asarray(Thresholding()(jnp.asarray(x))), x)


def test_dynamic_threshold_matches_diffusers():
  sched = diffusers.DDPMScheduler(**LINEAR, thresholding=True, dynamic_thresholding_ratio=0.95,
                                  sample_max_value=3.0)
  x = np.random.default_rng(1).normal(size=(3, 2, 7, 7)).astype(np.float32) * 2.5
  ref = sched._threshold_sample(torch.from_numpy(x)).numpy()  # NCHW, flattened per sample
  ours = np.asarray(dynamic_threshold(jnp.asarray(x.transpose(0, 2, 3, 1)), 0.95, 3.0))
  np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), ref, atol=1e-6)


def test_rules_from_diffusers_and_refusals():
  assert from_diffusers({"thresholding": True, "dynamic_thresholding_ratio": 0.9,
                         "sample_max_value": 1.5, "clip_sample": True}) == \
      Thresholding("dynamic", 0.9, 1.5)
  assert from_diffusers({"clip_sample": True, "clip_sample_range": 2.0}) == \
      Thresholding("static", max_value=2.0)
  assert from_diffusers({"clip_sample": False}) is None
  for bad in (dict(kind="soft"), dict(kind="dynamic", ratio=0.0),
              dict(kind="dynamic", max_value=0.5), dict(kind="static", max_value=0.0)):
    with pytest.raises(ValueError, match="thresholding|dynamic_ratio|sample_max_value"):
      Thresholding(**bad)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_ddpm(rule, monkeypatch):
  kw, ours = RULES[rule]
  n = 25
  sched = diffusers.DDPMScheduler(**LINEAR, **{"clip_sample": False, **kw})
  _, _, z = inputs(n, seed=3)
  noise = iter(z)
  monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, "randn_tensor",
                      lambda *a, **k: torch.from_numpy(next(noise)))
  ref = reference(sched, n, seed=3, noise_kw=False)
  rng, x_T, _ = inputs(n, seed=3)
  _, traj = D.ddpm_sample(JAX_MODEL, x_T, SCHED, num_steps=n, rng=rng, thresholding=ours,
                          return_trajectory=True)
  _, plain = D.ddpm_sample(JAX_MODEL, x_T, SCHED, num_steps=n, rng=rng, return_trajectory=True)
  e = err(traj, ref)
  print(f"ddpm {rule}: max |ours - diffusers| = {e:.2e}")
  assert e <= TOL
  assert err(plain, ref) > 1e-2  # the rule changes the trajectory: the test can fail


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("clipped_eps", [False, True])
def test_ddim(rule, clipped_eps):
  kw, ours = RULES[rule]
  n, eta = 20, (0.0 if clipped_eps else 0.7)
  sched = diffusers.DDIMScheduler(**LINEAR, **{"clip_sample": False, **kw}, steps_offset=1,
                                  set_alpha_to_one=False)
  ref = reference(sched, n, seed=4, step_kw={"eta": eta,
                                             "use_clipped_model_output": clipped_eps})
  rng, x_T, _ = inputs(n, seed=4)
  _, traj = D.ddim_sample(JAX_MODEL, x_T, SCHED, num_steps=n, rng=rng, eta=eta,
                          thresholding=ours, recompute_eps=clipped_eps, return_trajectory=True)
  e = err(traj, ref)
  print(f"ddim {rule} use_clipped_model_output={clipped_eps}: {e:.2e}")
  assert e <= TOL


@pytest.mark.parametrize("rule", ["dynamic", "dynamic_unbounded"])
@pytest.mark.parametrize("karras", [False, True])
def test_dpm_solver_pp_2m(rule, karras):
  kw, ours = RULES[rule]
  n = 12
  sched = diffusers.DPMSolverMultistepScheduler(**LINEAR, **kw, use_karras_sigmas=karras)
  ref = reference(sched, n, seed=5, noise_kw=False)
  _, x_T, _ = inputs(n, seed=5)
  _, traj = D.dpm_solver_pp_2m_sample(JAX_MODEL, x_T, SCHED, num_steps=n, thresholding=ours,
                                      use_karras_sigmas=karras, return_trajectory=True)
  e = err(traj, ref)
  print(f"dpm++(2m) {rule} karras={karras}: {e:.2e}")
  assert e <= TOL


def test_image_to_image_schedule_thresholded():
  """A partial schedule (img2img / inpainting run steps start..N-1 of it): thresholded on
  every step that runs, as diffusers' img2img loop over timesteps[start:]."""
  kw, ours = RULES["dynamic"]
  n, start = 20, 6
  sched = diffusers.DDIMScheduler(**LINEAR, **kw, steps_offset=1, set_alpha_to_one=False)
  ref = reference(sched, n, seed=7, start=start, step_kw={"eta": 0.0})
  rng, x_T, _ = inputs(n, seed=7)
  _, traj = D.ddim_sample(JAX_MODEL, x_T, SCHED, num_steps=n, rng=rng, thresholding=ours,
                          start_step=start, return_trajectory=True)
  assert err(traj, ref) <= TOL
