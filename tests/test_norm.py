"""The fused GroupNorm (ldm_jax/models/norm.py) against Flax's nn.GroupNorm + SiLU, by autodiff."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import layers, norm


def _reference(x, scale, bias, mul, add, groups, eps, silu):
  y = nn.GroupNorm(num_groups=groups, epsilon=eps).apply(
      {"params": {"scale": scale, "bias": bias}}, x)
  shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
  if mul is not None:
    y = y * mul.reshape(shape) + add.reshape(shape)
  return nn.silu(y) if silu else y


@pytest.mark.parametrize("shape,groups,affine,silu", [
    ((3, 5, 7, 12), 4, True, True),    # NHWC, scale-shift conditioning, SiLU (ADM ResBlock)
    ((2, 6, 6, 64), 32, False, True),  # GroupNorm + SiLU (plain ResBlock)
    ((2, 16, 24), 8, False, False),    # [N, L, C], no activation (attention norm)
    ((4, 3, 3, 8), 1, True, False),    # one group (LayerNorm-like)
])
def test_values_and_gradients_match_flax(shape, groups, affine, silu):
  k = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(k[0], shape) * 3 + 1.5  # an offset mean tests the centring
  scale = jax.random.normal(k[1], shape[-1:])
  bias = jax.random.normal(k[2], shape[-1:])
  mul = jax.random.normal(k[3], (shape[0], shape[-1])) if affine else None
  add = jax.random.normal(k[4], (shape[0], shape[-1])) if affine else None
  g = jax.random.normal(k[5], shape)
  args = (x, scale, bias) + ((mul, add) if affine else ())

  def ref(x, scale, bias, *ma):
    return _reference(x, scale, bias, *(ma or (None, None)), groups, 1e-5, silu)

  def ours(x, scale, bias, *ma):
    m, a = ma or (None, None)
    return norm.group_norm(x, scale, bias, groups=groups, eps=1e-5, mul=m, add=a, silu=silu)

  want, want_vjp = jax.vjp(ref, *args)
  got, got_vjp = jax.vjp(jax.jit(ours), *args)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  for a, b in zip(got_vjp(g), want_vjp(g)):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))), rtol=1e-4)


def test_module_keeps_flax_parameters_and_computes_in_dtype():
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 32))
  ours = layers.group_norm_layer(32, 8, dtype=jnp.bfloat16)
  params = ours.init(jax.random.key(2), x)["params"]
  flax_params = nn.GroupNorm(num_groups=8).init(jax.random.key(2), x)["params"]
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_params)
  out = ours.apply({"params": params}, x.astype(jnp.bfloat16), silu=True)
  assert out.dtype == jnp.bfloat16
  want = nn.silu(nn.GroupNorm(num_groups=8, epsilon=1e-6).apply({"params": params}, x))
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=0.05)
  grad = jax.grad(lambda p: jnp.sum(ours.apply({"params": p}, x.astype(jnp.bfloat16))
                                    .astype(jnp.float32)))(params)
  assert grad["scale"].dtype == jnp.float32 and np.isfinite(np.asarray(grad["bias"])).all()


def test_channels_must_split_into_groups():
  with pytest.raises(ValueError, match="12 channels do not split into 5 groups"):
    norm.group_norm(jnp.ones((1, 2, 2, 12)), jnp.ones(12), jnp.zeros(12), groups=5, eps=1e-5)
