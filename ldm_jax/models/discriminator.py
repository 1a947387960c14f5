"""PatchGAN discriminator (Isola et al. 2017), as used by LDM's `LPIPSWithDiscriminator`."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models import layers

_conv_init = nn.initializers.normal(0.02)


class PatchDiscriminator(nn.Module):
  """n_layers stride-2 4x4 convs, then two stride-1 ones: one logit per receptive-field patch.

  norm: 'batch' (LDM's choice; statistics of the current batch, the discriminator is only
  ever run in training), 'group' or 'none'.
  """
  ndf: int = 64
  n_layers: int = 3
  norm: str = "batch"
  dtype: Any = jnp.float32

  def _norm(self, h, name):
    if self.norm == "batch":
      return nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                          scale_init=lambda k, s, d=jnp.float32: 1.0 + 0.02 *
                          nn.initializers.normal(1.0)(k, s, d), dtype=self.dtype, name=name)(h)
    if self.norm == "group":
      return layers.group_norm_layer(h.shape[-1], 32, name, self.dtype)(h)
    return h

  @nn.compact
  def __call__(self, x):
    pad = ((1, 1), (1, 1))
    h = x.astype(self.dtype)
    h = nn.leaky_relu(nn.Conv(self.ndf, (4, 4), (2, 2), pad, kernel_init=_conv_init,
                              dtype=self.dtype, name="conv0")(h), 0.2)
    for n in range(1, self.n_layers + 1):
      stride = 2 if n < self.n_layers else 1
      h = nn.Conv(self.ndf * min(2 ** n, 8), (4, 4), (stride, stride), pad, use_bias=False,
                  kernel_init=_conv_init, dtype=self.dtype, name=f"conv{n}")(h)
      h = nn.leaky_relu(self._norm(h, f"norm{n}"), 0.2)
    h = nn.Conv(1, (4, 4), (1, 1), pad, kernel_init=_conv_init, dtype=self.dtype,
                name="conv_out")(h)
    return h.astype(jnp.float32)
