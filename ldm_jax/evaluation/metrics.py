"""Image-quality metrics as pure, jit-able jnp functions on NHWC batches.

`psnr` and `ssim` follow `tf.image.psnr` / `tf.image.ssim` (Wang et al. 2004: 11x11 Gaussian
window with sigma 1.5, k1 = 0.01, k2 = 0.03, VALID filtering, mean over space and channels)
and return one value per example, shape [B], in float32. Images are expected in
[0, max_val]; use `to_unit` first for model outputs in [-1, 1].
"""
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import UserError

SSIM_FILTER_SIZE = 11
SSIM_FILTER_SIGMA = 1.5


def to_unit(x: jax.Array) -> jax.Array:
  """Maps [-1, 1] to [0, 1], clipped."""
  return jnp.clip((x.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


def _check_pair(x, y, name: str):
  if x.shape != y.shape or x.ndim != 4:
    raise UserError(f"{name} wants two NHWC batches of one shape, got {x.shape} and {y.shape}")


def psnr(x: jax.Array, y: jax.Array, max_val: float = 1.0) -> jax.Array:
  """Peak signal-to-noise ratio in dB per example: 10 log10(max_val^2 / MSE), shape [B].

  Identical images give +inf (as `tf.image.psnr` does).
  """
  _check_pair(x, y, "psnr")
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
  return 20.0 * jnp.log10(jnp.float32(max_val)) - 10.0 * jnp.log10(mse)


def gaussian_window(size: int = SSIM_FILTER_SIZE, sigma: float = SSIM_FILTER_SIGMA) -> np.ndarray:
  """The normalised [size, size] Gaussian window of `tf.image.ssim` (float32)."""
  coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-0.5 * np.square(coords) / sigma**2)
  g2 = np.outer(g, g)
  return (g2 / g2.sum()).astype(np.float32)


def _filter(x: jax.Array, window: jax.Array) -> jax.Array:
  """Depthwise VALID 2-D filtering of NHWC `x` with one [k, k] window."""
  c = x.shape[-1]
  kernel = jnp.tile(window[:, :, None, None], (1, 1, 1, c))  # HWIO, one filter per channel
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
      precision=jax.lax.Precision.HIGHEST)


def ssim(x: jax.Array, y: jax.Array, max_val: float = 1.0, k1: float = 0.01,
         k2: float = 0.03) -> jax.Array:
  """Structural similarity per example, shape [B] (1 for identical images).

  SSIM map = luminance * contrast-structure over 11x11 Gaussian (sigma 1.5) windows with
  VALID filtering; averaged over space, then channels. H and W must be at least 11.
  """
  _check_pair(x, y, "ssim")
  if min(x.shape[1:3]) < SSIM_FILTER_SIZE:
    raise UserError(f"ssim needs images of at least {SSIM_FILTER_SIZE}x{SSIM_FILTER_SIZE}, "
                    f"got shape {x.shape}")
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  window = jnp.asarray(gaussian_window())
  c1 = (k1 * max_val) ** 2
  c2 = (k2 * max_val) ** 2
  mu_x, mu_y = _filter(x, window), _filter(y, window)
  num0 = 2.0 * mu_x * mu_y
  den0 = jnp.square(mu_x) + jnp.square(mu_y)
  luminance = (num0 + c1) / (den0 + c1)
  num1 = 2.0 * _filter(x * y, window)
  den1 = _filter(jnp.square(x) + jnp.square(y), window)
  cs = (num1 - num0 + c2) / (den1 - den0 + c2)
  per_channel = jnp.mean(luminance * cs, axis=(1, 2))
  return jnp.mean(per_channel, axis=-1)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric PSD matrix (negative round-off clipped)."""
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(x: np.ndarray, y: np.ndarray, s_x: np.ndarray,
                        s_y: np.ndarray) -> float:
  """tr (S_x S_y)^(1/2) of the covariances of centred features x [n, D], y [m, D].

  S_x S_y has the eigenvalues of the symmetric PSD matrix A S_y A (A = S_x^(1/2)), so the
  trace is the sum of their square roots (two symmetric eigendecompositions, D^3 work). When
  the feature sets are small, the same nonzero eigenvalues are the squared singular values of
  x y^T / sqrt((n - 1)(m - 1)) ([n, m]), and the trace is that matrix's nuclear norm. Both are
  exact for singular covariances (no offset needed, unlike scipy's `sqrtm`, pytorch-fid's
  route) and equal sqrtm's trace to round-off (tests/test_metrics.py).
  """
  n, m, d = len(x), len(y), x.shape[1]
  if min(n, m) ** 2 * max(n, m) < 4 * d**3:
    singular = np.linalg.svd(x @ y.T, compute_uv=False)
    return float(singular.sum() / np.sqrt((n - 1) * (m - 1)))
  w, v = np.linalg.eigh(s_x)
  a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  inner = a @ s_y @ a
  eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
  return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
  """Frechet distance between Gaussians fitted to two feature sets [N, D] (FID's formula):
  |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2))."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
    raise UserError(f"frechet_distance wants two [N, D] feature sets, got {x.shape}, {y.shape}")
  mu_x, mu_y = x.mean(0), y.mean(0)
  s_x = np.atleast_2d(np.cov(x, rowvar=False))
  s_y = np.atleast_2d(np.cov(y, rowvar=False))
  tr_covmean = _trace_sqrt_product(x - mu_x, y - mu_y, s_x, s_y)
  return float(np.sum(np.square(mu_x - mu_y)) + np.trace(s_x) + np.trace(s_y)
               - 2.0 * tr_covmean)


def kernel_inception_distance(x: np.ndarray, y: np.ndarray, *, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
  """KID (Binkowski et al. 2018) between feature sets [N, D] and [M, D]: the unbiased MMD^2
  estimate with the polynomial kernel k(a, b) = (a.b / D + 1)^3, averaged over `num_subsets`
  random subsets of min(subset_size, N, M) rows drawn without replacement from each set (the
  recipe of clean-fid and torch-fidelity: 100 subsets of 1000). Returns (mean, std) over the
  subsets. Same seed, same subsets.

  Per subset of size m: (sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)) / (m (m - 1))
  - 2 sum_{i,j} k(x_i, y_j) / m^2.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
    raise UserError(f"kernel_inception_distance wants two [N, D] feature sets with N >= 2, "
                    f"got {x.shape}, {y.shape}")
  if num_subsets < 1:
    raise UserError(f"num_subsets={num_subsets} must be at least 1")
  m = min(len(x), len(y), int(subset_size))
  if m < 2:
    raise UserError(f"subset_size={subset_size} must be at least 2")
  d = x.shape[1]
  rng = np.random.default_rng(seed)
  values = np.empty(num_subsets)
  for s in range(num_subsets):
    a = x[rng.choice(len(x), m, replace=False)]
    b = y[rng.choice(len(y), m, replace=False)]
    k_xx = (a @ a.T / d + 1.0) ** 3
    k_yy = (b @ b.T / d + 1.0) ** 3
    k_xy = (a @ b.T / d + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    values[s] = within - 2.0 * k_xy.sum() / (m * m)
  return float(values.mean()), float(values.std())
