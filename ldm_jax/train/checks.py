"""Config validation that runs before anything is compiled: one line naming the key."""
import ml_collections

from ldm_jax.errors import UserError

_CHOICES = {
    "train.compute_dtype": ("float32", "bfloat16"),
    "loss.rec_loss": ("l1", "l2"),
    "loss.gan_loss": ("hinge", "non_saturating"),
    "discriminator.norm": ("batch", "group", "none"),
    "optim.decay": ("constant", "cosine"),
    "data.source": ("fashion_mnist", "tfds", "folder"),
    "data.channels": (1, 3),
}


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def check_choices(config: ml_collections.ConfigDict, keys=None) -> None:
  for key, allowed in _CHOICES.items():
    if keys is not None and key.split(".")[0] not in keys:
      continue
    value = _get(config, key)
    if value not in allowed:
      raise UserError(f"config.{key}={value!r} is not one of {list(allowed)}")


def check_positive(config, *keys) -> None:
  for key in keys:
    value = _get(config, key)
    if value <= 0:
      raise UserError(f"config.{key}={value!r} must be positive")


def check_autoencoder_config(config: ml_collections.ConfigDict) -> None:
  """Stage-1 keys: enums, sizes, and image_size divisible by the downsampling factor."""
  check_choices(config)
  check_positive(config, "train.batch_size", "train.num_steps", "train.log_every",
                 "train.eval_every", "train.checkpoint_every", "data.image_size",
                 "autoencoder.ch", "autoencoder.num_res_blocks")
  f = 2 ** (len(config.autoencoder.ch_mult) - 1)
  if config.data.image_size % f:
    raise UserError(f"config.data.image_size={config.data.image_size} is not divisible by the "
                    f"autoencoder's downsampling factor f={f} (autoencoder.ch_mult="
                    f"{tuple(config.autoencoder.ch_mult)})")


_LDM_CHOICES = {
    "ldm.conditioning.kind": ("class", "text", "none"),
    "ldm.diffusion.parameterization": ("eps", "v", "x0"),
    "ldm.diffusion.schedule": ("linear", "scaled_linear", "cosine"),
    "ldm.train.compute_dtype": ("float32", "bfloat16"),
    "ldm.optim.decay": ("constant", "cosine"),
    "ldm.sample.sampler": ("ddpm", "ddim", "dpmpp_2m"),
}


def check_ldm_config(config: ml_collections.ConfigDict) -> None:
  """Stage-2 keys: enums, sizes, and latent size divisible by the UNet's downsampling."""
  for key, allowed in _LDM_CHOICES.items():
    value = _get(config, key)
    if value not in allowed:
      raise UserError(f"config.{key}={value!r} is not one of {list(allowed)}")
  check_positive(config, "ldm.train.batch_size", "ldm.train.num_steps", "ldm.train.log_every",
                 "ldm.train.eval_every", "ldm.train.checkpoint_every", "ldm.unet.model_channels")
  if not 0.0 <= config.ldm.conditioning.drop_prob < 1.0:
    raise UserError(f"config.ldm.conditioning.drop_prob={config.ldm.conditioning.drop_prob} "
                    "must be in [0, 1)")
  f = 2 ** (len(config.autoencoder.ch_mult) - 1)
  latent = config.data.image_size // f
  down = 2 ** (len(config.ldm.unet.channel_mult) - 1)
  if latent % down:
    raise UserError(f"config.ldm.unet.channel_mult={tuple(config.ldm.unet.channel_mult)} "
                    f"halves the {latent}x{latent} latents {len(config.ldm.unet.channel_mult) - 1}"
                    f" times: the latent size must be divisible by {down}")
