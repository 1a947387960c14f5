"""Cascaded pixel-space diffusion (Ho et al. 2021, "Cascaded Diffusion Models"; Imagen): a
class-conditional base model at low resolution, then super-resolution models conditioned on
the upsampled output of the stage below (concatenated channels) with noise-conditioning
augmentation. Every stage is a diffusion stage block (ldm_jax/config_schema.py, codec 'pixel')
trained in order by one train.py run. Presets: `configs/cascade.py:<preset>`.

  default         Fashion-MNIST 8x8 -> 16x16 -> 32x32 (the 64 -> 256 -> 1024 cascade at 1/32
                  scale), sized for 2 CPU cores
  smoke           the same three stages, tiny, end to end in a few minutes
  imagenet64_256  ImageNet 64x64 base + 64 -> 256 super-resolution, shaped like the published
                  CDM / Imagen models, for accelerators
"""
import ml_collections

from configs import pixel as pixel_configs
from ldm_jax.errors import UserError


def sr_stage(resolution: int, lower: str) -> ml_collections.ConfigDict:
  """A super-resolution stage. v-prediction (Salimans & Ho 2022; Imagen Video's SR models):
  with eps-prediction x_0^ = (x_t - sigma eps^) / alpha multiplies the network's error by
  sigma / alpha, up to 95x at the linear schedule's last steps, so the early steps' x_0 is
  noise whatever the conditioning says, and short-trained SR stages diverged into noise and
  lost to bicubic upsampling (docs/COMPARISON.md); with v, x_0^ = alpha x_t - sigma v^ and the
  error is never amplified. No guidance at sampling by default (CDM's SR models use none):
  the low-resolution image already carries the class; DDIM-20 (sr16 on real inputs: 22.2 dB
  at 20 steps, 21.7 at 50)."""
  s = pixel_configs.pixel_stage(resolution)
  s.diffusion.update(parameterization="v")
  s.lowres.update(stage=lower, aug_max=0.5, sample_aug_level=0.1)
  s.sample.update(guidance=1.0, steps=20)
  return s


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  preset = arg or "default"
  if preset in ("default", "smoke"):
    c = pixel_configs.root(("base", "sr16", "sr32"))
    c.base = pixel_configs.pixel_stage(8)
    c.sr16 = sr_stage(16, "base")
    c.sr32 = sr_stage(32, "sr16")
  elif preset == "imagenet64_256":
    c = pixel_configs.root(("base", "sr256"))
    c.data.update(source="tfds", name="imagenet2012", train_split="train",
                  eval_split="validation", image_size=256, channels=3, random_crop=True,
                  random_flip=True, num_threads=16)
    c.base = pixel_configs.pixel_stage(64)
    c.sr256 = sr_stage(256, "base")
  else:
    raise UserError(f"unknown preset {preset!r} for configs/cascade.py "
                     "(default, smoke, imagenet64_256)")

  if preset == "default":
    # Base: the LDM default's UNet on 8x8x1 pixels. SR stages: narrower, attention only at
    # the deepest level of the 16x16 model, none at 32x32 (as CDM's / Imagen's SR models).
    c.base.unet.update(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                       attention_levels=(1, 2))
    c.base.train.update(batch_size=64, num_steps=2000)
    c.sr16.unet.update(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                       attention_levels=(2,))
    c.sr16.train.update(batch_size=32, num_steps=1200)
    c.sr32.unet.update(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                       attention_levels=())
    c.sr32.train.update(batch_size=32, num_steps=1000)
    for s in (c.base, c.sr16, c.sr32):
      s.train.update(eval_every=s.train.num_steps, checkpoint_every=500)
  elif preset == "smoke":
    for name, res in (("base", 8), ("sr16", 16), ("sr32", 32)):
      s = c[name]
      s.unet.update(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                    attention_levels=(1,) if res == 8 else (), num_head_channels=16,
                    num_groups=8)
      s.optim.update(warmup_steps=5)
      s.train.update(batch_size=16, num_steps=20, log_every=10, eval_every=20,
                     checkpoint_every=10, sr_eval_images=16)
      s.sample.update(steps=4, num_samples=8)
  else:
    # CDM ImageNet (Ho et al. 2021, table 6 / appendix): 64x64 base with 192 channels, mult
    # (1, 2, 3, 4), 3 res blocks, attention at 32/16/8; 64 -> 256 SR with 128 channels, mult
    # (1, 1, 2, 2, 4, 4), 2 res blocks, no attention; cosine schedule, 1000 classes.
    c.base.unet.update(model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                       attention_levels=(1, 2, 3), num_head_channels=64, scale_shift_norm=True)
    c.sr256.unet.update(model_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                        attention_levels=(), scale_shift_norm=True)
    for s, batch in ((c.base, 2048), (c.sr256, 1024)):
      s.diffusion.update(schedule="cosine")
      s.optim.update(lr=1e-4, warmup_steps=10_000, decay="constant", ema_decay=0.9999)
      s.train.update(batch_size=batch, num_steps=400_000, compute_dtype="bfloat16",
                     log_every=100, eval_every=5000, checkpoint_every=5000)
  return c
