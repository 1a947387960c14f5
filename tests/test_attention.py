"""The memory-efficient attention path (ldm_jax.models.attention) against the plain softmax
attention (XLA's jax.nn.dot_product_attention): outputs and gradients at 1e-5 in float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import attention as attn_lib
from ldm_jax.models import layers

TOL = dict(rtol=1e-5, atol=1e-5)


def _qkv(b, t, s, h, d, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=shape), dtype)
               for shape in ((b, t, h, d), (b, s, h, d), (b, s, h, d)))


def _plain(q, k, v, mask=None):
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def _loss(fn, mask):  # a non-linear read-out so that every output element has its own cotangent
  return lambda q, k, v: jnp.sum(jnp.sin(3.0 * fn(q, k, v, mask)))


# (b, t, s, heads, head_dim, query_chunk, key_chunk, mask): lengths not divisible by the chunks.
CASES = {
    "self, query chunks": (2, 37, 37, 3, 8, 8, 37, None),
    "self, query and key chunks": (2, 37, 37, 3, 8, 10, 16, None),
    "cross, key mask, query chunks": (2, 29, 11, 2, 8, 8, 11, "key"),
    "cross, key mask, query and key chunks": (2, 29, 11, 2, 8, 8, 4, "key"),
    "cross, key mask, key chunks only": (2, 6, 41, 2, 8, 64, 8, "key"),
    "self, per-query mask, query and key chunks": (1, 23, 23, 2, 4, 5, 6, "causal"),
}


def _mask(kind, b, t, s):
  if kind == "key":  # as CrossAttention passes it; batch 0 has no visible key at all
    keep = np.random.default_rng(1).random((b, s)) > 0.4
    keep[0] = False
    return jnp.asarray(keep)[:, None, None, :]
  if kind == "causal":
    return jnp.asarray(np.tril(np.ones((t, s), bool)))[None, None]
  return None


@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_matches_plain_attention_and_gradients(case):
  b, t, s, h, d, q_chunk, k_chunk, kind = CASES[case]
  q, k, v = _qkv(b, t, s, h, d)
  mask = _mask(kind, b, t, s)

  def blockwise(q, k, v, mask):
    return attn_lib.blockwise_attention(q, k, v, mask, query_chunk=q_chunk, key_chunk=k_chunk)

  def both(q, k, v):
    outs = [f(q, k, v, mask) for f in (blockwise, _plain)]
    grads = [jax.grad(_loss(f, mask), argnums=(0, 1, 2))(q, k, v) for f in (blockwise, _plain)]
    return outs, grads

  (out, ref), (grad, grad_ref) = jax.jit(both)(q, k, v)
  assert out.shape == (b, t, h, d)
  np.testing.assert_allclose(out, ref, **TOL)
  for g, g_ref in zip(grad, grad_ref):
    np.testing.assert_allclose(g, g_ref, **TOL)
  assert float(jnp.abs(grad[1]).max()) > 1e-3  # gradients are not trivially zero


# (forward chunks, backward chunks): the gradient's pass chunks differently from the forward.
SPLIT_CASES = {
    "smaller query chunks backward, key mask": ("key", (16, 11), (5, 11)),
    "keys chunked only backward, per-query mask": ("causal", (29, 29), (8, 6)),
    "larger chunks backward": (None, (4, 8), (29, 29)),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_blockwise_gradient_with_its_own_chunks_matches_plain_path(case):
  kind, forward, backward = SPLIT_CASES[case]
  b, t, s, h, d = 2, 29, 11 if kind == "key" else 29, 2, 8
  q, k, v = _qkv(b, t, s, h, d, seed=7)
  mask = _mask(kind, b, t, s)

  def split(q, k, v, mask):
    return attn_lib.blockwise_attention(q, k, v, mask, query_chunk=forward[0],
                                        key_chunk=forward[1], backward_chunks=backward)

  def both(q, k, v):
    return ([f(q, k, v, mask) for f in (split, _plain)],
            [jax.grad(_loss(f, mask), argnums=(0, 1, 2))(q, k, v) for f in (split, _plain)])

  (out, ref), (grad, grad_ref) = jax.jit(both)(q, k, v)
  np.testing.assert_allclose(out, ref, **TOL)
  for g, g_ref in zip(grad, grad_ref):
    np.testing.assert_allclose(g, g_ref, **TOL)
  assert float(jnp.abs(grad[0]).max()) > 1e-3
  # The gradient's program computes logits blocks of the backward's chunks.
  jaxpr = str(jax.make_jaxpr(jax.grad(_loss(split, mask)))(q, k, v))
  assert f"f32[{b},{h},{backward[0]},{backward[1]}]" in jaxpr


def test_blockwise_bfloat16_matches_plain_path():
  q, k, v = _qkv(2, 33, 33, 2, 8, dtype=jnp.bfloat16)
  out = attn_lib.blockwise_attention(q, k, v, query_chunk=8, key_chunk=16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(_plain(q, k, v), np.float32), atol=2e-2)


def test_chunk_sizes_keep_each_block_within_the_budget():
  assert attn_lib.chunk_sizes(2, 8, 64, 77, budget=2 ** 20) == (64, 77)  # fits: no chunking
  for b, h, t, s in [(2, 8, 4096, 4096), (2, 8, 4096, 77), (16, 8, 9216, 9216),
                     (4, 1, 4097, 4097), (1, 1, 1001, 3)]:
    q_chunk, k_chunk = attn_lib.chunk_sizes(b, h, t, s, budget=2 ** 20)
    assert b * h * q_chunk * k_chunk <= 2 ** 20 or q_chunk == 1
    assert 1 <= q_chunk <= t and 1 <= k_chunk <= s
    # The chunks split the lengths evenly: the last chunk's padding is below the chunk count.
    for length, chunk in ((t, q_chunk), (s, k_chunk)):
      pieces = -(-length // chunk)
      assert pieces * chunk - length < pieces
  # SD size (2 x 8 heads, 4096 tokens) chunks only the queries at the default budget; 9216
  # tokens at batch 16 chunk the keys too.
  assert attn_lib.chunk_sizes(2, 8, 4096, 4096) == (64, 4096)
  q_chunk, k_chunk = attn_lib.chunk_sizes(16, 8, 9216, 9216)
  assert k_chunk < 9216 and q_chunk >= attn_lib.MIN_QUERY_CHUNK


def test_backward_chunks_have_fewer_query_rows_never_fewer_keys():
  budget, floor = attn_lib.BACKWARD_LOGITS_BUDGET, attn_lib.MIN_QUERY_CHUNK
  # The UNet's 16x16 attention in the train step: 64 query rows instead of the forward's 128.
  forward = attn_lib.chunk_sizes(32, 4, 256, 256)
  assert forward == (128, 256)
  assert attn_lib.backward_chunk_sizes(32, 4, 256, forward) == (64, 256)
  # SD size: the forward's 4096 keys stay whole and its 64 query rows are the floor already.
  forward = attn_lib.chunk_sizes(2, 8, 4096, 4096)
  assert attn_lib.backward_chunk_sizes(2, 8, 4096, forward) == forward == (64, 4096)
  # A block within the budget already: the forward's chunks.
  assert attn_lib.backward_chunk_sizes(2, 2, 100, (50, 100)) == (50, 100)
  for b, h, t, s in [(32, 4, 256, 256), (3, 5, 1000, 777), (1, 1, 4097, 4097)]:
    q_chunk, k_chunk = attn_lib.backward_chunk_sizes(b, h, t, attn_lib.chunk_sizes(b, h, t, s))
    assert q_chunk >= min(floor, t) and (b * h * q_chunk * k_chunk <= budget or
                                         q_chunk <= -(-t // -(-t // floor)))
    pieces = -(-t // q_chunk)
    assert pieces * q_chunk - t < pieces  # balanced: little padding


def test_attention_chunks_on_cpu_when_the_logits_are_large(monkeypatch):
  q, k, v = _qkv(2, 40, 40, 2, 8, seed=3)
  mask = jnp.asarray(np.random.default_rng(4).random((2, 40)) > 0.3)[:, None, None, :]
  fn = lambda q, k, v: attn_lib.attention(q, k, v, mask)  # noqa: E731
  assert "scan" not in str(jax.make_jaxpr(fn)(q, k, v))  # small: the plain XLA path
  plain = jax.jit(fn)(q, k, v)
  monkeypatch.setattr(attn_lib, "LOGITS_BUDGET", 2 * 2 * 16 * 40)  # 16 query rows at a time
  jax.clear_caches()  # traces made with the old budget must not be reused
  assert attn_lib.chunk_sizes(2, 2, 40, 40) == (14, 40)
  assert "scan" in str(jax.make_jaxpr(fn)(q, k, v))  # lax.map over 3 query chunks
  np.testing.assert_allclose(jax.jit(fn)(q, k, v), plain, **TOL)
  # The gradient's pass gets the chunks of the backward budget.
  seen = []
  real = attn_lib.blockwise_attention
  monkeypatch.setattr(attn_lib, "BACKWARD_LOGITS_BUDGET", 2 * 2 * 8 * 40)
  monkeypatch.setattr(attn_lib, "MIN_QUERY_CHUNK", 4)
  monkeypatch.setattr(attn_lib, "blockwise_attention",
                      lambda *a, **kw: seen.append(kw) or real(*a, **kw))
  jax.clear_caches()
  grad = jax.jit(jax.grad(lambda q: jnp.sum(fn(q, k, v) ** 2)))(q)
  assert seen[-1]["backward_chunks"] == (8, 40) and seen[-1]["query_chunk"] == 14
  monkeypatch.setattr(attn_lib, "blockwise_attention", real)
  ref = jax.grad(lambda q: jnp.sum(_plain(q, k, v, mask) ** 2))(q)
  np.testing.assert_allclose(grad, ref, **TOL)


def test_layers_keep_their_parameters_and_outputs_when_chunked(monkeypatch):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 16)), jnp.float32)  # 35 positions
  ctx = jnp.asarray(rng.normal(size=(2, 9, 12)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 9)) > 0.3)
  self_attn = layers.SpatialSelfAttention(num_heads=2, num_groups=4)
  cross = layers.CrossAttention(num_heads=2, head_dim=4)
  seq = x.reshape(2, 35, 16)
  p_self = self_attn.init(jax.random.key(0), x)
  p_cross = cross.init(jax.random.key(1), seq, ctx, mask)
  shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)  # noqa: E731
  assert shapes(p_self["params"]) == {
      "norm": {"scale": (16,), "bias": (16,)}, "qkv": {"kernel": (16, 48), "bias": (48,)},
      "proj_out": {"kernel": (16, 16), "bias": (16,)}}
  assert shapes(p_cross["params"]) == {
      "to_q": {"kernel": (16, 8)}, "to_k": {"kernel": (12, 8)}, "to_v": {"kernel": (12, 8)},
      "to_out": {"kernel": (8, 16), "bias": (16,)}}

  def run():
    return (jax.jit(self_attn.apply)(p_self, x),
            jax.jit(cross.apply)(p_cross, seq, ctx, mask))

  plain = run()
  monkeypatch.setattr(attn_lib, "LOGITS_BUDGET", 2 * 2 * 8 * 9)  # 8 query rows per chunk
  jax.clear_caches()
  assert "scan" in str(jax.make_jaxpr(self_attn.apply)(p_self, x))
  assert "scan" in str(jax.make_jaxpr(cross.apply)(p_cross, seq, ctx, mask))
  for chunked, ref in zip(run(), plain):
    np.testing.assert_allclose(chunked, ref, **TOL)


def test_cudnn_is_chosen_only_for_shapes_it_takes():
  def arrays(dtype, d, t=4096, s=4096):
    return (jax.ShapeDtypeStruct((2, t, 8, d), dtype), jax.ShapeDtypeStruct((2, s, 8, d), dtype),
            jax.ShapeDtypeStruct((2, s, 8, d), dtype))

  hopper, ampere = (9, 0), (8, 0)
  assert attn_lib.cudnn_supports(*arrays(jnp.bfloat16, 40), None, ampere)  # SD 1.x, 320 ch
  assert attn_lib.cudnn_supports(*arrays(jnp.float16, 160, s=77), None, hopper)
  assert not attn_lib.cudnn_supports(*arrays(jnp.float16, 160, s=77), None, ampere)
  assert not attn_lib.cudnn_supports(*arrays(jnp.float32, 40), None, hopper)
  assert not attn_lib.cudnn_supports(*arrays(jnp.bfloat16, 36), None, hopper)
  mask = jax.ShapeDtypeStruct((2, 1, 1, 4096), jnp.bool_)
  assert not attn_lib.cudnn_supports(*arrays(jnp.bfloat16, 40), mask, hopper)


def test_bad_arguments_raise():
  q, k, v = _qkv(1, 4, 4, 2, 8)
  with pytest.raises(ValueError, match="implementation 'flash'"):
    attn_lib.attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="not"):
    attn_lib.attention(q, k[:, :, :1], v, implementation="blockwise")
  with pytest.raises(ValueError, match="mask must be boolean"):
    attn_lib.attention(q, k, v, jnp.ones((1, 4)), implementation="blockwise")
