"""A stage's parts from a config and a workdir: its codec (with the frozen autoencoder's
parameters), its denoiser, and its trained parameters. Used by sampling and by training (a
diffusion stage loads the autoencoder that stage 1 saved), so both build the same models."""
import json
import os
from typing import Any, NamedTuple, Optional

import ml_collections

from ldm_jax.models import codecs
from ldm_jax import workdir as workdir_lib
from ldm_jax.checkpoint import restore_eval_params
from ldm_jax.config_schema import AUTOENCODER
from ldm_jax.errors import UserError
from ldm_jax.models import lora as lora_lib
from ldm_jax.diffusion.schedules import stage_schedule
from ldm_jax.models.builders import (TEXT_KINDS, build_autoencoder, build_text_encoder,
                                     build_unet)
from ldm_jax.models.conditioning import ClipTokenizer, Tokenizer
from ldm_jax.models.denoiser import DiffusionModel


def stage_resolution(config: ml_collections.ConfigDict, stage: str) -> int:
  """The image size a stage produces (a latent stage: the data's, through its decoder)."""
  block = config[stage]
  if block.codec == "pixel":
    return int(block.resolution or config.data.image_size)
  return int(config.data.image_size)


def lowres_resolution(config: ml_collections.ConfigDict, stage: str) -> int:
  """The resolution of the stage conditioning `stage` (0: none)."""
  low = config[stage].lowres.stage
  return stage_resolution(config, low) if low else 0


def autoencoder_source(config: ml_collections.ConfigDict, stage: str,
                       workdir: str) -> tuple[ml_collections.ConfigDict, str]:
  """(config holding the autoencoder blocks, its workdir): this run's or a pretrained one."""
  pretrained = config[stage].autoencoder_workdir
  if not pretrained:
    return config, workdir
  path = os.path.join(pretrained, workdir_lib.CONFIG_FILE)
  if not os.path.isfile(path):
    raise UserError(f"config.{stage}.autoencoder_workdir={pretrained!r}: no config.json there")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f)), pretrained


def load_codec(config: ml_collections.ConfigDict, stage: str, workdir: str,
               scale: float = 1.0) -> tuple[Any, Any]:
  """(codec, codec params on this process's first device) of a diffusion stage."""
  block = config[stage]
  if block.codec == "pixel":
    return codecs.PixelCodec(stage_resolution(config, stage), int(config.data.channels)), {}
  ae_config, ae_workdir = autoencoder_source(config, stage, workdir)
  autoencoder = build_autoencoder(ae_config.autoencoder, ae_config.data.channels)
  ckpt_dir = workdir_lib.checkpoint_dir(ae_workdir, AUTOENCODER)
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"no autoencoder checkpoint in {ae_workdir!r}: looked for {ckpt_dir}/<step>")
  params, _, _ = restore_eval_params(ckpt_dir, ema_key=AUTOENCODER)
  return codecs.LatentCodec(autoencoder, float(scale), int(config.data.image_size)), params


def tokenizer_of(config: ml_collections.ConfigDict, stage: str, workdir: str,
                 meta: dict) -> Optional[Any]:
  kind = config[stage].conditioning.kind
  if kind == "clip":
    return ClipTokenizer(os.path.join(workdir, config[stage].conditioning.get("tokenizer",
                                                                             "tokenizer")))
  if kind == "text":
    return Tokenizer.from_json(meta["tokenizer"])
  return None


def build_model(config: ml_collections.ConfigDict, stage: str, channels: int,
                num_classes: int, tokenizer=None) -> DiffusionModel:
  """The denoiser of a stage (float32 compute, for sampling)."""
  block = config[stage]
  text = build_text_encoder(block, tokenizer) if block.conditioning.kind in TEXT_KINDS else None
  low = channels if block.lowres.stage else 0
  return DiffusionModel(build_unet(block, channels, num_classes), text, block.conditioning.kind,
                        tokenizer, int(block.conditioning.max_length), low)


class StageParts(NamedTuple):
  name: str
  codec: Any
  codec_params: Any
  model: DiffusionModel
  params: Any
  schedule: Any
  meta: dict
  step: Optional[int] = None  # the checkpoint step the parameters came from


def load_stage(config: ml_collections.ConfigDict, workdir: str, stage: str,
               step: Optional[int] = None, lora_scale: float = 1.0) -> StageParts:
  """A trained (or converted) diffusion stage: EMA parameters when trained with EMA. A LoRA
  run's checkpoints hold its adapters: they are merged into its base model (config.init_from)
  times `lora_scale`."""
  ckpt_dir = workdir_lib.checkpoint_dir(workdir, stage)
  if not os.path.isdir(ckpt_dir) or not any(n.isdigit() for n in os.listdir(ckpt_dir)):
    raise UserError(f"no {stage} checkpoint in {workdir!r}: looked for {ckpt_dir}/<step>")
  params, meta, step = restore_eval_params(ckpt_dir, step)
  lora = config[stage].get("lora", None)
  if lora is not None and int(lora.rank) > 0:
    base, _, _ = restore_eval_params(workdir_lib.checkpoint_dir(config.init_from, stage))
    scale = float(lora_scale) * (float(lora.alpha) or int(lora.rank)) / int(lora.rank)
    params = lora_lib.merge(base, params, scale)
  codec, codec_params = load_codec(config, stage, workdir, float(meta.get("latent_scale", 1.0)))
  if tuple(meta.get("latent_shape", codec.shape)) != tuple(codec.shape):
    raise UserError(f"{ckpt_dir}: saved for shape {meta['latent_shape']}, the config's codec "
                    f"gives {list(codec.shape)}")
  model = build_model(config, stage, codec.shape[-1], int(meta.get("num_classes", 0)),
                      tokenizer_of(config, stage, workdir, meta))
  return StageParts(stage, codec, codec_params, model, params, stage_schedule(config[stage]), meta,
                    int(step))

