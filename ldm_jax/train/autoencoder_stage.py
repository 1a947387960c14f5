"""Stage 1 with its I/O: data, periodic reconstruction grids, test-split PSNR/SSIM."""
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import data as data_lib
from ldm_jax import console, sharding
from ldm_jax import images as image_io
from ldm_jax.train.autoencoder_task import AutoencoderTask
from ldm_jax.train.loop import train_stage
from ldm_jax.train.writers import read_summary, update_summary


def train_batches(config, source, batch_size=None, captions=False):
  d = config.data
  stream = data_lib.BatchStream(
      source, global_batch=batch_size or config.train.batch_size, image_size=d.image_size,
      channels=d.channels, seed=config.seed, random_crop=d.random_crop,
      random_flip=d.random_flip, process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=d.num_threads, prefetch=d.prefetch,
      num_workers=d.get('num_workers', 0), captions=captions, worker_init=console.worker_init())
  return stream.iterate


def evaluation_batches(config, source, max_examples=None):
  d = config.data
  return data_lib.eval_batches(
      source, global_batch=config.train.eval_batch_size, image_size=d.image_size,
      channels=d.channels, process_index=jax.process_index(),
      process_count=jax.process_count(), max_examples=max_examples, num_threads=d.num_threads,
      prefetch=d.prefetch, num_workers=d.get('num_workers', 0), worker_init=console.worker_init())


def _load_lpips(config):
  path = config.loss.lpips_weights
  if not path or config.loss.perceptual_weight <= 0:
    return None
  from ldm_jax.losses import lpips  # pylint: disable=g-import-not-at-top
  return lpips.make_lpips_fn(path)


def evaluate_autoencoder(task, params, config, source, mesh) -> dict:
  """Test-split PSNR and SSIM of posterior-mode reconstructions (images in [0, 1])."""
  sharding.check_batch_size(config.train.eval_batch_size, mesh, "train.eval_batch_size")
  batch_sh = sharding.batch_sharding(mesh)
  step = jax.jit(task.eval_step, out_shardings=sharding.replicated(mesh))
  totals = {"psnr": 0.0, "ssim": 0.0, "count": 0.0}
  limit = config.train.eval_max_examples or None
  for batch in evaluation_batches(config, source, limit):
    out = step(params, sharding.put_batch(batch, batch_sh))
    for k in totals:
      totals[k] += float(out[k])
  n = max(totals["count"], 1.0)
  return {"test_psnr": totals["psnr"] / n, "test_ssim": totals["ssim"] / n,
          "test_examples": int(totals["count"])}


def run_autoencoder(config: ml_collections.ConfigDict, workdir: str, mesh):
  """Stage 1. Returns (task, final state); the test metrics are merged into summary.json."""
  stage_dir = os.path.join(workdir, "autoencoder")
  task = AutoencoderTask(config, lpips_fn=_load_lpips(config))
  train_source = data_lib.make_source(config.data, config.data.train_split)
  eval_source = data_lib.make_source(config.data, config.data.eval_split)
  n_show = config.train.num_eval_images
  shown = next(iter(evaluation_batches(config, eval_source, n_show)))
  shown = {k: v[:n_show] for k, v in shown.items()}
  recon = jax.jit(task.reconstruct)

  def on_eval(state, step, writer):
    rec = np.asarray(recon(state.eval_params(), jnp.asarray(shown["image"])))
    grid = image_io.make_grid(image_io.interleave_pairs(shown["image"], np.clip(rec, -1, 1)),
                              ncols=8)
    writer.write_images(step, {"reconstructions": grid[None]})
    if jax.process_index() == 0:
      image_io.save_png(os.path.join(stage_dir, f"reconstructions_{step:07d}.png"), grid)

  state, _ = train_stage(task, train_cfg=config.train, seed=config.seed,
                         image_shape=(config.data.image_size, config.data.channels),
                         stage_dir=stage_dir, mesh=mesh,
                         batches=train_batches(config, train_source), on_eval=on_eval,
                         meta={"data_fingerprint": train_source.fingerprint()})
  previous = read_summary(workdir).get("autoencoder", {})
  if previous.get("steps") != int(state.step):  # not yet evaluated at this step
    summary = evaluate_autoencoder(task, state.eval_params(), config, eval_source, mesh)
    summary["steps"] = int(state.step)
    logging.info("autoencoder test metrics: %s", summary)
    update_summary(workdir, "autoencoder", summary)
  return task, state
