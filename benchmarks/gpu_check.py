"""Accelerator figures for docs/BENCHMARKS.md (run by benchmarks/gpu_check.sh).

  python -m benchmarks.gpu_check [--dry_run] [--out=runs/gpu_check]

On the default device (one GPU), each in this process, one after another:
  train_default   stage-2 train step of configs/ldm.py:default (bf16 compute), as the loop
                  compiles it (StepCompiler: shardings, donation), batch 64 -> 256 on a GPU
  train_cin256    the same for configs/ldm.py:cin256's UNet and KL-f4 first stage (400M UNet,
                  256x256 images -> 64x64x3 latents, encoded inside the step), batch 32
  sampler         the default preset's pipeline: DDIM-50, guidance 3 (images/s)
  sd_step         Stable Diffusion 1.x UNet (860M, from the diffusers config through the
                  converter's mapping), one guided step: batch 2, 64x64x4, 77x768 context, bf16
For each train step: seconds, XLA's FLOP count, achieved TFLOP/s and MFU against the device's
peak dense bf16 rate (`--peak_tflops`, default from the device kind) and against a measured
bf16 matmul. `--dry_run` shrinks every shape so that the whole check runs on a CPU in a few
minutes (it checks the code path, not the speed).
"""
import argparse
import json
import os
import pathlib
import sys
import time

from benchmarks import timing

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Peak dense bf16 TFLOP/s by device kind (vendor data sheets, SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0,
                    "V100": 125.0}


def _peak_from_kind(kind: str) -> float:
  for name, tflops in PEAK_BF16_TFLOPS.items():
    if name.lower() in kind.lower():
      return tflops
  return 0.0


def _time(fn, reps: int) -> float:
  """Median seconds of `reps` calls of fn after one warm-up, each waited for."""
  import jax  # pylint: disable=g-import-not-at-top
  return timing.upper_median(timing.timed(lambda: jax.block_until_ready(fn()), reps)[1])


def matmul_peak(dry: bool) -> float:
  """Measured bf16 matmul TFLOP/s (8192^2; 512^2 f32 in a dry run)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n, dtype = (512, jnp.float32) if dry else (8192, jnp.bfloat16)
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  return 2 * n ** 3 / _time(lambda: f(a), 5) / 1e12


def train_step(preset: str, batch: int, dry: bool, reps: int) -> dict:
  """The stage-2 train step of configs/ldm.py:<preset> in bf16, random data and weights."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import ldm as cfgs  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ldm_jax import platform, sharding  # pylint: disable=g-import-not-at-top
  from ldm_jax.models import codecs
  from ldm_jax.checkpoint import abstract_like  # pylint: disable=g-import-not-at-top
  from ldm_jax.models.builders import build_autoencoder  # pylint: disable=g-import-not-at-top
  from ldm_jax.train.diffusion_task import DiffusionTask  # pylint: disable=g-import-not-at-top
  from ldm_jax.train.loop import StepCompiler, batch_spec  # pylint: disable=g-import-not-at-top
  c = cfgs.get_config(preset)
  c.ldm.train.compute_dtype = "bfloat16"
  c.mesh.data = 1  # one device
  if dry:  # the same code path at a size a CPU runs in seconds
    c.data.image_size = min(c.data.image_size, 32)
    c.autoencoder.update(ch=min(c.autoencoder.ch, 16))
    c.ldm.unet.update(model_channels=min(c.ldm.unet.model_channels, 32), num_res_blocks=1,
                      num_head_channels=min(c.ldm.unet.get("num_head_channels", 32), 16))
    c.autoencoder.update(num_res_blocks=1)
  s, ch = c.data.image_size, c.data.channels
  ae = build_autoencoder(c.autoencoder, ch)
  opts = platform.run_once_compiler_options()
  ae_params = jax.jit(ae.init, compiler_options=opts)(jax.random.key(0),
                                                       jnp.zeros((1, s, s, ch)))["params"]
  codec = codecs.LatentCodec(ae, 1.0, s)
  mesh = sharding.make_mesh(c.mesh)
  task = DiffusionTask(c, "ldm", codec, 1000 if preset == "cin256" else 10,
                       codec_params=ae_params)
  abst = jax.eval_shape(task.init_state, jax.random.key(0))
  sh = sharding.state_shardings(abst, mesh)
  state = jax.jit(task.init_state, out_shardings=sh, compiler_options=opts)(jax.random.key(0))
  consts = sharding.replicate(task.step_constants(), mesh)
  t0 = time.perf_counter()
  step = StepCompiler(task, abstract_like(abst, sh), sh, batch_spec(batch, s, ch, mesh), mesh,
                      consts, opts if dry else None)(None)
  compile_s = time.perf_counter() - t0
  rng = np.random.default_rng(0)
  batch_np = {"image": rng.uniform(-1, 1, (batch, s, s, ch)).astype(np.float32),
              "label": rng.integers(0, 10, batch).astype(np.int32)}
  data = sharding.put_batch(batch_np, sharding.batch_sharding(mesh))
  key = sharding.replicate(jax.random.key(1), mesh)
  holder = [state]

  def call():
    holder[0], metrics, _ = step(holder[0], data, key, *consts)
    return metrics

  sec = _time(call, reps)
  flops = timing.xla_flops(step)
  params = sum(x.size for x in jax.tree.leaves(abst.params))
  return dict(preset=preset, batch=batch, image=s, latent=list(codec.shape),
              unet_params_m=params / 1e6, compile_s=compile_s, sec=sec, tflop=flops / 1e12,
              tflops=flops / sec / 1e12)


def sampler(num_samples: int, steps: int, dry: bool) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import ldm as cfgs  # pylint: disable=g-import-not-at-top
  from ldm_jax import platform  # pylint: disable=g-import-not-at-top
  from ldm_jax.models import codecs
  from ldm_jax.models.builders import build_autoencoder  # pylint: disable=g-import-not-at-top
  from ldm_jax.sampling import DiffusionPipeline  # pylint: disable=g-import-not-at-top
  from ldm_jax.train.diffusion_task import DiffusionTask  # pylint: disable=g-import-not-at-top
  c = cfgs.get_config("default")
  if dry:
    c.ldm.unet.update(model_channels=32, num_head_channels=16, num_res_blocks=1)
  s, ch = c.data.image_size, c.data.channels
  ae = build_autoencoder(c.autoencoder, ch)
  opts = platform.run_once_compiler_options()
  ae_params = jax.jit(ae.init, compiler_options=opts)(jax.random.key(0),
                                                       jnp.zeros((1, s, s, ch)))["params"]
  codec = codecs.LatentCodec(ae, 1.0, s)
  task = DiffusionTask(c, "ldm", codec, 10, codec_params=ae_params)
  params = jax.jit(task.init_state, compiler_options=opts)(jax.random.key(0)).eval_params()
  pipe = DiffusionPipeline(codec=codec, codec_params=ae_params, model=task.model, params=params,
                           schedule=task.schedule, class_names=[str(i) for i in range(10)])
  kw = dict(sampler="ddim", steps=steps, guidance=3.0)
  t0 = time.perf_counter()
  pipe.sample(num_samples, seed=0, **kw)
  first = time.perf_counter() - t0
  sec = _time(lambda: pipe.sample(num_samples, seed=1, as_uint8=False, **kw), 2)
  return dict(num_samples=num_samples, steps=steps, first_call_s=first, sec=sec,
              images_per_s=num_samples / sec)


def sd_step(dry: bool, reps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import ldm as cfgs  # pylint: disable=g-import-not-at-top
  from ldm_jax import platform  # pylint: disable=g-import-not-at-top
  from ldm_jax.convert import diffusers_models as dm  # pylint: disable=g-import-not-at-top
  from ldm_jax.models.builders import build_unet  # pylint: disable=g-import-not-at-top
  config = dict(_class_name="UNet2DConditionModel", sample_size=64, cross_attention_dim=768,
                attention_head_dim=8, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280])
  size, ctx_len = 64, 77
  if dry:
    config.update(block_out_channels=[32, 64, 64, 64], cross_attention_dim=32, norm_num_groups=8)
    size, ctx_len = 16, 7
  cfg, _ = dm.unet_config_from_diffusers(config)
  stage = cfgs.ldm_block()
  stage.unet.update(cfg)
  stage.conditioning.kind = "text"
  unet = build_unet(stage, 4, 0, dtype=jnp.bfloat16)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (2, size, size, 4))
  ctx = jax.random.normal(keys[1], (2, ctx_len, config["cross_attention_dim"]))
  t = jnp.array([500, 500])
  params = jax.jit(lambda k: unet.init(k, x[:1], t[:1], context=ctx[:1]),
                   compiler_options=platform.run_once_compiler_options())(keys[2])["params"]
  t0 = time.perf_counter()
  fn = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, context=c)).lower(
      params, x, t, ctx).compile(platform.run_once_compiler_options() if dry else None)
  compile_s = time.perf_counter() - t0
  sec = _time(lambda: fn(params, x, t, ctx), reps)
  flops = timing.xla_flops(fn)
  return dict(unet_params_m=sum(p.size for p in jax.tree.leaves(params)) / 1e6,
              compile_s=compile_s, sec=sec, tflop=flops / 1e12, tflops=flops / sec / 1e12)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dry_run", action="store_true", help="tiny shapes, any device (CPU)")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="peak dense bf16 TFLOP/s of the device (default: from its kind)")
  p.add_argument("--only", default="", help="comma-separated: train_default, train_cin256, "
                 "sampler, sd_step")
  p.add_argument("--out", default="", help="folder for gpu_check.json")
  args = p.parse_args()
  from ldm_jax import platform  # pylint: disable=g-import-not-at-top
  platform.configure()
  import jax  # pylint: disable=g-import-not-at-top
  dry = args.dry_run
  device = jax.devices()[0]
  if not dry and device.platform != "gpu":
    sys.exit(f"error: the default JAX device is {device.platform} ({device.device_kind}), not a "
             "GPU; install the cuda extra (benchmarks/gpu_check.sh) or pass --dry_run")
  peak = args.peak_tflops or _peak_from_kind(device.device_kind)
  mm = matmul_peak(dry)
  out = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
             dry_run=dry, peak_bf16_tflops=peak, matmul_tflops=mm)
  print(f"device {device.device_kind} ({device.platform}), jax {jax.__version__}; measured "
        f"matmul {mm:.1f} TFLOP/s, peak {peak or 'unknown'}", flush=True)
  jobs = {
      "train_default": lambda: train_step("default", 4 if dry else 256, dry, 2 if dry else 10),
      "train_cin256": lambda: train_step("cin256", 2 if dry else 32, dry, 2 if dry else 5),
      "sampler": lambda: sampler(8 if dry else 256, 5 if dry else 50, dry),
      "sd_step": lambda: sd_step(dry, 2 if dry else 5),
  }
  names = [n for n in args.only.split(",") if n] or list(jobs)
  for name in names:
    if name not in jobs:
      sys.exit(f"error: --only: unknown check {name!r} (one of {', '.join(jobs)})")
    t0 = time.perf_counter()
    r = jobs[name]()
    if "tflops" in r:
      r["mfu"] = r["tflops"] / peak if peak else None
      r["of_matmul"] = r["tflops"] / mm
    r["wall_s"] = time.perf_counter() - t0
    out[name] = r
    print(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in r.items()), flush=True)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
