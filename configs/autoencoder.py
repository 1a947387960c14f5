"""Stage-1 (KL autoencoder) configs. Presets: `configs/autoencoder.py:<preset>`.

  default  Fashion-MNIST 32x32, f=4 (8x8x4 latents), sized for 2 CPU cores (<= 20 min)
  smoke    a tiny model for a ~1 minute end-to-end check
  kl_f8    LDM's KL-f8 first stage (256x256 ImageNet, 32x32x4 latents), for accelerators
  kl_f4    LDM's KL-f4 first stage (256x256 ImageNet, 64x64x3 latents), for accelerators
"""
import ml_collections

from ldm_jax.config_schema import mesh_block
from ldm_jax.data import default_data_config
from ldm_jax.errors import UserError


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = default_data_config()

  c.autoencoder = ml_collections.ConfigDict(dict(
      ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4,
      attn_levels=(), mid_attention=True, dropout=0.0, num_groups=32,
      quant_conv=True))  # False: no quant_conv / post_quant_conv (diffusers use_quant_conv)

  c.discriminator = ml_collections.ConfigDict(dict(ndf=32, n_layers=2, norm="batch"))

  c.loss = ml_collections.ConfigDict(dict(
      rec_loss="l1", kl_weight=1e-6, logvar_init=0.0,
      perceptual_weight=1.0, lpips_weights="",  # LPIPS is used only when weights are given
      disc_weight=0.5, disc_factor=1.0, disc_start=1500, gan_loss="hinge"))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, disc_lr=4e-4, b1=0.5, b2=0.9, eps=1e-8, warmup_steps=100, decay="cosine",
      ema_decay=0.0))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=32, num_steps=2000, compute_dtype="float32",
      log_every=50, eval_every=500, checkpoint_every=500, keep_checkpoints=2,
      async_checkpoint=True, progress_every_secs=30.0, profile=False,
      nonfinite="stop",  # a non-finite loss or update: 'stop' the run, or 'skip' the update
      eval_batch_size=200, eval_max_examples=0, num_eval_images=16))

  # Mesh axis sizes; -1 takes the remaining devices. The batch is split over data x fsdp;
  # parameters, optimizer state and EMA are split over fsdp (arrays of at least fsdp_min_size
  # elements) and, for attention and MLP kernels, over tensor (ldm_jax/sharding.py). `rules`:
  # extra (regex on the leaf path, per-dimension axes) pairs tried before the built-in ones,
  # e.g. ((r"conv_out/kernel$", (None, None, "fsdp", None)),). Used by both stages.
  c.mesh = mesh_block()
  c.stages = ("autoencoder",)
  return c


def _imagenet(c: ml_collections.ConfigDict) -> None:
  c.data.update(source="tfds", name="imagenet2012", train_split="train",
                eval_split="validation", image_size=256, channels=3, random_crop=True,
                random_flip=True, num_threads=16)


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  c = base_config()
  preset = arg or "default"
  if preset == "default":
    pass
  elif preset == "smoke":
    c.autoencoder.update(ch=16, num_res_blocks=1)
    c.discriminator.update(ndf=16, n_layers=1)
    c.loss.disc_start = 40
    c.optim.update(lr=1e-3, disc_lr=1e-3, warmup_steps=10)
    c.train.update(batch_size=16, num_steps=80, log_every=10, eval_every=40,
                   checkpoint_every=40, eval_batch_size=64, eval_max_examples=512,
                   num_eval_images=8)
  elif preset in ("kl_f8", "kl_f4"):
    # LDM `configs/autoencoder/autoencoder_kl_{32x32x4,64x64x3}.yaml`: base lr 4.5e-6 scaled
    # by the global batch, disc_start 50001, kl_weight 1e-6, disc_weight 0.5, PatchGAN n=3.
    _imagenet(c)
    f8 = preset == "kl_f8"
    c.autoencoder.update(ch=128, ch_mult=(1, 2, 4, 4) if f8 else (1, 2, 4), num_res_blocks=2,
                         z_channels=4 if f8 else 3, embed_dim=4 if f8 else 3)
    c.discriminator.update(ndf=64, n_layers=3)
    c.loss.update(disc_start=50001, kl_weight=1e-6, disc_weight=0.5)
    c.train.update(batch_size=96, num_steps=200_000, compute_dtype="bfloat16",
                   log_every=100, eval_every=5000, checkpoint_every=5000,
                   eval_batch_size=96, eval_max_examples=10_000)
    c.optim.update(lr=4.5e-6 * 96, disc_lr=4.5e-6 * 96, warmup_steps=0, decay="constant",
                   ema_decay=0.0)
  else:
    raise UserError(f"unknown preset {preset!r} for configs/autoencoder.py "
                     "(default, smoke, kl_f8, kl_f4)")
  return c
