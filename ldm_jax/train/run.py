"""Entry point of training: `run(config, workdir)` trains the config's stages in order."""
import datetime
import logging
import os
import shutil

import jax
import ml_collections

from ldm_jax import console, files, sharding
from ldm_jax import workdir as workdir_lib
from ldm_jax.config_schema import AUTOENCODER
from ldm_jax.errors import ConfigMismatch, UserError, is_disk_full
from ldm_jax.train import (autoencoder_stage, checks, config_change, diffusion_stage, finetune,
                           lock)


def run(config: ml_collections.ConfigDict, workdir: str,
        allow_config_change: bool = False) -> dict:
  """Validates the config, takes the workdir's lock, checks the config against the one the
  workdir was trained with, builds the mesh, then trains `config.stages` one after another
  (the autoencoder unless a latent stage takes a pretrained one), each resuming from its own
  checkpoints. Returns {stage: summary metrics}, as merged into workdir/summary.json."""
  if finetune.is_finetune(config):  # configs/finetune.py: the source's config, resolved
    config = finetune.resolve(config)
  workdir = workdir_lib.ensure_writable(workdir)
  try:
    with lock.held(workdir):
      return _run_locked(workdir_lib.migrate(config), workdir, allow_config_change)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (a full disk becomes one line)
    if not is_disk_full(e):
      raise
    what = getattr(e, "filename", None) or "a file"
    kept = ", ".join(f"{stage} step {step}" for stage, step in
                     workdir_lib.newest_checkpoints(workdir).items()) or "none"
    raise UserError(f"no space left on device while writing {what} under {workdir}; "
                    f"checkpoints kept: {kept}") from e


def keep_config(config: ml_collections.ConfigDict, workdir: str,
                allow_config_change: bool) -> ml_collections.ConfigDict:
  """The config to train an existing workdir with: refused (one line listing the changed keys)
  when it differs from the stored config.json in keys outside `config_change.RESUMABLE`,
  unless `allow_config_change`, which keeps the old file as config.previous-<UTC time>.json.
  An unreadable config.json is refused and left untouched."""
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.exists(path):
    return config
  stored = workdir_lib.read_config(workdir)
  changes = config_change.changed_keys(stored, config)
  if changes and not allow_config_change:
    raise UserError(f"{workdir} was trained with another config ({len(changes)} changed "
                    f"key(s): {config_change.describe(changes)}); use a new --workdir, or "
                    "--allow_config_change to train on with the new config")
  if changes and jax.process_index() == 0:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    kept = os.path.join(workdir, f"config.previous-{stamp}.json")
    shutil.copyfile(path, kept)
    logging.warning("config changed in %d key(s) (%s); the old config is kept in %s",
                    len(changes), config_change.describe(changes), kept)
  return config_change.keep_resolved(stored, config)


def _run_locked(config: ml_collections.ConfigDict, workdir: str,
                allow_config_change: bool) -> dict:
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
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  stored = _read_bytes(path)
  config = keep_config(config, workdir, allow_config_change)
  workdir_lib.write_config(config, workdir)
  rewritten = stored is not None and _read_bytes(path) != stored
  try:
    if train_autoencoder:
      _announce(config, AUTOENCODER, workdir)
      autoencoder_stage.run_autoencoder(config, workdir, mesh)
      _report(AUTOENCODER, workdir)
    for name in names:
      _announce(config, name, workdir)
      diffusion_stage.run_diffusion(config, name, workdir, mesh)
      _report(name, workdir)
  except ConfigMismatch as e:
    # An --allow_config_change that the checkpoints do not fit: the workdir keeps the config
    # its checkpoints were trained with, so sampling and a plain resume still work.
    if not rewritten or jax.process_index() != 0:
      raise
    with files.replaced(path) as tmp:
      with open(tmp, "wb") as f:
        f.write(stored)
    raise ConfigMismatch(f"{e}; {path} is back to the config they were trained with") from e
  summary = workdir_lib.read_summary(workdir)
  console.say(f"done: {os.path.join(workdir, 'summary.json')}")
  return summary


def _read_bytes(path: str):
  """The file's bytes, or None when there is none."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    return None


def _announce(config, stage: str, workdir: str) -> None:
  train = config.train if stage == AUTOENCODER else config[stage].train
  what = "autoencoder" if stage == AUTOENCODER else f"{config[stage].codec}-space diffusion"
  console.say(f"== {stage}: {what}, {train.num_steps} steps of batch {train.batch_size} -> "
              f"{workdir_lib.stage_dir(workdir, stage)}")


def _report(stage: str, workdir: str) -> None:
  """The stage-boundary line: what was trained, where it was saved, its headline metric."""
  s = workdir_lib.read_summary(workdir).get(stage, {})
  parts = [f"{stage}: {s.get('steps', '?')} steps, checkpoints in "
           f"{workdir_lib.checkpoint_dir(workdir, stage)}"]
  if "test_psnr" in s:
    parts.append(f"test PSNR {s['test_psnr']:.2f} dB, SSIM {s.get('test_ssim', float('nan')):.3f}"
                 f" on {s.get('test_examples', '?')} held-out images")
  if "sr_psnr" in s:
    parts.append(f"SR {s['sr_psnr']:.2f} dB vs bicubic {s['bicubic_psnr']:.2f} dB on "
                 f"{s.get('sr_eval_images', '?')} held-out images")
  if "final_loss" in s:
    parts.append(f"final loss {s['final_loss']:.4g}")
  if s.get("sample_grid"):
    parts.append(f"samples {os.path.join(workdir, s['sample_grid'])}")
  console.say("; ".join(parts))
