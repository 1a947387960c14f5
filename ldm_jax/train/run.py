"""Entry point of training: `run(config, workdir)` trains the config's stages in order."""

import ml_collections

from ldm_jax import sharding
from ldm_jax import workdir as workdir_lib
from ldm_jax.config_schema import AUTOENCODER
from ldm_jax.train import checks, stage_autoencoder, stage_diffusion


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates the config, builds the mesh, then trains `config.stages` one after another
  (the autoencoder unless a latent stage takes a pretrained one), each resuming from its own
  checkpoints. Returns {stage: summary metrics}, as merged into workdir/summary.json."""
  workdir = workdir_lib.ensure_writable(workdir)
  config = workdir_lib.migrate(config)
  checks.check_numbers(config)
  names = workdir_lib.diffusion_stages(config)
  pretrained = [n for n in names if config[n].autoencoder_workdir]
  train_autoencoder = AUTOENCODER in config.stages and not pretrained
  if train_autoencoder:
    checks.check_autoencoder_config(config)
  checks.check_stages(config)
  mesh = sharding.make_mesh(config.mesh)
  if train_autoencoder:
    sharding.check_batch_size(config.train.batch_size, mesh)
  workdir_lib.write_config(config, workdir)
  if train_autoencoder:
    stage_autoencoder.run_autoencoder(config, workdir, mesh)
  for name in names:
    stage_diffusion.run_diffusion(config, name, workdir, mesh)
  return workdir_lib.read_summary(workdir)
