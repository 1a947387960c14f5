"""CLIP's text transformer (Radford et al. 2021), the frozen text encoder of Stable Diffusion.

  ids [B, L] -> token embedding + learned position embedding
             -> `num_layers` x pre-LN block: x += attn(LN1(x)) (causal), x += MLP(LN2(x))
             -> final LayerNorm -> hidden states [B, L, width]

SD 1.x feeds the last hidden state (after the final LayerNorm) of all 77 positions to the
UNet's cross-attention, with no padding mask (the tokenizer pads with the end token); SD 2.x
ships a text encoder truncated to the penultimate layer, so the same rule applies to its
converted weights. The parameter tree mirrors transformers' `CLIPTextModel` so that the
converter (`ldm_jax.convert.clip`) is a renaming plus transposes.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.errors import UserError

Dtype = Any
ACTIVATIONS = ("quick_gelu", "gelu")


def quick_gelu(x):
  """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
  return x * jax.nn.sigmoid(1.702 * x)


def activation(name: str):
  if name == "quick_gelu":
    return quick_gelu
  if name == "gelu":
    return lambda x: nn.gelu(x, approximate=False)
  raise UserError(f"unknown CLIP activation {name!r} (hidden_act: one of {ACTIVATIONS})")


class CLIPAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v/out projections; causal, optional key mask."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    width = x.shape[-1]
    head_dim = width // self.num_heads

    def project(name):  # [B, L, C] -> [B, L, heads, head_dim]
      y = nn.Dense(width, dtype=self.dtype, name=name)(x)
      return y.reshape(y.shape[:2] + (self.num_heads, head_dim))

    if mask is not None:
      mask = jnp.asarray(mask, bool)[:, None, None, :]
    out = jax.nn.dot_product_attention(project("q_proj"), project("k_proj"), project("v_proj"),
                                       mask=mask, is_causal=True)
    return nn.Dense(width, dtype=self.dtype, name="out_proj")(out.reshape(x.shape))


class CLIPEncoderLayer(nn.Module):
  num_heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name=name)  # noqa
    x = x + CLIPAttention(self.num_heads, self.dtype, name="self_attn")(norm("layer_norm1")(x),
                                                                        mask)
    h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(norm("layer_norm2")(x))
    h = nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(activation(self.hidden_act)(h))
    return x + h


class CLIPTextEncoder(nn.Module):
  """ids int [B, L] (L <= max_position_embeddings) -> last hidden state [B, L, hidden_size].

  Attributes follow transformers' `CLIPTextConfig` names. `mask` (bool [B, L], optional) hides
  padded keys as transformers' `attention_mask` does; SD does not pass one.
  """
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @property
  def width(self) -> int:
    return self.hidden_size

  @nn.compact
  def __call__(self, ids, mask: Optional[jax.Array] = None, *, train: bool = False):
    del train  # no dropout: the same call signature as conditioning.TextEncoder
    length = ids.shape[1]
    if length > self.max_position_embeddings:
      raise UserError(f"CLIPTextEncoder: {length} tokens > max_position_embeddings "
                      f"{self.max_position_embeddings}")
    if self.hidden_size % self.num_attention_heads:
      raise UserError(f"CLIPTextEncoder: hidden_size {self.hidden_size} is not divisible by "
                      f"num_attention_heads {self.num_attention_heads}")
    activation(self.hidden_act)  # fail early on an unknown name
    init = nn.initializers.normal(0.02)
    x = nn.Embed(self.vocab_size, self.hidden_size, embedding_init=init, dtype=self.dtype,
                 name="token_embedding")(ids)
    pos = self.param("position_embedding", init,
                     (self.max_position_embeddings, self.hidden_size), jnp.float32)
    x = x + pos[None, :length].astype(self.dtype)
    for i in range(self.num_hidden_layers):
      x = CLIPEncoderLayer(self.num_attention_heads, self.intermediate_size, self.hidden_act,
                           self.layer_norm_eps, self.dtype, name=f"layers_{i}")(x, mask)
    return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)


CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps")


def from_config(cfg: dict, dtype=jnp.float32) -> CLIPTextEncoder:
  """A CLIPTextEncoder from a dict with (at least) CONFIG_KEYS, e.g. config.ldm.conditioning.clip
  or transformers' text_encoder/config.json."""
  missing = [k for k in CONFIG_KEYS if k not in cfg]
  if missing:
    raise UserError(f"CLIP text config lacks keys {missing}")
  return CLIPTextEncoder(**{k: cfg[k] for k in CONFIG_KEYS}, dtype=dtype)
