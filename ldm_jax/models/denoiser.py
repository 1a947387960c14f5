"""The conditional denoiser of every diffusion stage: UNet (+ text encoder) parameters ->
model_out(x_t, t, cond), shared by the train steps and the samplers.

`cond` is a dict with, by conditioning kind:
  class      {'labels': int [B]}
  text/clip  {'tokens': int [B, L], 'token_mask': bool [B, L]}
  none       {}
and, for a super-resolution stage (`lowres_channels > 0`), also
  {'lowres': [B, H, W, C] the lower-resolution image resized to x's size and noised,
   'aug_level': int [B] the timestep it was noised to}
which is concatenated onto x_t / embedded. Guidance drops the class or text condition only:
the low-resolution image is part of both branches.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from ldm_jax.models.builders import TEXT_KINDS
from ldm_jax.models.conditioning import TextEncoder, Tokenizer
from ldm_jax.models.unet import UNet

LOWRES_KEYS = ("lowres", "aug_level")


class DiffusionModel:
  """UNet (+ text encoder) with the conditioning of one stage."""

  def __init__(self, unet: UNet, text_encoder: Optional[TextEncoder], cond_kind: str,
               tokenizer: Optional[Tokenizer] = None, max_length: int = 0,
               lowres_channels: int = 0):
    self.unet, self.text_encoder, self.cond_kind = unet, text_encoder, cond_kind
    self.tokenizer, self.max_length = tokenizer, max_length
    self.lowres_channels = int(lowres_channels)

  def init(self, rng, shape):
    """Parameters for inputs of `shape` (H, W, C) without the batch axis."""
    r_u, r_t = jax.random.split(rng)
    z = jnp.zeros((1,) + tuple(shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    params = {}
    cond = self.null_condition(1)
    if self.cond_kind in TEXT_KINDS:
      params["text"] = self.text_encoder.init(r_t, cond["tokens"], cond["token_mask"])["params"]
    if self.lowres_channels:
      cond["lowres"] = jnp.zeros(z.shape[:-1] + (self.lowres_channels,), jnp.float32)
      cond["aug_level"] = jnp.zeros((1,), jnp.int32)
    x, kwargs = self._inputs(params, z, cond, train=False, rngs={}, init=True)
    params["unet"] = self.unet.init(r_u, x, t, **kwargs)["params"]
    return params

  def null_tokens(self, batch: int):
    ids, mask = self.tokenizer.encode([""] * batch, self.max_length)
    return jnp.asarray(ids), jnp.asarray(mask)

  def null_condition(self, batch: int) -> dict:
    """The class / text condition meaning "unconditional" (no low-resolution keys)."""
    if self.cond_kind == "class":
      return {"labels": jnp.full((batch,), self.unet.null_label, jnp.int32)}
    if self.cond_kind in TEXT_KINDS:
      ids, mask = self.null_tokens(batch)
      return {"tokens": ids, "token_mask": mask}
    return {}

  def _inputs(self, params, x, cond, *, train, rngs, init=False):
    kwargs = {}
    if self.cond_kind == "class":
      kwargs["labels"] = cond["labels"]
    elif self.cond_kind in TEXT_KINDS:
      if init:
        context = jnp.zeros((x.shape[0], self.max_length, self.text_encoder.width))
      else:
        context = self.text_encoder.apply({"params": params["text"]}, cond["tokens"],
                                          cond["token_mask"], train=train, rngs=rngs)
      if self.cond_kind == "clip":  # frozen
        context = jax.lax.stop_gradient(context)
      kwargs["context"], kwargs["context_mask"] = context, cond["token_mask"]
    if self.lowres_channels:
      x = jnp.concatenate([x, cond["lowres"].astype(x.dtype)], axis=-1)
      kwargs["aug_level"] = cond["aug_level"]
    return x, kwargs

  def __call__(self, params, x_t, t, cond: dict, *, train: bool = False, rng=None):
    rngs = {"dropout": rng} if rng is not None else {}
    x, kwargs = self._inputs(params, x_t, cond, train=train, rngs=rngs)
    return self.unet.apply({"params": params["unet"]}, x, t, train=train, rngs=rngs, **kwargs)
