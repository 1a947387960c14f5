"""Entry point of training: `run(config, workdir)` trains the stages the config asks for."""
import os

import jax
import ml_collections

from ldm_jax import sharding
from ldm_jax.train import checks


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """workdir/config.json: the resolved config (rewritten when values are resolved later)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, os.path.join(workdir, "config.json"))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates the config, builds the mesh, then trains stage 1 and (for LDM configs) stage 2.

  Returns {stage: summary metrics}, as merged into workdir/summary.json.
  """
  from ldm_jax.train import stage_autoencoder, stage_ldm  # pylint: disable=g-import-not-at-top
  from ldm_jax.train.writers import read_summary  # pylint: disable=g-import-not-at-top
  is_ldm = "ldm" in config
  if not (is_ldm and config.ldm.autoencoder_workdir):
    checks.check_autoencoder_config(config)
  if is_ldm:
    checks.check_ldm_config(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.train.batch_size, mesh)
  workdir = os.path.abspath(workdir)
  write_config(config, workdir)
  if is_ldm:
    stage_ldm.run_ldm(config, workdir, mesh)
  else:
    stage_autoencoder.run_autoencoder(config, workdir, mesh)
  return read_summary(workdir)
