"""The diffusion UNet: shapes per config, zero init, conditioning paths, masking, remat, dtypes.

Compile time dominates on CPU, so: parameters for behaviour tests are random host arrays in
the shapes `jax.eval_shape(model.init)` gives (a real init compiles ~60 threefry /
truncated-normal initialisers, ~6-30 s), only the zero-init test runs a real init, and
everything is jitted without XLA backend optimisation (same results, a fraction of the
compile time at this size).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.errors import UserError
from ldm_jax.models import layers
from ldm_jax.models.unet import UNet

TINY = dict(model_channels=8, out_channels=3, num_res_blocks=1, channel_mult=(1, 2),
            attention_levels=(1,), num_heads=2, num_groups=4)
ONE_LEVEL = {**TINY, "channel_mult": (1,), "attention_levels": (0,)}  # smallest graph
CTX = 6  # context width of the cross-attention tests
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _x(batch=2, channels=3, size=8, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, channels)),
                     jnp.float32)


def _abstract(model, *args, **kwargs):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))


def _random_params(model, *args, seed=1, **kwargs):
  """Random non-zero parameters (so zero-initialised layers do not hide any path)."""
  rng = np.random.default_rng(seed)

  def fill(path, p):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      value = 1.0 + 0.1 * rng.normal(size=p.shape)
    elif "bias" in name:
      value = 0.1 * rng.normal(size=p.shape)
    else:
      value = rng.normal(size=p.shape) / np.sqrt(np.prod(p.shape[:-1]))
    return jnp.asarray(value, p.dtype)

  return jax.tree_util.tree_map_with_path(fill, _abstract(model, *args, **kwargs))


def _n_params(tree):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))


def test_timestep_embedding_matches_ldm_formula():
  t = np.array([0.0, 3.0, 999.0], np.float32)
  freqs = np.exp(-np.log(10000.0) * np.arange(3) / 3)
  args = t[:, None] * freqs
  emb = layers.timestep_embedding(t, 6)
  np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], 1), atol=1e-4)
  flipped = layers.timestep_embedding(t, 6, flip_sin_to_cos=False)
  np.testing.assert_allclose(flipped, np.concatenate([np.sin(args), np.cos(args)], 1), atol=1e-4)
  odd = layers.timestep_embedding(t, 7)
  assert odd.shape == (3, 7) and np.all(np.asarray(odd[:, -1]) == 0)


def test_cross_attention_matches_reference_softmax():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32)
  ctx = rng.normal(size=(2, 4, 5)).astype(np.float32)
  mask = np.array([[1, 1, 0, 1], [1, 0, 0, 0]], bool)
  attn = layers.CrossAttention(num_heads=2, head_dim=3)
  params = attn.init(jax.random.key(0), x, ctx, mask)
  out = attn.apply(params, x, ctx, mask)
  p = jax.tree.map(np.asarray, params["params"])
  heads = lambda a: a.reshape(a.shape[:2] + (2, 3))  # noqa: E731
  q = heads(x @ p["to_q"]["kernel"])
  k, v = heads(ctx @ p["to_k"]["kernel"]), heads(ctx @ p["to_v"]["kernel"])
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(3.0)
  logits = np.where(mask[:, None, None, :], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  ref = np.einsum("bhts,bshd->bthd", weights, v).reshape(2, 3, 6)
  ref = ref @ p["to_out"]["kernel"] + p["to_out"]["bias"]
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  assert "bias" not in p["to_q"]  # q/k/v without bias, as in LDM


def test_fresh_unet_outputs_zero():
  model = UNet(**ONE_LEVEL, use_transformer=True, context_dim=CTX, num_classes=3)
  x, t = _x(), jnp.array([1, 500])
  kw = dict(labels=jnp.array([0, 3]), context=jnp.ones((2, 4, CTX)))

  def init_and_apply(x, t):
    params = model.init(jax.random.key(0), x, t, **kw)
    return params, model.apply(params, x, t, **kw)

  params, out = _jit(init_and_apply)(x, t)
  assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # zero-initialised conv_out
  p = params["params"]
  np.testing.assert_array_equal(p["conv_out"]["kernel"], 0.0)
  np.testing.assert_array_equal(p["down0_attn0"]["proj_out"]["kernel"], 0.0)
  assert float(jnp.abs(p["down0_res0"]["conv2"]["kernel"]).max()) > 0  # not zeroed: see unet.py


CONFIGS = {
    "class_conditional_head_channels_scale_shift": (
        dict(num_classes=5, num_head_channels=4, scale_shift_norm=True),
        dict(labels=jnp.array([0, 5]))),
    "cross_attention_mask_depth2": (
        dict(use_transformer=True, context_dim=CTX, transformer_depth=2),
        dict(context=jnp.ones((2, 4, CTX)), context_mask=jnp.array([[1, 1, 0, 0], [1] * 4], bool))),
    "transformer_without_context_no_conv_resample_3_levels": (
        dict(use_transformer=True, channel_mult=(1, 1, 2), attention_levels=(0, 2),
             conv_resample=False), {}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_shape(name):
  fields, kwargs = CONFIGS[name]
  model = UNet(**{**TINY, **fields})
  x = _x(channels=5)  # concat conditioning: input channels need not equal out_channels
  t = jnp.array([1, 500])
  params = _random_params(model, x, t, **kwargs)
  out = _jit(lambda p, x, t: model.apply(p, x, t, **kwargs))(params, x, t)
  assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and float(jnp.abs(out).max()) > 0


def test_label_embedding_is_connected_and_null_label_is_last_row():
  model = UNet(**TINY, num_classes=4)
  x, t = _x(), jnp.array([10, 10])
  params = _random_params(model, x, t, labels=jnp.array([0, 1]))
  table = params["params"]["label_emb"]["embedding"]
  assert table.shape == (5, 32) and model.null_label == 4

  @_jit
  def out_and_grad(table, labels):
    def out_sum(table):
      p = {"params": {**params["params"], "label_emb": {"embedding": table}}}
      out = model.apply(p, x, t, labels=labels)
      return out.sum(), out
    return jax.grad(out_sum, has_aux=True)(table)

  grad, a = out_and_grad(table, jnp.array([1, 4]))
  assert float(jnp.abs(grad[1]).sum()) > 0 and float(jnp.abs(grad[4]).sum()) > 0
  assert float(jnp.abs(grad[0]).sum()) == 0  # unused rows get no gradient
  _, b = out_and_grad(table, jnp.array([2, 4]))
  assert float(jnp.abs(a[0] - b[0]).max()) > 1e-3  # the label changes the output
  np.testing.assert_allclose(a[1], b[1], atol=1e-5)
  # labels=None means the null label for the whole batch.
  none = _jit(lambda p: model.apply(p, x, t))(params)
  np.testing.assert_allclose(none[1], a[1], atol=1e-5)


def test_cross_attention_ignores_masked_context_tokens():
  model = UNet(**{**TINY, "attention_levels": (0, 1)}, use_transformer=True, context_dim=CTX)
  x, t = _x(), jnp.array([3, 7])
  ctx = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, CTX)), jnp.float32)
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
  params = _random_params(model, x, t, context=ctx, context_mask=mask)
  apply = _jit(lambda c, m: model.apply(params, x, t, context=c, context_mask=m))
  base = apply(ctx, mask)
  np.testing.assert_allclose(apply(ctx.at[:, 3].set(100.0), mask), base, atol=1e-6)
  assert float(jnp.abs(apply(ctx.at[:, 0].set(100.0), mask) - base).max()) > 1e-3
  # With every token kept, the same change reaches the output.
  all_kept = jnp.ones_like(mask)
  moved = apply(ctx.at[:, 3].set(100.0), all_kept) - apply(ctx, all_kept)
  assert float(jnp.abs(moved).max()) > 1e-3


def test_remat_matches_plain_outputs_and_gradients():
  fields = dict(**ONE_LEVEL, use_transformer=True, context_dim=CTX, dropout=0.3, num_classes=3)
  plain, remat = UNet(**fields), UNet(**fields, remat=True)
  x, t = _x(), jnp.array([5, 900])
  kw = dict(labels=jnp.array([0, 3]), context=jnp.ones((2, 3, CTX)))
  params = _random_params(plain, x, t, **kw)
  shapes = lambda tree: jax.tree.map(lambda p: p.shape, tree)  # noqa: E731
  assert shapes(_abstract(remat, x, t, **kw)) == shapes(params)  # same parameter tree
  rngs = {"dropout": jax.random.key(4)}

  def loss(p, model):
    return jnp.mean(model.apply(p, x, t, train=True, rngs=rngs, **kw) ** 2)

  assert "remat" in str(jax.make_jaxpr(lambda p: loss(p, remat))(params))
  (l1, g1), (l2, g2) = (_jit(jax.value_and_grad(loss), static_argnums=1)(params, m)
                        for m in (plain, remat))
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


def test_bfloat16_compute_keeps_float32_params_and_output():
  fields = dict(**ONE_LEVEL, use_transformer=True, context_dim=CTX, num_classes=2)
  model = UNet(**fields, dtype=jnp.bfloat16)
  x, t = _x(), jnp.array([1, 2])
  kw = dict(labels=jnp.array([0, 1]), context=jnp.ones((2, 3, CTX)))
  assert {p.dtype for p in jax.tree.leaves(_abstract(model, x, t, **kw))} == {
      jnp.dtype(jnp.float32)}
  params = _random_params(model, x, t, **kw)
  assert "bf16" in str(jax.make_jaxpr(lambda p: model.apply(p, x, t, **kw))(params))
  out, ref = _jit(lambda p: (model.apply(p, x, t, **kw),
                             UNet(**fields).apply(p, x, t, **kw)))(params)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  assert float(jnp.abs(out - ref).max()) < 0.1 * float(jnp.abs(ref).max()) + 0.05


def test_invalid_configurations_raise():
  x, t = _x(), jnp.array([0, 0])
  with pytest.raises(UserError, match="use_transformer"):
    _abstract(UNet(**TINY, context_dim=4), x, t, context=jnp.ones((2, 1, 4)))
  with pytest.raises(UserError, match="num_classes"):
    _abstract(UNet(**TINY), x, t, labels=jnp.array([0, 1]))
  with pytest.raises(UserError, match="context"):
    _abstract(UNet(**TINY, use_transformer=True, context_dim=4), x, t)
  with pytest.raises(UserError, match="divisible"):
    _abstract(UNet(**TINY), _x(size=7), t)
  with pytest.raises(UserError, match="heads"):
    _abstract(UNet(**{**TINY, "num_heads": 3}), x, t)


# (name, fields, context width or None, expected parameter count range)
LARGE = [
    # The brief's LDM-4 class-conditional UNet: self-attention at /2 and /4, label embedding.
    ("ldm4_cin_selfattn", dict(model_channels=256, channel_mult=(1, 2, 4), attention_levels=(1, 2),
                               num_head_channels=32, num_classes=1000), None, (250e6, 265e6)),
    # LDM's released cin256 config (models/ldm/cin256): transformers at /1, /2, /4 with the
    # class embedding as 512-d context; the paper's "LDM-4 cin, 400M" (plus its 0.5M embedder).
    ("ldm4_cin_crossattn", dict(model_channels=256, channel_mult=(1, 2, 4),
                                attention_levels=(0, 1, 2), num_head_channels=32,
                                use_transformer=True, context_dim=512), 512, (390e6, 400e6)),
    # Stable-Diffusion-v1-like LDM-8: exactly SD v1's 859,520,964 UNet parameters.
    ("ldm8_sd_768", dict(model_channels=320, channel_mult=(1, 2, 4, 4), attention_levels=(0, 1, 2),
                         num_heads=8, use_transformer=True, context_dim=768), 768,
     (859_520_964, 859_520_964)),
    # LDM-KL-8-G text-to-image UNet (txt2img-1p4B config, BERT context width 1280).
    ("ldm8_txt_1280", dict(model_channels=320, channel_mult=(1, 2, 4, 4),
                           attention_levels=(0, 1, 2), num_heads=8, use_transformer=True,
                           context_dim=1280), 1280,
     (860e6, 880e6)),
]


@pytest.mark.parametrize("name,fields,ctx,bounds", LARGE, ids=[c[0] for c in LARGE])
def test_accelerator_size_configs_build_abstractly(name, fields, ctx, bounds):
  model = UNet(out_channels=4, num_res_blocks=2, remat=True, dtype=jnp.bfloat16, **fields)
  x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
  context = None if ctx is None else jax.ShapeDtypeStruct((1, 77, ctx), jnp.float32)
  labels = jnp.zeros((1,), jnp.int32) if fields.get("num_classes") else None

  def init(x, context):
    return model.init(jax.random.key(0), x, jnp.zeros((1,)), labels=labels, context=context)

  n = _n_params(jax.eval_shape(init, x, context))
  print(f"{name}: {n:,} parameters")
  assert bounds[0] <= n <= bounds[1]
