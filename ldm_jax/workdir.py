"""The workdir: its layout and metadata, for every kind of run (the one module that knows it).

  config.json                    the resolved config (`stages` lists the stages in order)
  summary.json                   final metrics, one entry per stage
  <stage>/checkpoints/<step>/    orbax checkpoints: {'state', 'meta'} (meta: data position,
                                 latent scale, shapes, class names, tokenizer, ...)
  <stage>/metrics.jsonl, events  training history; <stage>/*.png periodic images
  tokenizer/                     tokenizer files of converted text-to-image workdirs

Kinds: 'autoencoder' (stage 1 only), 'ldm' (autoencoder + latent stage), 'pixel' (one pixel
stage), 'cascade' (a base stage and super-resolution stages). Configs written before stages
were named (no `stages` key) are migrated on reading.
"""
import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from ldm_jax import files
from ldm_jax.config_schema import AUTOENCODER, diffusion_stage, lowres_block
from ldm_jax.errors import UserError

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"


def ensure_writable(workdir: str) -> str:
  """The absolute path of a training workdir, created if needed; one line when it is a file,
  cannot be created, or cannot be written (checked by writing a probe file: permission bits
  say nothing for root or on read-only mounts)."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"--workdir={workdir} is a file, not a directory")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_probe_{os.getpid()}")
    with open(probe, "w", encoding="utf-8"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f"--workdir={workdir} is not writable: {e.strerror or e}") from e
  return path


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def checkpoint_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "checkpoints")


def newest_checkpoints(workdir: str) -> dict[str, int]:
  """{stage: newest complete checkpoint step} of the stages under `workdir` that have one
  (from the directory names: orbax writes a step under a temporary name, then renames it)."""
  out = {}
  for stage in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
    ckpts = checkpoint_dir(workdir, stage)
    steps = [int(n) for n in os.listdir(ckpts) if n.isdigit()] if os.path.isdir(ckpts) else []
    if steps:
      out[stage] = max(steps)
  return out


def migrate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds what older configs lack: `stages`, and each diffusion block's codec keys."""
  config = ml_collections.ConfigDict(config.to_dict())
  if "stages" not in config:
    config.stages = (AUTOENCODER, "ldm") if "ldm" in config else (AUTOENCODER,)
  defaults = diffusion_stage()
  for name in diffusion_stages(config):
    block = config[name]
    for key in ("codec", "resolution", "autoencoder_workdir"):
      if key not in block:
        block[key] = defaults[key]
    if "lowres" not in block:
      block.lowres = lowres_block()
  return config


def diffusion_stages(config: ml_collections.ConfigDict) -> list[str]:
  return [s for s in config.stages if s != AUTOENCODER]


def kind(config: ml_collections.ConfigDict) -> str:
  names = diffusion_stages(config)
  if not names:
    return "autoencoder"
  if len(names) > 1:
    return "cascade"
  return "ldm" if config[names[0]].codec == "latent" else "pixel"


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """workdir/config.json, atomically (rewritten when values are resolved later)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with files.replaced(os.path.join(workdir, CONFIG_FILE)) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The (migrated) config of a trained or converted workdir."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise UserError(f"no trained model in {workdir!r}: looked for {path}")
  try:
    with open(path, encoding="utf-8") as f:
      tree = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(tree, dict):
    raise UserError(f"{path} is not a config: it holds a JSON {type(tree).__name__}, not an "
                    "object")
  return migrate(ml_collections.ConfigDict(tree))


def _plain(v: Any):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def read_summary(workdir: str) -> dict:
  path = os.path.join(workdir, SUMMARY_FILE)
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def update_summary(workdir: str, stage: str, metrics: Mapping[str, Any]) -> None:
  """Merges `{stage: metrics}` into workdir/summary.json, atomically (write + rename)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, SUMMARY_FILE)
  summary = read_summary(workdir)
  summary[stage] = {k: _plain(v) for k, v in metrics.items()}
  with files.replaced(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2, sort_keys=True)
