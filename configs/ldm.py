"""Latent diffusion configs: stage 1 (the autoencoder blocks of configs/autoencoder.py), then
stage 2 (`config.ldm`, a diffusion stage block with codec 'latent'; the same block shape as
configs/pixel.py and configs/cascade.py). Presets: `configs/ldm.py:<preset>`.

  default     Fashion-MNIST, class-conditional, both stages on 2 CPU cores (~20 min)
  smoke       both stages end to end in about two minutes
  text        Fashion-MNIST text-to-image: captions from class names, a transformer text
              encoder trained jointly with the UNet, cross-attention
  cin256      ImageNet-256 class-conditional LDM-4 (LDM paper, table 14: 400M UNet)
  txt2img_f8  text-to-image LDM-8 (LDM paper's LAION model shape), for accelerators
"""
import ml_collections

from configs import autoencoder as autoencoder_configs
from ldm_jax.config_schema import diffusion_stage
from ldm_jax.errors import UserError


def ldm_block() -> ml_collections.ConfigDict:
  """Stage 2: a diffusion stage (ldm_jax/config_schema.py) in the autoencoder's latent space."""
  return diffusion_stage()


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  preset = arg or "default"
  if preset in ("default", "text"):
    c = autoencoder_configs.get_config("default")
  elif preset == "smoke":
    c = autoencoder_configs.get_config("smoke")
  elif preset == "cin256":
    c = autoencoder_configs.get_config("kl_f4")
  elif preset == "txt2img_f8":
    c = autoencoder_configs.get_config("kl_f8")
  else:
    raise UserError(f"unknown preset {preset!r} for configs/ldm.py "
                     "(default, smoke, text, cin256, txt2img_f8)")
  c.stages = ("autoencoder", "ldm")
  c.ldm = ldm_block()
  if preset == "text":
    c.ldm.conditioning.kind = "text"
    c.ldm.unet.update(use_transformer=True)
  elif preset == "smoke":
    c.ldm.unet.update(model_channels=32, num_res_blocks=1, attention_levels=(1,))
    c.ldm.diffusion.scale_batches = 2
    c.ldm.optim.update(warmup_steps=10)
    c.ldm.train.update(batch_size=32, num_steps=60, log_every=10, eval_every=60,
                       checkpoint_every=30)
    c.ldm.sample.update(steps=10, num_samples=16)
  elif preset == "cin256":
    # LDM-4 cin256 (configs/latent-diffusion/cin-ldm-vq-f8.yaml shape on a KL-f4 first stage):
    # 256 channels, mult (1, 2, 4), 2 res blocks, attention at 32/16/8 (levels 0-2 of 64x64
    # latents: the paper's 'attention_resolutions 4,2,1'), 32-channel heads, 1000 classes.
    c.ldm.unet.update(model_channels=256, channel_mult=(1, 2, 4), num_res_blocks=2,
                      attention_levels=(0, 1, 2), num_head_channels=32, scale_shift_norm=False,
                      use_transformer=True, transformer_depth=1)
    c.ldm.diffusion.update(schedule="linear", beta_start=0.0015, beta_end=0.0195)
    c.ldm.optim.update(lr=1e-6 * 1200, warmup_steps=10_000, grad_clip=0.0, decay="constant",
                       ema_decay=0.9999)
    c.ldm.train.update(batch_size=1200, num_steps=178_000, compute_dtype="bfloat16",
                       log_every=100, eval_every=5000, checkpoint_every=5000)
  elif preset == "txt2img_f8":
    # The LDM paper's text-to-image model on KL-f8 latents of 256x256 images: 320 channels,
    # mult (1, 2, 4, 4), transformer depth 1, a 32-layer 1280-wide text transformer.
    c.ldm.unet.update(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                      attention_levels=(0, 1, 2), num_heads=8, num_head_channels=-1,
                      scale_shift_norm=False, use_transformer=True, transformer_depth=1)
    c.ldm.conditioning.update(kind="text", text_width=1280, text_depth=32, text_heads=8,
                              max_length=77, max_vocab=30_000)
    c.ldm.optim.update(lr=5e-5, warmup_steps=10_000, grad_clip=1.0, decay="constant",
                       ema_decay=0.9999)
    c.ldm.train.update(batch_size=680, num_steps=390_000, compute_dtype="bfloat16",
                       log_every=100, eval_every=5000, checkpoint_every=5000)
  return c
