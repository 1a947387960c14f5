"""`layers.window_matmul_conv`, the CPU path for convolutions of images no larger than the
kernel window: equal to XLA's convolution (values and gradients, float32, <= 1e-5), chosen only
for such shapes, and invisible in the parameter tree (checkpoints and converters unchanged)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import layers
from ldm_jax.models.unet import UNet

TOL = 1e-5
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _lax_conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _rel(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.mark.parametrize("size,kernel,stride,pad", [
    (2, 3, 1, (1, 1)),   # the default UNet's deepest level
    (3, 3, 1, (1, 1)),
    (1, 3, 1, (1, 1)),
    (2, 3, 2, (0, 1)),   # the autoencoder's downsampling padding
    (2, 3, 2, (1, 1)),   # the UNet's
    (3, 3, 1, (0, 0)),
    (1, 1, 1, (0, 0)),
])
def test_window_matmul_equals_convolution(size, kernel, stride, pad):
  rng = np.random.default_rng(size * 100 + kernel * 10 + stride)
  x = jnp.asarray(rng.normal(size=(3, size, size, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 4)), jnp.float32)
  strides, padding = (stride, stride), (pad, pad)
  cot = jnp.asarray(rng.normal(size=_lax_conv(x, w, strides, padding).shape), jnp.float32)

  @_jit
  def both(x, w):  # (output, d/dx, d/dw) of each implementation, in one program
    def run(f):
      out, vjp = jax.vjp(lambda x, w: f(x, w, strides, padding), x, w)
      return (out,) + vjp(cot)
    return run(layers.window_matmul_conv), run(_lax_conv)

  ours, ref = both(x, w)
  assert ours[0].shape == ref[0].shape
  for got, want in zip(ours, ref):
    assert _rel(got, want) <= TOL


def test_chosen_only_for_images_within_the_kernel_window():
  pad, dil = ((1, 1), (1, 1)), (1, 1)
  w3 = jnp.zeros((3, 3, 4, 4))
  pick = lambda shape, w=w3, **kw: layers._use_window_matmul(  # noqa: E731
      jnp.zeros(shape), w, kw.get("padding", pad), dil, dil, kw.get("groups", 1))
  assert jax.default_backend() == "cpu"
  assert pick((2, 2, 2, 4)) and pick((2, 3, 3, 4)) and pick((2, 1, 1, 4))
  assert not pick((2, 4, 4, 4)) and not pick((2, 8, 8, 4))
  assert not pick((2, 2, 2, 4), w=jnp.zeros((1, 1, 4, 4)))  # a 1x1 kernel at 2x2
  assert not pick((2, 2, 2, 4), padding="SAME") and not pick((2, 2, 2, 4), groups=2)


def test_conv_module_parameters_unchanged():
  """layers.conv keeps nn.Conv's tree and initial values, and its output at 2x2 and 8x8."""
  x2, x8 = jnp.ones((2, 2, 2, 6)), jnp.ones((2, 8, 8, 6))
  ours = layers.conv(5, 3)
  plain = nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)))
  p_ours, p_plain = _jit(lambda k: (ours.init(k, x2), plain.init(k, x2)))(jax.random.key(1))
  assert jax.tree.structure(p_ours) == jax.tree.structure(p_plain)
  jax.tree.map(np.testing.assert_array_equal, p_ours, p_plain)
  outs = _jit(lambda p, q: [(ours.apply(p, x), plain.apply(q, x)) for x in (x2, x8)])(
      p_ours, p_plain)
  for got, want in outs:
    assert _rel(got, want) <= TOL


def test_unet_with_a_2x2_level_matches_the_plain_convolution(monkeypatch):
  """A class-conditional UNet whose deepest level is 2x2 (as the default preset's at 8x8)."""
  unet = UNet(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
              num_head_channels=8, num_groups=4, num_classes=3, scale_shift_norm=True)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 4, 4, 4)), jnp.float32)
  t, labels = jnp.array([3, 700]), jnp.array([0, 3])

  # Every leaf random (numpy: no threefry program to compile), so all layers shape the output.
  shapes = jax.eval_shape(unet.init, jax.random.key(0), x, t, labels=labels)["params"]
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32),
                        shapes)

  def run():  # a new function each time: jit and make_jaxpr cache traces by function
    apply = lambda p: unet.apply({"params": p}, x, t, labels=labels)  # noqa: E731
    return _jit(apply)(params), str(jax.make_jaxpr(apply)(params)).count("conv_general_dilated")

  fast, convs_fast = run()
  monkeypatch.setattr(layers, "_use_window_matmul", lambda *a: False)
  plain, convs_plain = run()
  assert convs_plain - convs_fast == 10  # the 2x2 level's 3x3 convolutions became matmuls
  assert _rel(fast, plain) <= TOL
