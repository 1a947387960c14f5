"""Stage-2 steps/s with the encoder in the step ("encode") vs the latent cache ("cache").

The default LDM preset's stage 2 (configs/ldm.py default: batch 64, 8x8x4 latents of 32x32
Fashion-MNIST, the default UNet) with a randomly initialised autoencoder of the preset's shape;
each measurement runs in a fresh process, the two modes alternating, and drives the loop's own
pieces (the guarded, sharded step from `StepCompiler`, `put_batch`, the batch iterator) for
`--steps` timed steps after `--warmup` steps. The cache is built once (timed) and reused.

  python -m benchmarks.stage2_cache --rounds=3 --steps=30
"""
import argparse
import json
import os
import statistics
import time

from benchmarks import timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(mode: str, steps: int, warmup: int, workdir: str) -> dict:
  from ldm_jax import platform  # pylint: disable=g-import-not-at-top
  platform.configure()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import ldm as ldm_configs  # pylint: disable=g-import-not-at-top
  from ldm_jax import data as data_lib, sharding  # pylint: disable=g-import-not-at-top
  from ldm_jax.checkpoint import abstract_like  # pylint: disable=g-import-not-at-top
  from ldm_jax.models.codecs import LatentCodec  # pylint: disable=g-import-not-at-top
  from ldm_jax.models.builders import build_autoencoder  # pylint: disable=g-import-not-at-top
  from ldm_jax.train import latent_cache  # pylint: disable=g-import-not-at-top
  from ldm_jax.train.diffusion_task import DiffusionTask  # pylint: disable=g-import-not-at-top
  from ldm_jax.train.loop import StepCompiler, batch_spec, init_state  # pylint: disable=g-import-not-at-top
  from ldm_jax.train.autoencoder_stage import train_batches  # pylint: disable=g-import-not-at-top

  config = ldm_configs.get_config("default")
  config.data.data_dir = os.path.join(workdir, "tfds")
  block = config.ldm
  mesh = sharding.make_mesh(config.mesh)
  ae = build_autoencoder(config.autoencoder, config.data.channels)
  ae_params = ae.init(jax.random.key(0), np.zeros((1, 32, 32, 1), np.float32))["params"]
  ae_params = sharding.replicate(ae_params, mesh)
  codec = LatentCodec(ae, 0.9, config.data.image_size)
  source = data_lib.make_source(config.data, config.data.train_split)
  out = {"mode": mode}
  if mode == "cache":
    t0 = time.perf_counter()
    cache = latent_cache.open_or_build(os.path.join(workdir, "ldm"), codec, ae_params, source,
                                       config.data, mesh, block.train.batch_size)
    out["open_or_build_s"] = time.perf_counter() - t0
    batches = latent_cache.CachedBatches(cache, global_batch=block.train.batch_size,
                                         seed=config.seed, random_flip=False).iterate
  else:
    batches = train_batches(config, source, block.train.batch_size)
  task = DiffusionTask(config, "ldm", codec, 10, codec_params=ae_params,
                       cached_latents=mode == "cache")
  rng = jax.random.key(0)
  abstract = jax.eval_shape(task.init_state, rng)
  shardings = sharding.state_shardings(abstract, mesh, *sharding.partition_rules(config.mesh))
  state = init_state(task, rng, shardings)
  constants = sharding.replicate(task.step_constants(), mesh)
  batch_abstract = batch_spec(block.train.batch_size, 32, 1, mesh, task.batch_keys())
  step_fn = StepCompiler(task, abstract_like(abstract, shardings), shardings, batch_abstract,
                         mesh, constants).get(None)
  batch_sh = sharding.batch_sharding(mesh)
  step_rng = sharding.replicate(jax.random.key(1), mesh)
  stream = batches(0)
  for i in range(warmup + steps):
    if i == warmup:
      jax.block_until_ready(state)
      t0 = time.perf_counter()
    batch = sharding.put_batch(next(stream), batch_sh)
    state, metrics, _ = step_fn(state, batch, step_rng, *constants)
  jax.block_until_ready((state, metrics))
  out["steps_per_s"] = steps / (time.perf_counter() - t0)
  stream.close()
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--workdir", default="/tmp/ldm_jax_stage2_cache")
  p.add_argument("--mode", choices=("encode", "cache"), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.mode:
    timing.emit_result(measure(args.mode, args.steps, args.warmup, args.workdir))
    return
  results = {"encode": [], "cache": []}
  for r in range(args.rounds):
    for mode in (("encode", "cache") if r % 2 == 0 else ("cache", "encode")):
      row = timing.run_child([*timing.module_command(__file__), f"--mode={mode}",
                              f"--steps={args.steps}", f"--warmup={args.warmup}",
                              f"--workdir={args.workdir}"],
                             f"round {r + 1} {mode}")
      results[mode].append(row)
      print(json.dumps(row), flush=True)
  for mode, rows in results.items():
    rates = [r["steps_per_s"] for r in rows]
    print(f"{mode}: median {statistics.median(rates):.3f} steps/s "
          f"(min {min(rates):.3f}, max {max(rates):.3f}, n={len(rates)})")
  builds = [r["open_or_build_s"] for r in results["cache"]]
  print(f"cache open_or_build: first {builds[0]:.1f} s, later {builds[1:]}")


if __name__ == "__main__":
  main()
