"""Stage 1: the KL autoencoder with its PatchGAN, as a task for the shared training loop.

One jitted step updates the generator (encoder, decoder, output log-variance) and the
discriminator together: both gradients come from the same forward pass, the discriminator
seeing the reconstructions with the gradient stopped (a simultaneous GAN update, where LDM's
PyTorch Lightning module runs the two optimizers one after the other and recomputes the
reconstruction). Before `loss.disc_start` a GAN-free step is used: two compiled programs,
chosen on the host by step number, never a branch inside jit.
"""
import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ldm_jax.evaluation import metrics as image_metrics
from ldm_jax.losses import autoencoder as losses
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.builders import build_autoencoder, compute_dtype  # noqa: F401
from ldm_jax.models.discriminator import PatchDiscriminator
from ldm_jax.train.state import TrainState, adam_schedule, metrics_collection

@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Plain values read once from `config.loss`: nothing inside jit looks at a ConfigDict."""
  rec_loss: str
  kl_weight: float
  perceptual_weight: float
  disc_weight: float
  disc_factor: float
  disc_start: int
  gan_loss: str

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> "LossConfig":
    return cls(c.rec_loss, float(c.kl_weight), float(c.perceptual_weight),
               float(c.disc_weight), float(c.disc_factor), int(c.disc_start), c.gan_loss)

  @property
  def gan_enabled(self) -> bool:
    return self.disc_weight > 0 and self.disc_factor > 0


class AutoencoderTask:
  """Everything stage 1 needs: models, state init, the step, and evaluation functions."""

  name = "autoencoder"

  def __init__(self, config: ml_collections.ConfigDict,
               lpips_fn: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None):
    self.config = config
    dtype = compute_dtype(config.train.compute_dtype)
    self.channels = config.data.channels
    self.model = build_autoencoder(config.autoencoder, self.channels, dtype)
    d = config.discriminator
    self.disc = PatchDiscriminator(ndf=d.ndf, n_layers=d.n_layers, norm=d.norm, dtype=dtype)
    self.loss = LossConfig.from_config(config.loss)
    self.lpips_fn = lpips_fn
    # Batch statistics of the current batch are used in training and the discriminator is
    # never run in inference, so running averages are not kept (LDM never reads them either).
    shapes = jax.eval_shape(self.disc.init, jax.random.key(0), self._dummy())
    self._disc_stats = {k: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
                        for k, t in shapes.items() if k != "params"}
    o = config.optim
    gen_tx = optax.adam(adam_schedule(o.lr, o.warmup_steps, config.train.num_steps, o.decay),
                        b1=o.b1, b2=o.b2, eps=o.eps)
    disc_tx = optax.adam(adam_schedule(o.disc_lr, 0, config.train.num_steps, "constant"),
                         b1=o.b1, b2=o.b2, eps=o.eps)
    self.tx = optax.partition({"gen": gen_tx, "disc": disc_tx},
                              {"autoencoder": "gen", "logvar": "gen", "discriminator": "disc"})

  # ---- state -------------------------------------------------------------------------------
  def _dummy(self):
    s = self.config.data.image_size
    return jnp.zeros((1, s, s, self.channels), jnp.float32)

  def init_state(self, rng: jax.Array) -> TrainState:
    r_ae, r_d = jax.random.split(rng)
    x = self._dummy()
    ae_params = self.model.init(r_ae, x)["params"]
    d_vars = self.disc.init(r_d, x)
    params = {"autoencoder": ae_params, "discriminator": d_vars["params"],
              "logvar": jnp.full((), self.config.loss.logvar_init, jnp.float32)}
    return TrainState.create(params, self.tx, self.config.optim.ema_decay, "autoencoder")

  def batch_keys(self) -> dict:
    return {}

  def step_constants(self) -> tuple:
    return ()

  def step_variant(self, step: int) -> bool:
    """Whether the GAN terms are active at `step` (selects a compiled program)."""
    return self.loss.gan_enabled and step >= self.loss.disc_start

  # ---- pieces of the step ------------------------------------------------------------------
  def _disc_logits(self, d_params, images):
    out, _ = self.disc.apply({"params": d_params, **self._disc_stats}, images,
                             mutable=["batch_stats"])
    return out

  def _head(self, ae_params, kernel, h):
    """The decoder's last conv on features h, with its kernel given separately (LDM's
    `get_last_layer()`: the weight that the adaptive GAN weight differentiates against)."""
    conv_out = {**ae_params["decoder"]["conv_out"], "kernel": kernel}
    params = {**ae_params, "decoder": {**ae_params["decoder"], "conv_out": conv_out}}
    return self.model.apply({"params": params}, h, method=AutoencoderKL.decode_head)

  def _nll(self, x, rec, logvar):
    per_pixel = losses.reconstruction_loss(x, rec, self.loss.rec_loss)
    if self.lpips_fn is not None and self.loss.perceptual_weight > 0:
      p = self.lpips_fn(x, rec).astype(jnp.float32)
      per_pixel = per_pixel + self.loss.perceptual_weight * p[:, None, None, None]
    return losses.nll_loss(per_pixel, logvar), per_pixel

  def make_train_step(self, use_gan: bool):
    lc = self.loss

    def generator_loss(gen_params, d_params, x, rng):
      ae, logvar = gen_params["autoencoder"], gen_params["logvar"]
      r_z, r_drop = jax.random.split(rng)
      posterior = self.model.apply({"params": ae}, x, train=True, method=AutoencoderKL.encode,
                                   rngs={"dropout": r_drop})
      h = self.model.apply({"params": ae}, posterior.sample(r_z), train=True,
                           method=AutoencoderKL.decode_features, rngs={"dropout": r_drop})
      rec = self._head(ae, ae["decoder"]["conv_out"]["kernel"], h)
      nll, per_pixel = self._nll(x, rec, logvar)
      kl = losses.kl_loss(posterior.kl())
      loss = nll + lc.kl_weight * kl
      out = {"nll": nll, "kl": kl, "rec_loss": jnp.mean(per_pixel), "logvar": logvar}
      if use_gan:
        # Adaptive weight: gradients of both terms w.r.t. the decoder's last layer only, so
        # each needs a backward pass through conv_out (and the discriminator), not the decoder.
        hs = jax.lax.stop_gradient(h)
        w = ae["decoder"]["conv_out"]["kernel"]
        nll_grad = jax.grad(lambda w: self._nll(x, self._head(ae, w, hs), logvar)[0])(w)
        g_grad = jax.grad(lambda w: losses.generator_loss(
            self._disc_logits(d_params, self._head(ae, w, hs)), lc.gan_loss))(w)
        d_weight = losses.adaptive_weight(nll_grad, g_grad, lc.disc_weight)
        g_loss = losses.generator_loss(self._disc_logits(d_params, rec), lc.gan_loss)
        loss = loss + d_weight * lc.disc_factor * g_loss
        out.update(d_weight=d_weight, g_loss=g_loss)
      return loss, (rec, out)

    def discriminator_loss(d_params, x, rec):
      real = self._disc_logits(d_params, x)
      fake = self._disc_logits(d_params, jax.lax.stop_gradient(rec))
      d_loss = lc.disc_factor * losses.discriminator_loss(real, fake, lc.gan_loss)
      return d_loss, {"disc_loss": d_loss, "logits_real": jnp.mean(real),
                      "logits_fake": jnp.mean(fake)}

    def train_step(state: TrainState, batch, rng):
      rng = jax.random.fold_in(rng, state.step)
      x = batch["image"]
      gen_params = {"autoencoder": state.params["autoencoder"], "logvar": state.params["logvar"]}
      d_params = state.params["discriminator"]
      (loss, (rec, out)), gen_grads = jax.value_and_grad(generator_loss, has_aux=True)(
          gen_params, d_params, x, rng)
      if use_gan:
        d_grads, d_out = jax.grad(discriminator_loss, has_aux=True)(d_params, x, rec)
        out.update(d_out)
      else:
        d_grads = jax.tree.map(jnp.zeros_like, d_params)
      state = state.apply_gradients({**gen_grads, "discriminator": d_grads})
      out.update(loss=loss, psnr=jnp.mean(image_metrics.psnr(
          image_metrics.to_unit(x), image_metrics.to_unit(rec))))
      return state, metrics_collection(out).single_from_model_output(**out)

    return train_step

  # ---- evaluation ---------------------------------------------------------------------------
  def reconstruct(self, ae_params, x):
    """Reconstruction from the posterior mode (deterministic), as used for evaluation."""
    return self.model.apply({"params": ae_params}, x)[0]

  def eval_step(self, ae_params, batch):
    """Masked sums of PSNR and SSIM (images in [0, 1]) over one evaluation batch."""
    x = batch["image"]
    rec = jnp.clip(self.reconstruct(ae_params, x), -1.0, 1.0)
    a, b = image_metrics.to_unit(x), image_metrics.to_unit(rec)
    m = batch["mask"]
    return {"psnr": jnp.sum(image_metrics.psnr(a, b) * m),
            "ssim": jnp.sum(image_metrics.ssim(a, b) * m), "count": jnp.sum(m)}
