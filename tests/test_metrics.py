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


def test_kid_hand_computed_on_two_points():
  from ldm_jax.evaluation.metrics import kernel_inception_distance
  # k(a, b) = (a.b / 2 + 1)^3. x1.x2 = y1.y2 = 0: off-diagonal K_xx = K_yy = 1, so the
  # within-set term is (2 + 2) / (2 * 1) = 2. Cross: x1.y1 = x2.y1 = 1 -> 1.5^3 = 3.375,
  # x.y2 = 0 -> 1: sum 8.75, term 2 * 8.75 / 4 = 4.375. KID = 2 - 4.375 = -2.375; every subset
  # of size 2 is the whole set, so the std is 0.
  x = np.array([[1.0, 0.0], [0.0, 1.0]])
  y = np.array([[1.0, 1.0], [0.0, 0.0]])
  mean, std = kernel_inception_distance(x, y, num_subsets=3, subset_size=10)
  assert mean == pytest.approx(-2.375, abs=1e-12) and std == 0.0


def test_kid_matches_the_double_sum_definition_and_is_seeded():
  from ldm_jax.evaluation.metrics import kernel_inception_distance
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(5, 3)), rng.normal(0.5, 1.0, size=(5, 3))
  k = lambda a, b: (np.dot(a, b) / 3 + 1) ** 3  # noqa: E731
  m = 5
  within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  want = within / (m * (m - 1)) - 2 * cross / m**2
  assert kernel_inception_distance(x, y, num_subsets=2)[0] == pytest.approx(want, rel=1e-12)
  # Subsets: same seed, same value; a far-away set scores higher than a same-distribution one.
  a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
  one = kernel_inception_distance(a, b, num_subsets=10, subset_size=50, seed=3)
  assert one == kernel_inception_distance(a, b, num_subsets=10, subset_size=50, seed=3)
  assert one != kernel_inception_distance(a, b, num_subsets=10, subset_size=50, seed=4)
  far = kernel_inception_distance(a, b + 1.0, num_subsets=10, subset_size=50, seed=3)
  assert abs(one[0]) < 0.05 < far[0]
  with pytest.raises(UserError, match="feature sets"):
    kernel_inception_distance(a, b[:, :4])


def test_frechet_distance_trace_equals_scipy_sqrtm():
  import scipy.linalg
  from ldm_jax.evaluation.metrics import frechet_distance
  rng = np.random.default_rng(5)
  x = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
  y = rng.normal(0.3, 1.0, size=(300, 12)) @ rng.normal(size=(12, 12))
  s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  want = (np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s_x) + np.trace(s_y)
          - 2 * np.trace(np.real(scipy.linalg.sqrtm(s_x @ s_y))))
  assert frechet_distance(x, y) == pytest.approx(want, rel=1e-9)  # the eigh route (D^3)
  # Few samples: the nuclear-norm route, on singular covariances where sqrtm needs the offset.
  a, b = x[:5], y[:7]
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  offset = np.eye(12) * 1e-10
  ref = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(
      np.real(scipy.linalg.sqrtm((s_a + offset) @ (s_b + offset)))))
  assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
  big = np.concatenate([x, x, x])  # n^2 m > 4 D^3 here: both routes on the same sets
  from ldm_jax.evaluation.metrics import _trace_sqrt_product
  xc, yc = big - big.mean(0), y - y.mean(0)
  s1, s2 = np.cov(big, rowvar=False), np.cov(y, rowvar=False)
  svd = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt((len(xc) - 1) * (len(yc) - 1))
  assert _trace_sqrt_product(xc, yc, s1, s2) == pytest.approx(svd, rel=1e-9)
