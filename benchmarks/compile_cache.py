"""Cold and warm compile times with the persistent compilation cache (ldm_jax.platform).

  python -m benchmarks.compile_cache [--preset=default] [--rounds=1]

Each round starts an empty cache directory and runs two fresh processes on it: the first
compiles everything (cold, and writes the cache), the second finds it (warm). Each process
compiles the stage-2 train step of `configs/ldm.py:<preset>` exactly as the training loop
does (`StepCompiler`: shardings, donation) and the pipeline's DDIM-50 sampler for 64 images
with guidance (x_T, the scan, the decoder; compile time = first call - a second call).
Prints seconds for both, per process.
"""
import argparse
import json
import os
import sys
import tempfile

from benchmarks import timing

CHILD = r"""
import os, sys, time
from benchmarks import timing
from ldm_jax import platform; platform.configure()
import jax, jax.numpy as jnp
from configs import ldm as cfgs
from ldm_jax import sharding
from ldm_jax.models import codecs
from ldm_jax.checkpoint import abstract_like
from ldm_jax.models.builders import build_autoencoder
from ldm_jax.sampling import DiffusionPipeline
from ldm_jax.train.diffusion_task import DiffusionTask
from ldm_jax.train.loop import StepCompiler, batch_spec
c = cfgs.get_config({preset!r})
s, ch = c.data.image_size, c.data.channels
ae = build_autoencoder(c.autoencoder, ch)
opts = platform.run_once_compiler_options()
ae_params = jax.jit(ae.init, compiler_options=opts)(jax.random.key(0), jnp.zeros((1, s, s, ch)))
codec = codecs.LatentCodec(ae, 1.0, s)
mesh = sharding.make_mesh(c.mesh)
task = DiffusionTask(c, 'ldm', codec, 10, codec_params=ae_params['params'])
abst = jax.eval_shape(task.init_state, jax.random.key(0))
sh = sharding.state_shardings(abst, mesh)
state = jax.jit(task.init_state, out_shardings=sh, compiler_options=opts)(jax.random.key(0))
consts = sharding.replicate(task.step_constants(), mesh)
b = c.ldm.train.batch_size
t0 = time.perf_counter()
compiler = StepCompiler(task, abstract_like(abst, sh), sh, batch_spec(b, s, ch, mesh),
                        mesh, consts)
step = compiler(None)
train_s = time.perf_counter() - t0
parts = compiler.timings[None]
pipe = DiffusionPipeline(codec=codec, codec_params=ae_params['params'], model=task.model,
                         params=state.eval_params(), schedule=task.schedule,
                         class_names=[str(i) for i in range(10)])
smp = c.ldm.sample
kw = dict(sampler='ddim', steps=smp.steps, guidance=smp.guidance)
t0 = time.perf_counter(); pipe.sample(smp.num_samples, seed=0, **kw)
first = time.perf_counter() - t0
t0 = time.perf_counter(); pipe.sample(smp.num_samples, seed=1, **kw)
warm = time.perf_counter() - t0
timing.emit_result(dict(train_step_compile_s=train_s,
                        train_step_trace_lower_s=parts['trace_lower_s'],
                        train_step_xla_s=parts['compile_s'], sampler_first_s=first,
                        sampler_run_s=warm, sampler_compile_s=first - warm))
"""


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="default")
  p.add_argument("--rounds", type=int, default=1)
  args = p.parse_args()
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
  code = CHILD.format(root=root, preset=args.preset)
  rows = []
  for r in range(args.rounds):
    with tempfile.TemporaryDirectory(prefix="ldm_jax_cache_bench_") as cache:
      env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
      for kind in ("cold", "warm"):
        out = dict(timing.run_child([sys.executable, "-c", code], f"the {kind} process",
                                    env=env), round=r + 1, cache=kind)
        rows.append(out)
        print(f"round {r + 1} {kind}: train step compile {out['train_step_compile_s']:6.1f} s "
              f"(trace + lower {out['train_step_trace_lower_s']:.1f} s, XLA compile or cache "
              f"load {out['train_step_xla_s']:.1f} s),"
              f" sampler compile {out['sampler_compile_s']:6.1f} s "
              f"(first call {out['sampler_first_s']:.1f} s, run {out['sampler_run_s']:.1f} s)",
              flush=True)
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
