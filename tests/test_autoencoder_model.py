"""The KL autoencoder, its posterior, the PatchGAN and the stage-1 losses on known inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.losses import autoencoder as losses
from ldm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm_jax.models.discriminator import PatchDiscriminator

from configs import autoencoder as ae_configs


def test_kl_matches_closed_form_and_monte_carlo():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
  logvar = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
  post = DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar))
  # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2) / 2 - 1/2, per element.
  s = np.exp(0.5 * logvar)
  expected = (np.log(1.0 / s) + (s ** 2 + mean ** 2) / 2 - 0.5).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(post.kl(), expected, rtol=1e-5)
  # Monte Carlo E_q[log q(z) - log p(z)].
  z = mean + s * rng.normal(size=(200_000,) + mean.shape)
  log_q = -0.5 * (((z - mean) / s) ** 2 + np.log(2 * np.pi) + logvar)
  log_p = -0.5 * (z ** 2 + np.log(2 * np.pi))
  mc = (log_q - log_p).sum(axis=(2, 3, 4)).mean(axis=0)
  np.testing.assert_allclose(post.kl(), mc, rtol=0.02)


def test_kl_of_standard_normal_is_zero():
  post = DiagonalGaussian(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3)))
  np.testing.assert_allclose(post.kl(), 0.0, atol=1e-7)


def test_posterior_sampling_statistics():
  mean = jnp.array([[[[1.5, -2.0]]]])
  logvar = jnp.log(jnp.array([[[[0.25, 4.0]]]]))
  post = DiagonalGaussian(mean, logvar)
  keys = jax.random.split(jax.random.key(0), 50_000)
  z = jax.vmap(post.sample)(keys).reshape(-1, 2)
  np.testing.assert_allclose(z.mean(0), [1.5, -2.0], atol=0.03)
  np.testing.assert_allclose(z.std(0), [0.5, 2.0], rtol=0.02)
  assert post.mode() is post.mean


def test_logvar_is_clipped_like_ldm():
  post = DiagonalGaussian.from_moments(jnp.concatenate(
      [jnp.zeros((1, 1, 1, 1)), jnp.full((1, 1, 1, 1), 100.0)], axis=-1))
  assert float(post.logvar.max()) == 20.0


@pytest.mark.parametrize("ch_mult,f", [((1, 2, 2), 4), ((1, 2, 2, 4), 8), ((1, 1, 2, 2, 4), 16)])
def test_autoencoder_shapes_for_each_downsampling_factor(ch_mult, f):
  model = AutoencoderKL(ch=8, ch_mult=ch_mult, num_res_blocks=1, in_channels=3, z_channels=3,
                        embed_dim=5, num_groups=4)
  assert model.downsample_factor == f
  x = jnp.ones((2, 32, 32, 3))
  params = model.init(jax.random.key(0), x)
  post = model.apply(params, x, method=model.encode)
  assert post.mean.shape == (2, 32 // f, 32 // f, 5)
  rec = model.apply(params, post.mode(), method=model.decode)
  assert rec.shape == x.shape and rec.dtype == jnp.float32
  rec2, _ = model.apply(params, x, jax.random.key(1))
  assert rec2.shape == x.shape


def test_bfloat16_compute_keeps_float32_params():
  model = AutoencoderKL(ch=8, ch_mult=(1, 2), num_res_blocks=1, in_channels=1, num_groups=4,
                        dtype=jnp.bfloat16)
  x = jnp.ones((1, 8, 8, 1))
  params = model.init(jax.random.key(0), x)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  rec, post = model.apply(params, x)
  assert rec.dtype == jnp.float32 and post.mean.dtype == jnp.float32


@pytest.mark.parametrize("n_layers,out", [(1, 14), (2, 6), (3, 2)])
def test_patch_discriminator_depth(n_layers, out):
  disc = PatchDiscriminator(ndf=8, n_layers=n_layers)
  x = jnp.ones((2, 32, 32, 3))
  v = disc.init(jax.random.key(0), x)
  logits, _ = disc.apply(v, x, mutable=["batch_stats"])
  assert logits.shape == (2, out, out, 1)


@pytest.mark.parametrize("preset,params_m", [("kl_f8", 83.6), ("kl_f4", 55.3)])
def test_accelerator_presets_build_and_initialise(preset, params_m):
  from ldm_jax.train.autoencoder_task import AutoencoderTask
  config = ae_configs.get_config(preset)
  config.data.image_size = 32  # parameters do not depend on the image size; keeps init fast
  task = AutoencoderTask(config)
  state = jax.jit(task.init_state)(jax.random.key(0))
  n = sum(p.size for p in jax.tree.leaves(state.params["autoencoder"])) / 1e6
  assert n == pytest.approx(params_m, abs=0.1)
  assert task.model.downsample_factor == (8 if preset == "kl_f8" else 4)


def test_gan_losses_on_known_logits():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.0])
  # hinge: relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1.
  assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 1.0))
  sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
  expected = 0.5 * (np.mean(sp(-np.asarray(real))) + np.mean(sp(np.asarray(fake))))
  assert float(losses.discriminator_loss(real, fake, "non_saturating")) == pytest.approx(
      expected, rel=1e-6)
  assert float(losses.generator_loss(fake, "hinge")) == pytest.approx(1.0 / 3)
  assert float(losses.generator_loss(fake, "non_saturating")) == pytest.approx(
      np.mean(sp(-np.asarray(fake))), rel=1e-6)
  with pytest.raises(ValueError, match="loss.gan_loss"):
    losses.generator_loss(fake, "wasserstein")


def test_reconstruction_and_nll_on_known_inputs():
  x = jnp.zeros((2, 2, 2, 1))
  rec = jnp.full((2, 2, 2, 1), 0.5)
  np.testing.assert_allclose(losses.reconstruction_loss(x, rec, "l1"), 0.5)
  np.testing.assert_allclose(losses.reconstruction_loss(x, rec, "l2"), 0.25)
  per_pixel = losses.reconstruction_loss(x, rec, "l1")
  # sum over 8 pixels of (0.5 / e^logvar + logvar), divided by the batch of 2.
  assert float(losses.nll_loss(per_pixel, jnp.float32(0.0))) == pytest.approx(2.0)
  lv = np.log(0.5)
  assert float(losses.nll_loss(per_pixel, jnp.float32(lv))) == pytest.approx(4 * (1.0 + lv),
                                                                             rel=1e-6)
  assert float(losses.kl_loss(jnp.array([1.0, 3.0]))) == 2.0


def test_adaptive_weight_by_hand():
  nll_grad = {"kernel": jnp.array([3.0, 4.0])}      # norm 5
  g_grad = {"kernel": jnp.array([0.0, 2.0])}        # norm 2
  w = losses.adaptive_weight(nll_grad, g_grad, 0.5)
  assert float(w) == pytest.approx(5.0 / (2.0 + 1e-4) * 0.5, rel=1e-6)
  # Clipped at 1e4 when the GAN gradient vanishes.
  w0 = losses.adaptive_weight(nll_grad, {"kernel": jnp.zeros(2)}, 1.0)
  assert float(w0) == pytest.approx(1e4)
  # No gradient flows through the weight.
  grad = jax.grad(lambda a: losses.adaptive_weight({"k": a}, g_grad, 1.0))(jnp.ones(2))
  np.testing.assert_array_equal(grad, 0.0)
