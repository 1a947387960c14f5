"""Autoencoder losses (LDM's `LPIPSWithDiscriminator`) as pure functions.

Shapes: images NHWC; logits of the PatchGAN any shape; every loss returns a scalar.
"""
import jax
import jax.numpy as jnp


def reconstruction_loss(x: jax.Array, rec: jax.Array, kind: str = "l1") -> jax.Array:
  """Per-pixel reconstruction error, same shape as x."""
  if kind == "l1":
    return jnp.abs(x - rec)
  if kind == "l2":
    return jnp.square(x - rec)
  raise ValueError(f"unknown reconstruction loss {kind!r} (loss.rec_loss: 'l1' or 'l2')")


def nll_loss(per_pixel: jax.Array, logvar: jax.Array) -> jax.Array:
  """Negative log-likelihood with one learned output log-variance (LDM's `logvar`).

  Summed over pixels and averaged over the batch, as in LDM: sum(r / exp(logvar) + logvar) / B.
  """
  nll = per_pixel / jnp.exp(logvar) + logvar
  return jnp.sum(nll) / per_pixel.shape[0]


def kl_loss(kl_per_example: jax.Array) -> jax.Array:
  return jnp.mean(kl_per_example)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) +
                jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """The non-saturating (logistic) discriminator loss."""
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) +
                jnp.mean(jax.nn.softplus(logits_fake)))


def discriminator_loss(logits_real, logits_fake, kind: str = "hinge") -> jax.Array:
  if kind == "hinge":
    return hinge_d_loss(logits_real, logits_fake)
  if kind == "non_saturating":
    return vanilla_d_loss(logits_real, logits_fake)
  raise ValueError(f"unknown GAN loss {kind!r} (loss.gan_loss: 'hinge' or 'non_saturating')")


def generator_loss(logits_fake: jax.Array, kind: str = "hinge") -> jax.Array:
  """Hinge: -E[D(G(z))] (LDM). Non-saturating: E[softplus(-D(G(z)))]."""
  if kind == "hinge":
    return -jnp.mean(logits_fake)
  if kind == "non_saturating":
    return jnp.mean(jax.nn.softplus(-logits_fake))
  raise ValueError(f"unknown GAN loss {kind!r} (loss.gan_loss: 'hinge' or 'non_saturating')")


def adaptive_weight(nll_grad, g_grad, disc_weight: float) -> jax.Array:
  """||dL_rec/dW|| / (||dL_gan/dW|| + 1e-4), clipped to [0, 1e4], times disc_weight.

  W is the decoder's last layer (Esser et al. 2021, eq. 7); the result carries no gradient.
  """
  def norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))
  w = jnp.clip(norm(nll_grad) / (norm(g_grad) + 1e-4), 0.0, 1e4)
  return jax.lax.stop_gradient(w * disc_weight)


def adopt_weight(weight: float, step: jax.Array, threshold: int, value: float = 0.0):
  """`weight` once step >= threshold, else `value` (LDM's disc_start switch)."""
  return jnp.where(step >= threshold, weight, value)
