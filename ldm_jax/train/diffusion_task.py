"""A diffusion stage as a task for the shared training loop, whatever space it runs in.

The stage's codec (`ldm_jax.models.codecs`: the frozen KL autoencoder for an LDM, pixels at the
stage's resolution for the pixel model and each cascade stage) maps the batch images to the
diffusion's x_0. Its parameters are an argument of the step (`step_constants`), never part of
the train state. Condition dropout (labels -> the null label, captions -> the empty caption)
trains the unconditional model used by classifier-free guidance. A super-resolution stage
(`lowres.stage` set) is conditioned on x_0 shrunk to the lower stage's resolution, resized
back and noised to a random augmentation level that the UNet also receives.

Every random draw of a step (timesteps, noise, the posterior sample of a latent codec, the
condition dropout, the augmentation level) is made for the whole batch; with
`train.grad_accum_steps` = k the batch is then split into k microbatches that one `lax.scan`
runs through the loss and its gradient, summing both, before the one optimizer update, so a
step with k microbatches equals the step on the whole batch (up to float summation order; the
network's own dropout masks, drawn per microbatch, are the exception).

With a latent cache (`ldm_jax.train.latent_cache`) the batch's "image" entry holds the cached
posterior moments [B, h, w, 2c] of the images instead of the images, and the step samples
x_0 = scale * (mean + std * noise) with the same noise the encoder path would draw.
"""
import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ldm_jax import diffusion
from ldm_jax.models import codecs
from ldm_jax.models.builders import (TEXT_KINDS, build_text_encoder, build_unet,  # noqa: F401
                                     compute_dtype)
from ldm_jax.models.conditioning import Tokenizer
from ldm_jax.errors import UserError
from ldm_jax.models import lora as lora_lib
from ldm_jax.models.denoiser import DiffusionModel
from ldm_jax.train.state import TrainState, adam_schedule, metrics_collection


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """Plain values read once from a stage block: nothing inside jit reads a ConfigDict."""
  parameterization: str
  min_snr_gamma: float
  cond_kind: str
  drop_prob: float
  max_length: int
  lowres_resolution: int   # 0: not a super-resolution stage
  aug_steps: int           # augmentation levels drawn from [0, aug_steps]

  @classmethod
  def from_config(cls, block: ml_collections.ConfigDict,
                  lowres_resolution: int = 0) -> "DiffusionConfig":
    aug = int(round(float(block.lowres.aug_max) * block.diffusion.num_timesteps))
    return cls(block.diffusion.parameterization, float(block.diffusion.min_snr_gamma),
               block.conditioning.kind, float(block.conditioning.drop_prob),
               int(block.conditioning.max_length), int(lowres_resolution),
               aug if lowres_resolution else 0)


def drop_condition(cond: dict, null: dict, keep: jax.Array) -> dict:
  """Replaces the condition of examples where `keep` is False by the null condition."""
  def pick(c, n):
    k = keep.reshape(keep.shape + (1,) * (c.ndim - 1))
    return jnp.where(k, c, jnp.broadcast_to(n, c.shape).astype(c.dtype))
  return {k: pick(cond[k], null[k]) for k in cond}


def lowres_condition(x0: jax.Array, lowres_resolution: int) -> jax.Array:
  """What a super-resolution stage sees of its target: x_0 at the lower stage's resolution,
  resized back to x_0's size (as the sampler resizes the lower stage's output)."""
  return codecs.resize(codecs.resize(x0, lowres_resolution), x0.shape[1])


class DiffusionTask:
  """One diffusion stage for the shared loop: state init, the step, and the batch layout."""

  def __init__(self, config: ml_collections.ConfigDict, stage: str, codec, num_classes: int,
               tokenizer: Optional[Tokenizer] = None, codec_params: Any = None,
               lowres_resolution: int = 0, cached_latents: bool = False):
    block = config[stage]
    self.name, self.config, self.block = stage, config, block
    self.codec, self.codec_params = codec, {} if codec_params is None else codec_params
    if cached_latents and codec.kind != "latent":
      raise ValueError(f"{stage}: a latent cache needs a latent codec, not {codec.kind!r}")
    self.cached_latents = bool(cached_latents)
    self.grad_accum_steps = int(block.train.get("grad_accum_steps", 1))
    self.dc = DiffusionConfig.from_config(block, lowres_resolution)
    dtype = compute_dtype(block.train.compute_dtype)
    self.shape = tuple(codec.shape)
    self.schedule = diffusion.stage_schedule(block)
    self.num_classes = num_classes
    text = (build_text_encoder(block, tokenizer, dtype) if self.dc.cond_kind in TEXT_KINDS
            else None)
    self.model = DiffusionModel(build_unet(block, self.shape[-1], num_classes, dtype), text,
                                self.dc.cond_kind, tokenizer, self.dc.max_length,
                                self.shape[-1] if lowres_resolution else 0)
    o = block.optim
    chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    chain.append(optax.adamw(adam_schedule(o.lr, o.warmup_steps, block.train.num_steps,
                                           o.decay),
                             b1=o.b1, b2=o.b2, eps=o.get("eps", 1e-8),
                             weight_decay=o.weight_decay))
    self.tx = optax.chain(*chain)
    lora = block.get("lora", None)
    self.lora_rank = int(lora.rank) if lora is not None else 0
    self.lora_scale = (float(lora.alpha) or self.lora_rank) / self.lora_rank if self.lora_rank else 1.0
    self.lora_base = None
    frozen = tuple(o.get("frozen", ())) if not self.lora_rank else ()
    if frozen:
      # Frozen parts (e.g. a fine-tune's CLIP text encoder) get no update and no Adam state.
      parts = ("unet",) + (("text",) if text is not None else ())
      unknown = [f for f in frozen if f not in parts]
      if unknown:
        raise UserError(f"config.{stage}.optim.frozen={list(frozen)}: {unknown} is not a part "
                        f"of this model ({', '.join(parts)})")
      if set(parts) <= set(frozen):
        raise UserError(f"config.{stage}.optim.frozen={list(frozen)} leaves nothing to train")
      self.tx = optax.multi_transform(
          {"train": self.tx, "frozen": optax.set_to_zero()},
          lambda params: {k: "frozen" if k in frozen else "train" for k in params})

  def init_state(self, rng) -> TrainState:
    if self.lora_rank:  # a LoRA run trains (and saves) its adapters alone
      shapes = jax.eval_shape(lambda r: self.model.init(r, self.shape), rng)
      adapters = lora_lib.init(shapes, self.lora_rank, rng, self.block.lora.targets)
      return TrainState.create(adapters, self.tx, self.block.optim.ema_decay)
    return TrainState.create(self.model.init(rng, self.shape), self.tx, self.block.optim.ema_decay)

  def set_lora_base(self, base_params) -> None:
    """The frozen model a LoRA run adapts (on the mesh, passed to every step)."""
    self.lora_base = base_params

  def model_params(self, params, base=None):
    """The model's parameters from a state's `params`: the adapters merged into the base
    model for a LoRA run (scale alpha / rank), else `params` themselves."""
    if not self.lora_rank:
      return params
    return lora_lib.merge(self.lora_base if base is None else base, params, self.lora_scale)

  def step_variant(self, step: int) -> None:
    return None

  def step_constants(self) -> tuple:
    """The codec's parameters (the frozen autoencoder's, or {}) and, for a LoRA run, the
    base model's: not train state."""
    if self.lora_rank:
      if self.lora_base is None:
        raise ValueError(f"{self.name}: a LoRA run needs set_lora_base() before training")
      return (self.codec_params, self.lora_base)
    return (self.codec_params,)

  def batch_keys(self) -> dict:
    """Batch entries beyond image/label: name -> (shape suffix, dtype); with a latent cache
    also "image", which then holds the posterior moments (mean, log-variance) of the images."""
    keys = {}
    if self.cached_latents:
      h, w, c = self.shape
      keys["image"] = ((h, w, 2 * c), jnp.float32)
    if self.dc.cond_kind in TEXT_KINDS:
      keys.update(tokens=((self.dc.max_length,), jnp.int32),
                  token_mask=((self.dc.max_length,), jnp.bool_))
    return keys

  def condition(self, batch) -> dict:
    if self.dc.cond_kind == "class":
      return {"labels": batch["label"].astype(jnp.int32)}
    if self.dc.cond_kind in TEXT_KINDS:
      return {"tokens": batch["tokens"], "token_mask": batch["token_mask"]}
    return {}

  def _with_lowres(self, cond: dict, z0, level, noise) -> dict:
    """`cond` plus a super-resolution stage's conditioning: x_0's low-resolution version
    noised to `level` (int [B]) with `noise` (x_0's shape), and the level itself."""
    low = lowres_condition(z0, self.dc.lowres_resolution)
    return {**cond, "aug_level": level, "lowres": diffusion.augment(self.schedule, low, level,
                                                                      noise)}

  def _x0(self, codec_params, batch) -> jax.Array:
    """x_0 of a batch (or microbatch) whose posterior noise, if any, is batch["post_noise"]."""
    if self.codec.kind != "latent":
      return self.codec.encode(codec_params, batch["image"])
    moments = (batch["image"] if self.cached_latents
               else self.codec.moments(codec_params, batch["image"]))
    return self.codec.from_moments(moments, batch["post_noise"])

  def _draws(self, rng, b: int) -> tuple[dict, jax.Array]:
    """Every random value of a step for a batch of `b` examples, drawn once for the whole
    batch (so microbatching does not change them), and the dropout rng of the network."""
    r_post, r_t, r_noise, r_keep, r_drop, r_aug = jax.random.split(rng, 6)
    shape = (b,) + self.shape
    draws = {"t": jax.random.randint(r_t, (b,), 0, self.schedule.num_timesteps),
             "noise": jax.random.normal(r_noise, shape)}
    if self.codec.kind == "latent":
      draws["post_noise"] = jax.random.normal(r_post, shape)
    if self.dc.cond_kind != "none" and self.dc.drop_prob > 0:
      draws["keep"] = jax.random.uniform(r_keep, (b,)) >= self.dc.drop_prob
    if self.dc.lowres_resolution:
      r_level, r_aug_noise = jax.random.split(r_aug)
      draws["level"] = jax.random.randint(r_level, (b,), 0, self.dc.aug_steps + 1)
      draws["aug_noise"] = jax.random.normal(r_aug_noise, shape)
    return draws, r_drop

  def loss(self, params, z0, t, noise, cond, rng):
    """The training loss of one batch: x_0 (scaled latents or pixels) noised to t with
    `noise`, the model's output against the parameterization's target (min-SNR weighted
    when configured); the loss every train step differentiates."""
    dc, sched = self.dc, self.schedule
    z_t = diffusion.q_sample(sched, z0, t, noise)
    out = self.model(params, z_t, t, cond, train=True, rng=rng)
    tgt = diffusion.target(sched, z0, noise, t, dc.parameterization)
    weights = (diffusion.min_snr_weights(sched, t, dc.min_snr_gamma, dc.parameterization)
               if dc.min_snr_gamma > 0 else None)
    return diffusion.diffusion_loss(out, tgt, weights)

  def make_train_step(self, variant: Any = None):
    dc, k = self.dc, self.grad_accum_steps
    loss_fn = self.loss

    def micro(params, codec_params, mb, r_drop, base=None):
      """(loss, gradients, x_0) of one microbatch `mb` (batch entries and draws)."""
      z0 = self._x0(codec_params, mb)
      cond = self.condition(mb)
      if "keep" in mb:
        cond = drop_condition(cond, self.model.null_condition(1), mb["keep"])
      if dc.lowres_resolution:
        cond = self._with_lowres(cond, z0, mb["level"], mb["aug_noise"])
      fn = (loss_fn if not self.lora_rank else
            lambda p, *a: loss_fn(self.model_params(p, base), *a))
      loss, grads = jax.value_and_grad(fn)(params, z0, mb["t"], mb["noise"], cond, r_drop)
      return loss, grads, z0

    def train_step(state: TrainState, batch, rng, codec_params, base=None):
      rng = jax.random.fold_in(rng, state.step)
      draws, r_drop = self._draws(rng, batch["image"].shape[0])
      whole = {**batch, **draws}
      if k == 1:
        loss, grads, z0 = micro(state.params, codec_params, whole, r_drop, base)
      else:
        loss, grads, z0 = accumulate(
            lambda mb, i: micro(state.params, codec_params, mb, jax.random.fold_in(r_drop, i),
                                base),
            whole, k, state.params)
      state = state.apply_gradients(grads)
      out = {"loss": loss, "grad_norm": optax.global_norm(grads),
             "latent_std": jnp.std(z0)}
      return state, metrics_collection(out).single_from_model_output(**out)

    return train_step

  def denoising_loss(self, params, batch, rng, codec_params, aug_level: int = 0):
    """The mean conditional denoising loss on `batch` (no dropout, no condition drop; the
    low-resolution conditioning at `aug_level`): held-out vs training loss, the overfitting
    measure of benchmarks/compare.py."""
    r_post, r_t, r_noise, r_aug = jax.random.split(rng, 4)
    z0 = self.codec.encode(self.codec_params if codec_params is None else codec_params,
                           batch["image"], r_post)
    b = z0.shape[0]
    t = jax.random.randint(r_t, (b,), 0, self.schedule.num_timesteps)
    noise = jax.random.normal(r_noise, z0.shape, z0.dtype)
    cond = self.condition(batch)
    if self.dc.lowres_resolution:
      cond = self._with_lowres(cond, z0, jnp.full((b,), aug_level, jnp.int32),
                               jax.random.normal(r_aug, z0.shape, z0.dtype))
    out = self.model(params, diffusion.q_sample(self.schedule, z0, t, noise), t, cond)
    return diffusion.diffusion_loss(
        out, diffusion.target(self.schedule, z0, noise, t, self.dc.parameterization))


def split_microbatches(tree, k: int):
  """Every [B, ...] leaf as [k, B / k, ...], microbatch i holding rows i, i + k, i + 2k, ...:
  a device's contiguous block of the batch axis holds rows of every microbatch, so splitting
  moves no data between devices (when B / k is a multiple of the batch-axis devices)."""
  def split(x):
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, tree)


def accumulate(fn, batch, k: int, params):
  """Runs `fn(microbatch, i) -> (loss, grads of params, x0)` over the k microbatches of
  `batch` in one `lax.scan`; returns the mean loss, the mean gradients (each microbatch's loss
  is a mean over equally many examples, so these are the whole batch's) and every x_0
  (microbatch-major)."""
  parts = split_microbatches(batch, k)
  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))

  def body(carry, inputs):
    mb, i = inputs
    loss, grads, z0 = fn(mb, i)
    return jax.tree.map(jnp.add, carry, (loss, grads)), z0

  (loss, grads), z0 = jax.lax.scan(body, zeros, (parts, jnp.arange(k)))
  return loss / k, jax.tree.map(lambda g: g / k, grads), z0
