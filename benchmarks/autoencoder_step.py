"""Stage-1 train step speed on this machine, with and without ldm_jax.platform's XLA:CPU
convolution flag, measured side by side (each in a fresh subprocess, alternating).

  python -m benchmarks.autoencoder_step [--preset=default] [--steps=10] [--rounds=2]

Prints GFLOP per step (XLA cost analysis), seconds per step and achieved GFLOP/s for both
settings, and the speed ratio.
"""
import argparse
import os
import sys

from benchmarks import timing

CHILD = r"""
import os, sys, time
from benchmarks import timing
if {flag}:
  from ldm_jax import platform; platform.configure()
import jax, numpy as np
from configs import autoencoder as cfgs
from ldm_jax import sharding
from ldm_jax.checkpoint import abstract_like
from ldm_jax.train.autoencoder_task import AutoencoderTask
from ldm_jax.train.loop import StepCompiler, batch_spec
c = cfgs.get_config({preset!r})
mesh = sharding.make_mesh(c.mesh)
task = AutoencoderTask(c)
abst = jax.eval_shape(task.init_state, jax.random.key(0))
sh = sharding.state_shardings(abst, mesh)
state = jax.jit(task.init_state, out_shardings=sh)(jax.random.key(0))
s, ch, b = c.data.image_size, c.data.channels, c.train.batch_size
step = StepCompiler(task, abstract_like(abst, sh), sh, batch_spec(b, s, ch, mesh), mesh)(True)
batch = sharding.put_batch({{'image': np.random.uniform(-1, 1, (b, s, s, ch)).astype(np.float32),
                            'label': np.zeros(b, np.int32)}}, sharding.batch_sharding(mesh))
rng = jax.random.key(0)
state, *_ = step(state, batch, rng); jax.block_until_ready(state)
t = time.perf_counter()
for _ in range({steps}):
  state, *_ = step(state, batch, rng)
jax.block_until_ready(state)
dt = (time.perf_counter() - t) / {steps}
timing.emit_result({{'gflop': timing.xla_flops(step) / 1e9, 'sec': dt}})
"""


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="default")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--rounds", type=int, default=2)
  args = p.parse_args()
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  results = {True: [], False: []}
  for _ in range(args.rounds):
    for flag in (True, False):
      code = CHILD.format(root=root, flag=flag, preset=args.preset, steps=args.steps)
      results[flag].append(timing.run_child([sys.executable, "-c", code],
                                            f"preset {args.preset}, flag {flag}", env=env))
  for flag, name in ((True, "Eigen convolutions (ldm_jax.platform)"), (False, "XLA default")):
    best = min(r["sec"] for r in results[flag])
    gflop = results[flag][0]["gflop"]
    print(f"{name:40s} {gflop:7.1f} GFLOP/step  {best:6.3f} s/step  {gflop / best:6.1f} GFLOP/s")
  ratio = min(r["sec"] for r in results[False]) / min(r["sec"] for r in results[True])
  print(f"speed-up from the flag: {ratio:.2f}x (GAN step, preset {args.preset})")


if __name__ == "__main__":
  main()
