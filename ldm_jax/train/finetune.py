"""Fine-tuning: a run that starts from another workdir's diffusion stage (trained here or
converted from diffusers / CompVis) instead of random parameters.

`configs/finetune.py` holds only what a fine-tune chooses (`init_from`, the data, the stage's
train / optim / sample settings); `resolve` turns it into a whole config before anything is
written: the source workdir's config (architecture, schedule, conditioning) with those
settings on top, one diffusion stage, its autoencoder read frozen from the source
(`autoencoder_workdir`, so no stage 1 runs and the latent cache works as in every run), and a
CLIP tokenizer read from the source's folder. The stored config.json is that resolved config,
so sample.py, evaluate, export and a resume treat the result as any other workdir.
`initial_params` gives the source's parameters (its EMA when trained with one), which the loop
puts on the mesh at step 0 in place of the random ones (`train_stage(initial_params=...)`).
"""
import copy
import os
from typing import Any

import ml_collections

from ldm_jax import workdir as workdir_lib
from ldm_jax.checkpoint import restore_eval_params
from ldm_jax.config_schema import AUTOENCODER
from ldm_jax.errors import UserError

# configs/finetune.py's blocks that replace the source stage's own.
STAGE_BLOCKS = ("train", "optim", "sample", "lora")


def is_finetune(config: ml_collections.ConfigDict) -> bool:
  return bool(config.get("init_from", ""))


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The whole config of a fine-tune (see the module doc); one line naming the key or file
  when the source cannot be fine-tuned this way."""
  source = os.path.abspath(config.init_from)
  if not os.path.isfile(os.path.join(source, workdir_lib.CONFIG_FILE)):
    raise UserError(f"config.init_from={config.init_from!r} is not a workdir (no "
                    f"{workdir_lib.CONFIG_FILE})")
  src = workdir_lib.read_config(source)
  names = workdir_lib.diffusion_stages(src)
  if len(names) != 1:
    raise UserError(f"config.init_from={source}: fine-tuning takes a workdir with one "
                    f"diffusion stage, this one has {names}")
  stage = names[0]
  out = copy.deepcopy(src)
  out.init_from = source
  out.seed = int(config.seed)
  out.data = copy.deepcopy(config.data)
  for key in ("image_size", "channels"):
    want = int(src.data[key])
    if int(out.data.get(key, 0) or 0) in (0, want):
      out.data[key] = want
    else:
      raise UserError(f"config.data.{key}={out.data[key]} differs from the source model's "
                      f"{want} ({source}/{workdir_lib.CONFIG_FILE}): fine-tune at its size")
  out.stages = (stage,)
  block = out[stage]
  for name in STAGE_BLOCKS:
    if name not in block:
      block[name] = ml_collections.ConfigDict()
    for key, value in config.finetune[name].items():
      block[name][key] = copy.deepcopy(value)
  if block.codec == "latent":
    block.autoencoder_workdir = _autoencoder_workdir(src, stage, source)
  kind = block.conditioning.kind
  if kind not in ("text", "clip"):  # the default freezes a text encoder this model lacks
    block.optim.frozen = tuple(f for f in block.optim.get("frozen", ()) if f != "text")
  if kind == "clip":
    tok = block.conditioning.get("tokenizer", "tokenizer")
    block.conditioning.tokenizer = os.path.join(source, tok)  # absolute stays absolute
  if config.finetune.get("drop_prob", -1.0) >= 0:  # < 0: the source's own
    block.conditioning.drop_prob = float(config.finetune.drop_prob)
  out.mesh = copy.deepcopy(config.mesh)
  return out


def _autoencoder_workdir(src: ml_collections.ConfigDict, stage: str, source: str) -> str:
  """The workdir holding the source stage's autoencoder (its own, or the one it took)."""
  taken = src[stage].get("autoencoder_workdir", "")
  if taken:
    return os.path.abspath(os.path.join(source, taken))
  ckpt = workdir_lib.checkpoint_dir(source, AUTOENCODER)
  if not os.path.isdir(ckpt):
    raise UserError(f"config.init_from={source}: no autoencoder checkpoint ({ckpt})")
  return source


def initial_params(config: ml_collections.ConfigDict, stage: str) -> tuple[Any, dict, int]:
  """(parameters, meta, step) of the source stage: what step 0 of the fine-tune starts from."""
  return restore_eval_params(workdir_lib.checkpoint_dir(config.init_from, stage))


def check_classes(meta: dict, num_classes: int, what: str) -> None:
  """A class-conditional source fine-tunes on data with the same number of classes."""
  want = int(meta.get("num_classes", 0))
  if want and num_classes != want:
    raise UserError(f"{what} has {num_classes} classes, the source model {want}: its label "
                    "table would not fit (fine-tune on a folder with as many class folders)")
