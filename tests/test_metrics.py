"""PSNR / SSIM against tf.image.psnr / tf.image.ssim, plus closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.errors import UserError
from ldm_jax.evaluation import metrics

tf = pytest.importorskip("tensorflow", reason="tf.image is the reference for PSNR/SSIM")

RTOL = 1e-5


def _pairs():
  """(name, x, y, max_val) test cases, NHWC float32, as pytest params."""
  rng = np.random.default_rng(0)
  a = rng.uniform(0, 1, (3, 32, 40, 3)).astype(np.float32)
  b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1).astype(np.float32)
  # A smooth image and its blurred, noisy copy: SSIM well away from 0 and 1.
  yy, xx = np.mgrid[0:48, 0:48] / 48.0
  smooth = np.stack([np.sin(3 * xx + k) * np.cos(2 * yy - k) for k in range(3)], -1)
  smooth = (0.5 + 0.4 * smooth)[None].repeat(2, 0).astype(np.float32)
  smooth[1] = smooth[1, ::-1]
  blurred = np.asarray(tf.nn.avg_pool2d(smooth, 3, 1, "SAME"))
  noisy = np.clip(blurred + rng.normal(0, 0.05, blurred.shape), 0, 1).astype(np.float32)
  gray = rng.uniform(0, 255, (2, 16, 16, 1)).astype(np.float32)
  gray_noisy = np.clip(gray + rng.normal(0, 20, gray.shape), 0, 255).astype(np.float32)
  cases = [("random", a, b, 1.0), ("blur_noise", smooth, noisy, 1.0),
           ("gray_255", gray, gray_noisy, 255.0)]
  return [pytest.param(*c, id=c[0]) for c in cases]


@pytest.mark.parametrize("name,x,y,max_val", _pairs())
def test_psnr_matches_tf(name, x, y, max_val):
  ours = np.asarray(jax.jit(metrics.psnr, static_argnums=2)(x, y, max_val))
  ref = tf.image.psnr(x, y, max_val=max_val).numpy()
  assert ours.shape == (x.shape[0],)
  np.testing.assert_allclose(ours, ref, rtol=RTOL, err_msg=name)


@pytest.mark.parametrize("name,x,y,max_val", _pairs())
def test_ssim_matches_tf(name, x, y, max_val):
  # Measured: ours is within 5e-7 of a float64 evaluation; tf.image.ssim's own float32 error
  # reaches 7e-6 on the smooth blur_noise pair (E[x^2] - mu^2 cancels there).
  ours = np.asarray(jax.jit(metrics.ssim, static_argnums=2)(x, y, max_val))
  ref = tf.image.ssim(x, y, max_val=max_val).numpy()
  assert ours.shape == (x.shape[0],)
  np.testing.assert_allclose(ours, ref, rtol=RTOL, err_msg=name)


def test_ssim_of_independent_noise_matches_tf_in_absolute_terms():
  # SSIM of unrelated images is ~0 and a difference of float32 terms of size ~0.3, so only
  # an absolute tolerance is meaningful there (the summation order differs from tf's).
  rng = np.random.default_rng(3)
  x, y = (rng.uniform(0, 1, (3, 32, 40, 3)).astype(np.float32) for _ in range(2))
  ours = np.asarray(jax.jit(metrics.ssim)(x, y))
  np.testing.assert_allclose(ours, tf.image.ssim(x, y, max_val=1.0).numpy(), rtol=0, atol=1e-6)


def test_ssim_of_identical_images_is_one():
  x = np.random.default_rng(1).uniform(0, 1, (2, 24, 24, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(metrics.ssim(x, x)), 1.0, rtol=0, atol=1e-6)


def test_psnr_of_constant_offset_is_closed_form():
  x = np.random.default_rng(2).uniform(0.2, 0.8, (2, 8, 8, 3)).astype(np.float32)
  for d in (0.1, 0.01):
    want = 10 * np.log10(1.0 / d**2)  # MSE = d^2
    np.testing.assert_allclose(np.asarray(metrics.psnr(x, x + d)), want, rtol=1e-5)


def test_to_unit_maps_and_clips():
  x = jnp.asarray([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0])
  np.testing.assert_allclose(np.asarray(metrics.to_unit(x)), [0, 0, 0.5, 0.75, 1, 1])


def test_bad_shapes_are_user_errors():
  with pytest.raises(UserError, match=r"\(1, 8, 8, 3\)"):
    metrics.ssim(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(UserError, match="shape"):
    metrics.psnr(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 1)))


def test_frechet_distance_closed_forms():
  from ldm_jax.evaluation.metrics import frechet_distance
  x = np.random.default_rng(0).normal(size=(500, 6)) @ np.diag([1, 2, 3, 1, 1, 0.5])
  shift = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
  # Same covariance: only the means differ.
  assert frechet_distance(x, x + shift) == pytest.approx(np.sum(shift ** 2), rel=1e-6)
  # y = 2 (x - mean): tr(S + 4S - 2 * 2S) = tr(S), plus the squared mean.
  y = 2 * (x - x.mean(0))
  want = np.trace(np.cov(x, rowvar=False)) + np.sum(x.mean(0) ** 2)
  assert frechet_distance(x, y) == pytest.approx(want, rel=1e-6)
  assert abs(frechet_distance(x, x)) < 1e-6
