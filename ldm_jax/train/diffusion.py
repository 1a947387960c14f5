"""Stage 2: the diffusion UNet (and, for text, a jointly trained text encoder) in the latent
space of a frozen autoencoder, as a task for the shared training loop.

The frozen autoencoder parameters are an argument of the step (`step_constants`), never part
of the train state. Condition dropout (labels -> the null label, captions -> the empty
caption) trains the unconditional model used by classifier-free guidance.
"""
import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ldm_jax import diffusion
from ldm_jax.models import clip
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.conditioning import TextEncoder, Tokenizer
from ldm_jax.models.unet import UNet
from ldm_jax.train.autoencoder import compute_dtype, metrics_collection
from ldm_jax.train.state import TrainState, adam_schedule


# Conditioning kinds with a text encoder: 'text' (ours, trained with the UNet), 'clip' (CLIP's
# text transformer with converted weights, frozen; e.g. Stable Diffusion).
TEXT_KINDS = ("text", "clip")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """Plain values read once from `config.ldm`: nothing inside jit reads a ConfigDict."""
  parameterization: str
  min_snr_gamma: float
  cond_kind: str
  drop_prob: float
  max_length: int

  @classmethod
  def from_config(cls, ldm: ml_collections.ConfigDict) -> "DiffusionConfig":
    return cls(ldm.diffusion.parameterization, float(ldm.diffusion.min_snr_gamma),
               ldm.conditioning.kind, float(ldm.conditioning.drop_prob),
               int(ldm.conditioning.max_length))


def make_schedule(ldm: ml_collections.ConfigDict) -> diffusion.DiffusionSchedule:
  d = ldm.diffusion
  return diffusion.make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end,
                                 zero_terminal_snr=d.zero_terminal_snr)


def build_unet(ldm: ml_collections.ConfigDict, latent_channels: int, num_classes: int,
               dtype=jnp.float32) -> UNet:
  """The UNet of `config.ldm`. Keys added later (reference-layout options, context_dim) are
  read with their defaults so configs saved by older runs still build the same model."""
  u, cond = ldm.unet, ldm.conditioning
  context_dim = ((u.get("context_dim", 0) or cond.text_width) if cond.kind in TEXT_KINDS
                 else None)
  return UNet(
      model_channels=u.model_channels, out_channels=latent_channels,
      num_res_blocks=u.num_res_blocks, channel_mult=tuple(u.channel_mult),
      attention_levels=tuple(u.attention_levels), num_heads=u.num_heads,
      num_head_channels=u.num_head_channels, dropout=u.dropout,
      scale_shift_norm=u.scale_shift_norm, use_transformer=u.use_transformer,
      transformer_depth=u.transformer_depth, context_dim=context_dim,
      num_classes=num_classes if cond.kind == "class" else 0, remat=u.remat,
      num_groups=u.num_groups, dtype=dtype, norm_eps=float(u.get("norm_eps", 1e-6)),
      symmetric_downsample=bool(u.get("symmetric_downsample", False)),
      flip_sin_to_cos=bool(u.get("flip_sin_to_cos", True)),
      freq_shift=float(u.get("freq_shift", 0.0)),
      mid_attention=bool(u.get("mid_attention", True)),
      level_heads=tuple(u.get("level_heads", ())),
      level_transformer_depth=tuple(u.get("level_transformer_depth", ())))


def build_text_encoder(ldm, tokenizer: Tokenizer, dtype=jnp.float32):
  """conditioning.kind 'text': our TextEncoder; 'clip': a frozen CLIPTextEncoder built from
  `conditioning.clip` (the transformers CLIPTextConfig fields written by ldm_jax.convert)."""
  c = ldm.conditioning
  if c.kind == "clip":
    return clip.from_config(c.clip.to_dict() if hasattr(c.clip, "to_dict") else c.clip, dtype)
  return TextEncoder(vocab_size=tokenizer.vocab_size, max_length=c.max_length, width=c.text_width,
                     depth=c.text_depth, num_heads=c.text_heads, dtype=dtype)


class DiffusionModel:
  """The conditional denoiser: UNet (+ text encoder) params -> model_out(z_t, t, cond).

  `cond` is {'labels': int [B]} for class conditioning, {'tokens': int [B, L], 'token_mask':
  bool [B, L]} for text, {} for none. Shared by the train step and the samplers.
  """

  def __init__(self, unet: UNet, text_encoder: Optional[TextEncoder], cond_kind: str,
               tokenizer: Optional[Tokenizer] = None, max_length: int = 0):
    self.unet, self.text_encoder, self.cond_kind = unet, text_encoder, cond_kind
    self.tokenizer, self.max_length = tokenizer, max_length

  def init(self, rng, latent_shape):
    r_u, r_t = jax.random.split(rng)
    z = jnp.zeros((1,) + tuple(latent_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    params = {}
    kwargs = {}
    if self.cond_kind in TEXT_KINDS:
      ids, mask = self.null_tokens(1)
      params["text"] = self.text_encoder.init(r_t, ids, mask)["params"]
      kwargs = dict(context=jnp.zeros((1, self.max_length, self.text_encoder.width)),
                    context_mask=mask)
    elif self.cond_kind == "class":
      kwargs = dict(labels=jnp.zeros((1,), jnp.int32))
    params["unet"] = self.unet.init(r_u, z, t, **kwargs)["params"]
    return params

  def null_tokens(self, batch: int):
    ids, mask = self.tokenizer.encode([""] * batch, self.max_length)
    return jnp.asarray(ids), jnp.asarray(mask)

  def null_condition(self, batch: int) -> dict:
    if self.cond_kind == "class":
      return {"labels": jnp.full((batch,), self.unet.null_label, jnp.int32)}
    if self.cond_kind in TEXT_KINDS:
      ids, mask = self.null_tokens(batch)
      return {"tokens": ids, "token_mask": mask}
    return {}

  def __call__(self, params, z_t, t, cond: dict, *, train: bool = False, rng=None):
    rngs = {"dropout": rng} if rng is not None else {}
    kwargs = {}
    if self.cond_kind == "class":
      kwargs["labels"] = cond["labels"]
    elif self.cond_kind in TEXT_KINDS:
      kwargs["context"] = self.text_encoder.apply(
          {"params": params["text"]}, cond["tokens"], cond["token_mask"], train=train,
          rngs=rngs)
      if self.cond_kind == "clip":  # frozen
        kwargs["context"] = jax.lax.stop_gradient(kwargs["context"])
      kwargs["context_mask"] = cond["token_mask"]
    return self.unet.apply({"params": params["unet"]}, z_t, t, train=train, rngs=rngs,
                           **kwargs)


def drop_condition(cond: dict, null: dict, keep: jax.Array) -> dict:
  """Replaces the condition of examples where `keep` is False by the null condition."""
  def pick(c, n):
    k = keep.reshape(keep.shape + (1,) * (c.ndim - 1))
    return jnp.where(k, c, jnp.broadcast_to(n, c.shape).astype(c.dtype))
  return {k: pick(cond[k], null[k]) for k in cond}


class DiffusionTask:
  """Stage 2 for the shared loop: state init, the step, and the batch layout."""

  name = "ldm"

  def __init__(self, config: ml_collections.ConfigDict, autoencoder: AutoencoderKL,
               latent_shape, latent_scale: float, num_classes: int,
               tokenizer: Optional[Tokenizer] = None, ae_params: Any = None):
    ldm = config.ldm
    self.ae_params = ae_params
    self.config, self.ldm = config, ldm
    self.dc = DiffusionConfig.from_config(ldm)
    dtype = compute_dtype(ldm.train.compute_dtype)
    self.autoencoder = autoencoder
    self.latent_shape = tuple(latent_shape)
    self.latent_scale = float(latent_scale)
    self.schedule = make_schedule(ldm)
    self.num_classes = num_classes
    text = (build_text_encoder(ldm, tokenizer, dtype) if self.dc.cond_kind in TEXT_KINDS
            else None)
    self.model = DiffusionModel(build_unet(ldm, self.latent_shape[-1], num_classes, dtype),
                                text, self.dc.cond_kind, tokenizer, self.dc.max_length)
    o = ldm.optim
    chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    chain.append(optax.adamw(adam_schedule(o.lr, o.warmup_steps, ldm.train.num_steps, o.decay),
                             b1=o.b1, b2=o.b2, eps=o.get("eps", 1e-8),
                             weight_decay=o.weight_decay))
    self.tx = optax.chain(*chain)

  def init_state(self, rng) -> TrainState:
    return TrainState.create(self.model.init(rng, self.latent_shape), self.tx,
                             self.ldm.optim.ema_decay)

  def step_variant(self, step: int) -> None:
    return None

  def step_constants(self) -> tuple:
    """The frozen autoencoder's parameters: an argument of every step, not train state."""
    return (self.ae_params,)

  def batch_keys(self) -> dict:
    """Extra batch entries beyond image/label: name -> (shape suffix, dtype)."""
    if self.dc.cond_kind in TEXT_KINDS:
      return {"tokens": ((self.dc.max_length,), jnp.int32),
              "token_mask": ((self.dc.max_length,), jnp.bool_)}
    return {}

  def condition(self, batch) -> dict:
    if self.dc.cond_kind == "class":
      return {"labels": batch["label"].astype(jnp.int32)}
    if self.dc.cond_kind in TEXT_KINDS:
      return {"tokens": batch["tokens"], "token_mask": batch["token_mask"]}
    return {}

  def encode(self, ae_params, images, rng):
    """Scaled latents z0 = latent_scale * (a posterior sample of the frozen autoencoder)."""
    post = self.autoencoder.apply({"params": ae_params}, images,
                                  method=AutoencoderKL.encode)
    return jax.lax.stop_gradient(post.sample(rng)) * self.latent_scale

  def make_train_step(self, variant: Any = None):
    dc, sched = self.dc, self.schedule

    def loss_fn(params, z0, t, noise, cond, rng):
      z_t = diffusion.q_sample(sched, z0, t, noise)
      out = self.model(params, z_t, t, cond, train=True, rng=rng)
      tgt = diffusion.target(sched, z0, noise, t, dc.parameterization)
      weights = (diffusion.min_snr_weights(sched, t, dc.min_snr_gamma, dc.parameterization)
                 if dc.min_snr_gamma > 0 else None)
      return diffusion.diffusion_loss(out, tgt, weights)

    def train_step(state: TrainState, batch, rng, ae_params):
      rng = jax.random.fold_in(rng, state.step)
      r_post, r_t, r_noise, r_keep, r_drop = jax.random.split(rng, 5)
      z0 = self.encode(ae_params, batch["image"], r_post)
      b = z0.shape[0]
      t = jax.random.randint(r_t, (b,), 0, sched.num_timesteps)
      noise = jax.random.normal(r_noise, z0.shape, z0.dtype)
      cond = self.condition(batch)
      if cond and dc.drop_prob > 0:
        keep = jax.random.uniform(r_keep, (b,)) >= dc.drop_prob
        cond = drop_condition(cond, self.model.null_condition(1), keep)
      loss, grads = jax.value_and_grad(loss_fn)(state.params, z0, t, noise, cond, r_drop)
      state = state.apply_gradients(grads)
      out = {"loss": loss, "grad_norm": optax.global_norm(grads),
             "latent_std": jnp.std(z0)}
      return state, metrics_collection(out).single_from_model_output(**out)

    return train_step
