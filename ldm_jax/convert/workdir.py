"""Writing converted weights as an ldm_jax workdir that `LatentDiffusionPipeline.from_workdir`
and `sample.py` load:

  config.json                          configs/ldm.py's schema, updated with the converted
                                       architecture, schedule and conditioning
  autoencoder/checkpoints/0/           {'state': {'params': AutoencoderKL params}, 'meta'}
  ldm/checkpoints/0/                   {'state': {'params': {'unet', 'text'}}, 'meta'}
  tokenizer/                           the tokenizer files (CLIP conditioning)

Converted checkpoints hold parameters only (meta 'format': 'params'), no optimizer state or
EMA: they are for sampling, and an SD UNet's Adam state alone would be 7 GB.
"""
import importlib.util
import os
import shutil
from typing import Any, Optional, Sequence

import jax
import ml_collections

from ldm_jax import workdir as workdir_lib
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.config_schema import AUTOENCODER
from ldm_jax.errors import UserError

PARAMS_FORMAT = "params"


def base_config() -> ml_collections.ConfigDict:
  """`configs/ldm.py:default` (the schema train.py writes), loaded from the source tree."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), "configs", "ldm.py")
  if not os.path.isfile(path):
    raise UserError(f"configs/ldm.py not found at {path}: convert needs the source tree "
                    "(pip install -e .)")
  spec = importlib.util.spec_from_file_location("_ldm_jax_configs_ldm", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("default")


def save_params(directory: str, params: Any, meta: dict) -> None:
  """One parameters-only orbax checkpoint at step 0 under `directory`."""
  if os.path.exists(directory) and os.listdir(directory):
    raise UserError(f"{directory} is not empty: convert into a new workdir")
  ckpt = Checkpointer(directory, keep=1, save_every=1, async_save=False)
  ckpt.save(0, {"params": params}, {**meta, "format": PARAMS_FORMAT}, force=True)
  ckpt.wait()
  ckpt.close()


def copy_files(src: str, dst: str, names: Sequence[str]) -> None:
  os.makedirs(dst, exist_ok=True)
  for name in names:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def write_workdir(workdir: str, config: ml_collections.ConfigDict, ae_params: Any,
                  ldm_params: Any, *, latent_shape: Sequence[int], latent_scale: float,
                  source: str, tokenizer_dir: Optional[str] = None,
                  tokenizer_files: Sequence[str] = ()) -> None:
  """config.json, both checkpoints and (optionally) the tokenizer files into `workdir`."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(os.path.join(workdir, "config.json")):
    raise UserError(f"{workdir} already holds a model (config.json): convert into a new workdir")
  to_host = lambda tree: jax.tree.map(lambda x: jax.numpy.asarray(x), tree)  # noqa: E731
  if tokenizer_dir is not None:
    copy_files(tokenizer_dir, os.path.join(workdir, "tokenizer"), tokenizer_files)
  save_params(workdir_lib.checkpoint_dir(workdir, AUTOENCODER), to_host(ae_params),
              {"source": source})
  meta = {"latent_scale": float(latent_scale), "latent_shape": [int(s) for s in latent_shape],
          "num_classes": 0, "class_names": [], "tokenizer": "", "source": source}
  save_params(workdir_lib.checkpoint_dir(workdir, "ldm"), to_host(ldm_params), meta)
  workdir_lib.write_config(config, workdir)  # last: its presence marks a complete workdir
