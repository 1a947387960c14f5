"""Per-device memory of the train state and step time, for FSDP meshes of 1, 2, 4 and 8 devices.

  python -m benchmarks.memory [--preset=default] [--devices=1,2,4,8] [--steps=3]
      [--fsdp_min_size=16384] [--tensor=1]

Runs the stage-1 (autoencoder + PatchGAN) step of `configs/autoencoder.py:<preset>` on meshes
data=1 x fsdp=N x tensor (fake CPU devices when no accelerator: the script asks XLA for 8).
For each mesh it prints, per device: the bytes of parameters + optimizer state (+ EMA) from
their shardings, the compiled step's `memory_analysis()` (arguments, outputs, temporaries), and
the seconds per step. The global batch stays `train.batch_size` on every mesh.
"""
import argparse
import os
import pathlib
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
ROOT = pathlib.Path(__file__).parents[1]

from ldm_jax import platform  # noqa: E402

platform.configure()

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import autoencoder as ae_configs  # noqa: E402
from ldm_jax import sharding  # noqa: E402
from ldm_jax.checkpoint import abstract_like  # noqa: E402
from ldm_jax.train import loop  # noqa: E402
from ldm_jax.train.autoencoder_task import AutoencoderTask  # noqa: E402


def per_device_bytes(abstract, shardings) -> int:
  """Bytes one device holds of `abstract` under `shardings` (the largest shard per leaf)."""
  total = 0
  for leaf, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    total += int(np.prod(sh.shard_shape(leaf.shape), dtype=np.int64)) * leaf.dtype.itemsize
  return total


def measure(config, n: int, tensor: int, steps: int) -> dict:
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=n // tensor,
                                                           tensor=tensor)),
                            jax.devices()[:n])
  task = AutoencoderTask(config)
  abstract = jax.eval_shape(task.init_state, jax.random.key(0))
  shardings = sharding.state_shardings(abstract, mesh, *sharding.partition_rules(config.mesh))
  state = loop.init_state(task, jax.random.key(0), shardings)
  s, ch, b = config.data.image_size, config.data.channels, config.train.batch_size
  compiler = loop.StepCompiler(task, abstract_like(abstract, shardings), shardings,
                               loop.batch_spec(b, s, ch, mesh), mesh)
  step = compiler(True)
  mem = step.memory_analysis()
  batch = sharding.put_batch(
      {"image": np.random.default_rng(0).uniform(-1, 1, (b, s, s, ch)).astype(np.float32),
       "label": np.zeros(b, np.int32)}, sharding.batch_sharding(mesh))
  rng = sharding.replicate(jax.random.key(0), mesh)
  state, *_ = step(state, batch, rng)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(steps):
    state, *_ = step(state, batch, rng)
  jax.block_until_ready(state)
  return {"devices": n, "fsdp": n // tensor, "tensor": tensor,
          "state_mib": per_device_bytes(abstract, shardings) / 2 ** 20,
          "args_mib": mem.argument_size_in_bytes / 2 ** 20,
          "out_mib": mem.output_size_in_bytes / 2 ** 20,
          "temp_mib": mem.temp_size_in_bytes / 2 ** 20,
          "sec": (time.perf_counter() - t) / steps}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="default")
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--fsdp_min_size", type=int, default=2 ** 14)
  p.add_argument("--tensor", type=int, default=1)
  args = p.parse_args()
  config = ae_configs.get_config(args.preset)
  config.mesh.fsdp_min_size = args.fsdp_min_size
  total = jax.eval_shape(AutoencoderTask(config).init_state, jax.random.key(0))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(total.params))
  print(f"autoencoder:{args.preset}  {n_params / 1e6:.2f} M parameters, global batch "
        f"{config.train.batch_size}, fsdp_min_size {args.fsdp_min_size}, "
        f"{jax.device_count()} {jax.default_backend()} devices")
  print("devices  fsdp  tensor  state MiB/dev  step args MiB  outputs MiB  temps MiB  s/step")
  base = None
  for n in (int(d) for d in args.devices.split(",")):
    r = measure(config, n, args.tensor if n >= args.tensor else 1, args.steps)
    base = base or r["state_mib"]
    print(f"{r['devices']:7d}  {r['fsdp']:4d}  {r['tensor']:6d}  {r['state_mib']:13.2f}  "
          f"{r['args_mib']:13.2f}  {r['out_mib']:11.2f}  {r['temp_mib']:9.2f}  "
          f"{r['sec']:6.3f}   (state x{base / r['state_mib']:.2f} smaller)", flush=True)


if __name__ == "__main__":
  main()
