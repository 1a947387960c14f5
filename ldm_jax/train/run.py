"""Entry point of training: `run(config, workdir)` trains the config's stages in order."""
import os

import ml_collections

from ldm_jax import console, sharding
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
    _announce(config, AUTOENCODER, workdir)
    stage_autoencoder.run_autoencoder(config, workdir, mesh)
    _report(AUTOENCODER, workdir)
  for name in names:
    _announce(config, name, workdir)
    stage_diffusion.run_diffusion(config, name, workdir, mesh)
    _report(name, workdir)
  summary = workdir_lib.read_summary(workdir)
  console.say(f"done: {os.path.join(workdir, 'summary.json')}")
  return summary


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
