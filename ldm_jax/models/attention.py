"""Scaled dot-product attention for the UNet and the autoencoder: one entry point, `attention`,
that picks an implementation for the platform at trace time.

  GPU (CUDA): `jax.nn.dot_product_attention(..., implementation="cudnn")` (cuDNN's fused flash
      attention) where cuDNN takes the call: fp16/bf16 inputs, head dim a multiple of 8 and at
      most 128 (256 from Hopper on), no mask; otherwise the XLA implementation.
  CPU and every other platform: the XLA implementation while the whole logits tensor
      [B, heads, T, S] is small (`LOGITS_BUDGET` elements), else `blockwise_attention`.

`blockwise_attention` is written by hand because no library provides it for CPU: XLA's
implementation of `jax.nn.dot_product_attention` materialises the logits and the probabilities
at full size (at Stable Diffusion's 64x64 latents, 4096 tokens, 8 heads and batch 2 that is
1 GiB each in float32), and jax's memory-efficient kernels (cuDNN, Pallas) run only on GPU and
TPU. It maps over query chunks so that only [B, heads, q_chunk, S] logits live at once, and
when even a small query chunk against all keys is too large it also scans over key chunks
with the online (running max and sum) softmax of Rabe & Staats (2021) and FlashAttention. The
chunk body is rematerialised under differentiation, so the backward pass also holds one chunk
of logits at a time instead of saving every chunk's probabilities.

Numerics follow the XLA path: logits and softmax in float32 (for bf16/fp16 inputs too), the
scale applied to the logits, masked logits set to the same large negative value (so a row
whose keys are all masked attends uniformly, as there), probabilities cast to the value dtype.
"""
import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Elements of one logits block [B, heads, q_chunk, k_chunk] (float32: 16 MiB); a few tensors
# of this size are alive at once (logits, probabilities, in the backward pass their
# cotangents). On 2 CPU cores, SD-size self-attention (2 x 8 heads, 4096 tokens) ran about
# twice as fast with blocks of 2^20-2^22 elements as with 2^23-2^24 (2026-12, issue 10).
LOGITS_BUDGET = 2 ** 22
# Elements of one logits block in the backward pass, which recomputes each chunk's logits and
# holds more tensors of a block's size (logits, probabilities, their cotangents): fewer query
# rows per block than the forward's (not below MIN_QUERY_CHUNK), never fewer keys
# (`backward_chunk_sizes`). 2 cores, 2026-12-01 (issue 10), in-process alternation: forward +
# backward of the UNet train step's 16x16 attention (batch 32, 4 heads of 32, 256 tokens) took
# 106-110 ms with the forward's 128-query chunks, 89-92 with 64, 80 with 32 (the forward alone
# 22-23 ms with any); at SD size (2 x 8 heads, 4096 tokens) 32-query chunks were slower than 64
# (4.3 against 3.7 s), 16 slower still, and key chunks of 1024 much slower (4.4 against 2.4 s).
BACKWARD_LOGITS_BUDGET = 2 ** 20
# Fewest query rows per chunk before the keys are chunked as well: matmuls with fewer rows
# run far below the machine's matmul rate.
MIN_QUERY_CHUNK = 64
MIN_KEY_CHUNK = 256
IMPLEMENTATIONS = ("xla", "cudnn", "blockwise")

_F32 = np.dtype(np.float32)
# The masked-logit value of jax.nn.dot_product_attention (its `_get_large_negative` for
# float32 logits): finite, so a fully masked row gives a uniform softmax, not NaN.
_MASKED = -0.7 * float(np.finfo(np.float32).max)
# Logits of padding keys (added to make S a multiple of the key chunk): below _MASKED so that
# they get zero weight even in a fully masked row; finite so that max - max is never inf - inf.
_PADDING = -float(np.finfo(np.float32).max)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array] = None, *,
              implementation: Optional[str] = None) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v per head, as `jax.nn.dot_product_attention`.

  q [B, T, heads, D], k and v [B, S, heads, D] (same dtype) -> [B, T, heads, D]. `mask` is
  boolean, 4-D and broadcastable to [B, heads, T, S]; False logits get no weight.
  `implementation`: None picks by platform (module docstring); "xla", "cudnn" or "blockwise"
  forces one (`blockwise` with the chunks of `chunk_sizes`).
  """
  _check_shapes(q, k, v, mask)
  if implementation is None:
    implementation = _choose(q, k, v, mask)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} not in {IMPLEMENTATIONS}")
  if implementation == "blockwise":
    b, t, h, _ = q.shape
    q_chunk, k_chunk = chunk_sizes(b, h, t, k.shape[1])
    return blockwise_attention(
        q, k, v, mask, query_chunk=q_chunk, key_chunk=k_chunk,
        backward_chunks=backward_chunk_sizes(b, h, t, (q_chunk, k_chunk)))
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def _choose(q, k, v, mask) -> str:
  """The implementation `attention` uses for these (traced) arguments on the default backend."""
  if jax.default_backend() == "gpu" and _is_cuda():
    return "cudnn" if cudnn_supports(q, k, v, mask, _compute_capability()) else "xla"
  b, t, h, _ = q.shape
  if chunk_sizes(b, h, t, k.shape[1]) == (t, k.shape[1]):
    return "xla"
  return "blockwise"


def _is_cuda() -> bool:
  return "cuda" in jax.extend.backend.get_backend().platform_version.lower()


def _compute_capability() -> Tuple[int, ...]:
  version = getattr(jax.devices()[0], "compute_capability", "0.0")
  return tuple(int(x) for x in str(version).split("."))


def cudnn_supports(q, k, v, mask, compute_capability: Tuple[int, ...]) -> bool:
  """Whether cuDNN's flash attention (through jax.nn.dot_product_attention) takes these
  arguments: the conditions jax checks before calling cuDNN (fp16/bf16, equal dtypes, head
  dim a multiple of 8 and <= 128, or <= 256 on Hopper and later). With a mask jax adds it as a
  bias, which cuDNN's backward pass refuses for odd sequence lengths (77 context tokens), so
  masked calls stay on XLA (they are the short cross-attention calls)."""
  if mask is not None or not q.dtype == k.dtype == v.dtype:
    return False
  if q.dtype not in (jnp.float16, jnp.bfloat16):
    return False
  head_dim = q.shape[-1]
  return head_dim % 8 == 0 and head_dim <= (256 if compute_capability >= (9, 0) else 128)


def _balanced(length: int, max_chunk: int) -> int:
  """The smallest chunk that splits `length` into as few pieces of at most `max_chunk` as
  possible (so the padding of the last piece is below the number of pieces)."""
  pieces = -(-length // max(1, max_chunk))
  return -(-length // pieces)


def chunk_sizes(batch: int, heads: int, q_len: int, kv_len: int,
                budget: Optional[int] = None) -> Tuple[int, int]:
  """(query chunk, key chunk) for `blockwise_attention`: one block of logits [batch, heads,
  q_chunk, k_chunk] holds at most `budget` elements (`LOGITS_BUDGET`) where possible.
  (q_len, kv_len), i.e. no chunking, when the whole logits tensor fits."""
  budget = LOGITS_BUDGET if budget is None else budget
  rows = batch * heads
  if rows * q_len * kv_len <= budget:
    return q_len, kv_len
  k_chunk = kv_len
  if rows * min(MIN_QUERY_CHUNK, q_len) * kv_len > budget:
    k_chunk = _balanced(kv_len, max(MIN_KEY_CHUNK, budget // (rows * MIN_QUERY_CHUNK)))
  q_chunk = _balanced(q_len, max(1, budget // (rows * k_chunk)))
  return q_chunk, k_chunk


def backward_chunk_sizes(batch: int, heads: int, q_len: int, forward: Tuple[int, int],
                         budget: Optional[int] = None) -> Tuple[int, int]:
  """(query chunk, key chunk) of `blockwise_attention`'s backward pass for the `forward` chunks:
  the forward's key chunk, and as many query rows as keep a block within `budget`
  (`BACKWARD_LOGITS_BUDGET`), at least `MIN_QUERY_CHUNK`, at most the forward's."""
  budget = BACKWARD_LOGITS_BUDGET if budget is None else budget
  q_chunk, k_chunk = forward
  rows = max(MIN_QUERY_CHUNK, budget // (batch * heads * k_chunk))
  if rows >= q_chunk:
    return forward
  return _balanced(q_len, rows), k_chunk


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _chunks(x: jax.Array, axis: int, chunk: int, count: int) -> jax.Array:
  """x padded along `axis` to count * chunk and split there: [count, ..., chunk, ...]."""
  x = _pad_axis(x, axis, chunk * count)
  x = x.reshape(x.shape[:axis] + (count, chunk) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        mask: Optional[jax.Array] = None, *, query_chunk: int,
                        key_chunk: int, backward_chunks: Optional[Tuple[int, int]] = None
                        ) -> jax.Array:
  """`attention` computed `query_chunk` queries at a time (lax.map) and, where `key_chunk` <
  S, `key_chunk` keys at a time with the online softmax (lax.scan). Lengths need not divide
  by the chunks: the last chunk is zero-padded, padded keys get no weight and padded query
  rows are dropped. `backward_chunks` (query, key): the chunks of the gradient's pass, which
  recomputes the forward chunk by chunk anyway (default: the same as the forward's)."""
  _check_shapes(q, k, v, mask)
  forward = (query_chunk, key_chunk)
  if backward_chunks is None or tuple(backward_chunks) == forward:
    return _blockwise(q, k, v, mask, forward)
  return _blockwise_split(q, k, v, mask, forward, tuple(backward_chunks))


# Hand-written gradient only to change the chunking: the backward pass is autodiff of the
# chunked forward at `backward` chunks (the chunks are rematerialised in either case, so
# nothing from the forward's chunks is saved).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise_split(q, k, v, mask, forward, backward):
  del backward
  return _blockwise(q, k, v, mask, forward)


def _blockwise_split_fwd(q, k, v, mask, forward, backward):
  del backward
  return _blockwise(q, k, v, mask, forward), (q, k, v, mask)


def _blockwise_split_bwd(forward, backward, residuals, d_out):
  del forward
  q, k, v, mask = residuals
  dq, dk, dv = jax.vjp(lambda q, k, v: _blockwise(q, k, v, mask, backward), q, k, v)[1](d_out)
  return dq, dk, dv, None


_blockwise_split.defvjp(_blockwise_split_fwd, _blockwise_split_bwd)


def _blockwise(q, k, v, mask, chunks: Tuple[int, int]) -> jax.Array:
  query_chunk, key_chunk = chunks
  b, t, h, d = q.shape
  s = k.shape[1]
  query_chunk, key_chunk = min(query_chunk, t), min(key_chunk, s)
  n_q, n_k = -(-t // query_chunk), -(-s // key_chunk)
  scale = 1.0 / math.sqrt(d)
  # [B, T, heads, D] -> [B, heads, T, D]: each block is then one batched matmul.
  qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  if n_k > 1:
    kh, vh = (_chunks(x, 2, key_chunk, n_k) for x in (kh, vh))  # [n_k, B, heads, Ck, D]
  if mask is not None:  # padded like q (rows) and k (keys) where it varies along them
    if mask.shape[2] == t:
      mask = _pad_axis(mask, 2, n_q * query_chunk)
    if mask.shape[3] == s:
      mask = _pad_axis(mask, 3, n_k * key_chunk)
  mask_by_query = mask is not None and mask.shape[2] > 1 and n_q > 1
  mask_by_key = mask is not None and mask.shape[3] > 1 and n_k > 1

  def logits_of(q_blk, k_blk, mask_blk, first_key):
    logits = jnp.einsum("bhtd,bhsd->bhts", q_blk, k_blk, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * jnp.float32(scale)
    if mask_blk is not None:
      logits = jnp.where(mask_blk, logits, _MASKED)
    if n_k * key_chunk > s:  # the last key chunk has padding keys
      key_index = first_key + jnp.arange(key_chunk)
      logits = jnp.where(key_index < s, logits, _PADDING)
    return logits

  def all_keys(q_blk, mask_blk):  # one key block: the XLA path's softmax
    probs = jax.nn.softmax(logits_of(q_blk, kh, mask_blk, 0), axis=-1)
    return jnp.einsum("bhts,bhsd->bhtd", probs.astype(v.dtype), vh)

  def key_chunks(q_blk, mask_blk):  # online softmax over the key chunks
    def step(carry, xs):
      top, total, acc = carry
      k_blk, v_blk, index = xs
      m_blk = mask_blk
      if mask_by_key:
        m_blk = jax.lax.dynamic_slice_in_dim(mask_blk, index * key_chunk, key_chunk, axis=3)
      logits = logits_of(q_blk, k_blk, m_blk, index * key_chunk)
      # The output does not depend on the running max (it cancels out), so no gradient
      # flows through it.
      new_top = jax.lax.stop_gradient(jnp.maximum(top, logits.max(-1, keepdims=True)))
      rescale = jnp.exp(top - new_top)
      p = jnp.exp(logits - new_top)
      total = total * rescale + p.sum(-1, keepdims=True)
      acc = acc * rescale + jnp.einsum("bhts,bhsd->bhtd", p.astype(v.dtype), v_blk,
                                       preferred_element_type=jnp.float32)
      return (new_top, total, acc), None

    rows = q_blk.shape[:3] + (1,)
    init = (jnp.full(rows, _PADDING, jnp.float32), jnp.zeros(rows, jnp.float32),
            jnp.zeros(q_blk.shape, jnp.float32))
    (_, total, acc), _ = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), init,
                                      (kh, vh, jnp.arange(n_k)))
    return (acc / total).astype(v.dtype)

  block = all_keys if n_k == 1 else key_chunks
  if n_q == 1:
    return jnp.swapaxes(block(qh, mask), 1, 2)

  def query_chunk_out(xs):
    return block(xs[0], xs[1] if mask_by_query else mask)

  xs = (_chunks(qh, 2, query_chunk, n_q),
        _chunks(mask, 2, query_chunk, n_q) if mask_by_query else None)
  out = jax.lax.map(jax.checkpoint(query_chunk_out, prevent_cse=False), xs)  # [n_q, B, h, Cq, D]
  out = jnp.moveaxis(out, 0, 2).reshape(b, h, n_q * query_chunk, d)[:, :, :t]
  return jnp.swapaxes(out, 1, 2)


def _check_shapes(q, k, v, mask) -> None:
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[0] != k.shape[0] or \
      q.shape[2:] != k.shape[2:]:
    raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} are not "
                     "[B, T, heads, D], [B, S, heads, D], [B, S, heads, D]")
  if mask is not None and (mask.ndim != 4 or mask.dtype != jnp.bool_):
    raise ValueError(f"attention: mask must be boolean [B, heads, T, S] (broadcastable), got "
                     f"{mask.dtype} {mask.shape}")
