"""Pixel-space diffusion: one class-conditional model directly on the images (no autoencoder),
the baseline of benchmarks/compare.py. The stage block is the same as an LDM's stage 2
(ldm_jax/config_schema.py) with codec 'pixel'. Presets: `configs/pixel.py:<preset>`.

  default  Fashion-MNIST 32x32x1, the LDM default's UNet family and width (64 channels,
           mult (1, 2, 2), attention at 8x8), sized for 2 CPU cores
  smoke    a tiny model, end to end in about a minute
"""
import ml_collections

from configs import autoencoder as autoencoder_configs
from ldm_jax.config_schema import diffusion_stage
from ldm_jax.data import default_data_config
from ldm_jax.errors import UserError


def root(stages: tuple) -> ml_collections.ConfigDict:
  """seed, data, mesh and the stage order: the top level of every config."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = default_data_config()
  c.mesh = autoencoder_configs.mesh_block()
  c.stages = tuple(stages)
  return c


def pixel_stage(resolution: int = 0) -> ml_collections.ConfigDict:
  s = diffusion_stage()
  s.codec, s.resolution = "pixel", resolution
  # Pixels are already unit-scale ([-1, 1]); the linear schedule of DDPM / the LDM paper's
  # pixel baselines rather than SD's scaled-linear one tuned for latents.
  s.diffusion.update(schedule="linear", beta_start=1e-4, beta_end=0.02)
  # Pixels are bounded: the predicted x_0 is clipped to [-1, 1] at every sampling step, as
  # DDPM, ADM and CDM sample (Imagen's 'dynamic' thresholding is the alternative; on
  # Fashion-MNIST's exact-black backgrounds it dims them: docs/COMPARISON.md).
  s.sample.update(thresholding="static", sample_max_value=1.0)
  return s


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  preset = arg or "default"
  c = root(("pixel",))
  c.pixel = pixel_stage()
  # v-prediction (Salimans & Ho 2022), as the cascade's SR stages: after 750 steps (13 min on
  # 2 cores) class accuracy 0.888 vs 0.505 for eps, both clipped; 0.934 after the default's
  # 1500 (docs/COMPARISON.md, 'The pixel model').
  c.pixel.diffusion.update(parameterization="v")
  if preset == "default":
    c.pixel.unet.update(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_levels=(2,))
    c.pixel.train.update(batch_size=32, num_steps=1500, eval_every=1500, checkpoint_every=500)
  elif preset == "smoke":
    c.pixel.unet.update(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_levels=(2,), num_head_channels=16, num_groups=8)
    c.pixel.optim.update(warmup_steps=5)
    c.pixel.train.update(batch_size=16, num_steps=30, log_every=10, eval_every=30,
                         checkpoint_every=15)
    c.pixel.sample.update(steps=5, num_samples=8)
  else:
    raise UserError(f"unknown preset {preset!r} for configs/pixel.py (default, smoke)")
  return c
