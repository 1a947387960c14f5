"""Config validation that runs before anything is compiled: one line naming the key."""
import difflib
import math
from typing import Callable, Optional

import ml_collections

from ldm_jax.config_schema import AUTOENCODER, CODECS
from ldm_jax.diffusion.samplers import SAMPLERS
from ldm_jax.diffusion.thresholding import Thresholding
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
  if config.train.get("grad_accum_steps", 1) != 1:
    raise UserError(f"config.train.grad_accum_steps={config.train.grad_accum_steps}: gradient "
                    "accumulation is for diffusion stages only (the autoencoder's adaptive GAN "
                    "weight and batch-norm discriminator need the whole batch); use 1")
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
    "sample.sampler": tuple(SAMPLERS),
    "sample.thresholding": ("none", "static", "dynamic"),
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
  k = block.train.get("grad_accum_steps", 1)
  if k < 1 or block.train.batch_size % k:
    raise UserError(f"config.{name}.train.grad_accum_steps={k} must be a positive divisor of "
                    f"config.{name}.train.batch_size={block.train.batch_size}")
  try:
    Thresholding(block.sample.thresholding, float(block.sample.dynamic_ratio),
                 float(block.sample.sample_max_value))
  except ValueError as e:
    raise UserError(f"config.{name}: {e}") from e
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


# Ranges of numeric keys, by their last two components (block.key), wherever the block sits
# (the autoencoder's top-level blocks or a diffusion stage's). Every float must be finite.
_POSITIVE = ("positive", lambda v: v > 0)
_NONNEGATIVE = (">= 0", lambda v: v >= 0)
_FRACTION = ("in [0, 1)", lambda v: 0 <= v < 1)
_OPEN_UNIT = ("in (0, 1)", lambda v: 0 < v < 1)
_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    **{f"optim.{k}": _POSITIVE for k in ("lr", "disc_lr", "eps")},
    **{f"optim.{k}": _FRACTION for k in ("b1", "b2", "ema_decay")},
    **{f"optim.{k}": _NONNEGATIVE for k in ("warmup_steps", "weight_decay", "grad_clip")},
    **{f"loss.{k}": _NONNEGATIVE for k in ("disc_factor", "disc_weight", "kl_weight",
                                           "perceptual_weight", "disc_start")},
    "diffusion.beta_start": _OPEN_UNIT, "diffusion.beta_end": _OPEN_UNIT,
    "diffusion.num_timesteps": _POSITIVE, "diffusion.scale_batches": _POSITIVE,
    "diffusion.latent_scale": _NONNEGATIVE, "diffusion.min_snr_gamma": _NONNEGATIVE,
    "conditioning.drop_prob": _FRACTION, "autoencoder.dropout": _FRACTION,
    "unet.dropout": _FRACTION, "unet.norm_eps": _POSITIVE,
    "lowres.aug_max": _FRACTION, "lowres.sample_aug_level": _FRACTION,
    **{f"train.{k}": _POSITIVE for k in ("batch_size", "num_steps", "checkpoint_every",
                                         "log_every", "eval_every", "eval_batch_size",
                                         "keep_checkpoints", "progress_every_secs")},
    **{f"train.{k}": _NONNEGATIVE for k in ("eval_max_examples", "num_eval_images",
                                            "sr_eval_images",
                                            "latent_cache_max_gib")},
    "train.grad_accum_steps": _POSITIVE,
    "sample.steps": _POSITIVE, "sample.num_samples": _POSITIVE, "sample.eta": _NONNEGATIVE,
    "sample.sample_max_value": _NONNEGATIVE, "sample.guidance": _NONNEGATIVE,
    **{f"data.{k}": _POSITIVE for k in ("image_size", "channels", "num_threads", "prefetch")},
    "data.num_workers": _NONNEGATIVE,
    **{f"unet.{k}": _POSITIVE for k in ("model_channels", "num_res_blocks", "num_groups",
                                        "num_heads")},
    **{f"autoencoder.{k}": _POSITIVE for k in ("ch", "num_res_blocks", "num_groups",
                                               "z_channels", "embed_dim")},
    "seed": _NONNEGATIVE,
}


def flat_items(config, prefix: str = ""):
  """(dotted key, value) of every leaf of a ConfigDict."""
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from flat_items(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def check_numbers(config: ml_collections.ConfigDict) -> None:
  """Every float finite, and the numeric keys of `_RANGES` in range: caught here, before
  anything compiles, instead of as a NaN after the first step or a silent divergence."""
  for key, value in flat_items(config):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      continue
    if isinstance(value, float) and not math.isfinite(value):
      raise UserError(f"config.{key}={value} must be a finite number")
    rule = _RANGES.get(".".join(key.split(".")[-2:])) or _RANGES.get(key)
    if rule is not None and not rule[1](value):
      raise UserError(f"config.{key}={value!r} must be {rule[0]}")


def unknown_key_message(config: Optional[ml_collections.ConfigDict], dotted: str) -> str:
  """One line for an override of a key the config does not have, with the nearest valid
  keys (a typo is the usual cause)."""
  message = f"config.{dotted} is not a key of this config"
  if config is None:
    return message
  keys = [k for k, _ in flat_items(config)]
  near = difflib.get_close_matches(dotted, keys, n=3, cutoff=0.6)
  if not near:  # a key misspelt in a block that exists: its siblings
    block = dotted.rsplit(".", 1)[0] + "."
    near = [k for k in keys if k.startswith(block)][:6]
  return message + (f"; nearest: {', '.join('config.' + k for k in near)}" if near else "")
