"""Config validation that runs before anything is compiled: one line naming the key."""
import ml_collections

from ldm_jax.config_schema import AUTOENCODER, CODECS
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


_STAGE_CHOICES = {
    "codec": CODECS,
    "conditioning.kind": ("class", "text", "none", "clip"),
    "diffusion.parameterization": ("eps", "v", "x0"),
    "diffusion.schedule": ("linear", "scaled_linear", "cosine"),
    "train.compute_dtype": ("float32", "bfloat16"),
    "optim.decay": ("constant", "cosine"),
    "sample.sampler": ("ddpm", "ddim", "dpmpp_2m"),
}


def check_stages(config: ml_collections.ConfigDict) -> None:
  """Every diffusion stage of `config.stages`: enums, sizes, the codec's resolution against
  the UNet's downsampling, and the low-resolution stage of super-resolution stages."""
  stages = tuple(config.stages)
  if len(set(stages)) != len(stages) or not stages:
    raise UserError(f"config.stages={stages} must name each stage once")
  if AUTOENCODER in stages[1:]:
    raise UserError(f"config.stages={stages}: '{AUTOENCODER}' can only come first")
  for name in stages:
    if name not in config:
      raise UserError(f"config.stages names {name!r} but config.{name} does not exist")
  names = [n for n in stages if n != AUTOENCODER]
  for i, name in enumerate(names):
    _check_stage(config, name, names[:i])


def _check_stage(config, name: str, before: list) -> None:
  block = config[name]
  for key, allowed in _STAGE_CHOICES.items():
    value = _get(block, key)
    if value not in allowed:
      raise UserError(f"config.{name}.{key}={value!r} is not one of {list(allowed)}")
  check_positive(config, f"{name}.train.batch_size", f"{name}.train.num_steps",
                 f"{name}.train.log_every", f"{name}.train.eval_every",
                 f"{name}.train.checkpoint_every", f"{name}.unet.model_channels")
  if not 0.0 <= block.conditioning.drop_prob < 1.0:
    raise UserError(f"config.{name}.conditioning.drop_prob={block.conditioning.drop_prob} "
                    "must be in [0, 1)")
  if block.codec == "latent":
    if AUTOENCODER not in config.stages and not block.autoencoder_workdir:
      raise UserError(f"config.{name}.codec='latent' needs an autoencoder: put "
                      f"'{AUTOENCODER}' first in config.stages or set "
                      f"config.{name}.autoencoder_workdir")
    ae = config.autoencoder if "autoencoder" in config else None
    f = 2 ** (len(ae.ch_mult) - 1) if ae is not None else 1
    size, what = config.data.image_size // f, "latents"
  else:
    size, what = int(block.resolution or config.data.image_size), "images"
    if not 0 < size <= config.data.image_size:
      raise UserError(f"config.{name}.resolution={block.resolution} must be in "
                      f"[1, data.image_size={config.data.image_size}]")
  down = 2 ** (len(block.unet.channel_mult) - 1)
  if size % down:
    raise UserError(f"config.{name}.unet.channel_mult={tuple(block.unet.channel_mult)} "
                    f"halves the {size}x{size} {what} {len(block.unet.channel_mult) - 1}"
                    f" times: their size must be divisible by {down}")
  low = block.lowres.stage
  if low:
    if low not in before:
      raise UserError(f"config.{name}.lowres.stage={low!r} must be a diffusion stage trained "
                      f"before it (one of {before})")
    if block.codec != "pixel" or config[low].codec != "pixel":
      raise UserError(f"config.{name}.lowres.stage={low!r}: super-resolution stages and the "
                      "stage below them run in pixel space (codec='pixel')")
    low_size = int(config[low].resolution or config.data.image_size)
    if low_size >= size:
      raise UserError(f"config.{name}.lowres.stage={low!r} makes {low_size}x{low_size} images, "
                      f"not smaller than this stage's {size}x{size}")
    if not 0.0 <= block.lowres.aug_max < 1.0 or not 0.0 <= block.lowres.sample_aug_level < 1.0:
      raise UserError(f"config.{name}.lowres.aug_max={block.lowres.aug_max} and "
                      f"sample_aug_level={block.lowres.sample_aug_level} must be in [0, 1)")
