"""Pixel-space vs cascaded vs latent diffusion, trained from scratch on the same data at the
same CPU-time budget, then measured side by side in one run on one machine.

  python benchmarks/compare.py --budget_minutes=40 --out=runs/compare
  python benchmarks/compare.py --preset=smoke --budget_minutes=0.5 --out=/tmp/compare  # check

Each system (configs/ldm.py, configs/pixel.py, configs/cascade.py, preset `--preset`) gets
`--budget_minutes` of training, split over its stages by STAGE_SHARES: each stage's step time
is measured first (compiled, warm) and its num_steps set to fill its share. Then, for each
system, at `--points` evenly spaced fractions of every stage's steps (the curve; an LDM's
autoencoder is always the final one, which its diffusion stage was trained on):
  class accuracy of generated samples (balanced over classes) under the project's classifier
  and the Frechet distance of its features to the test split's, beside the real data's values;
and at the end: parameters per model, training FLOPs per image (XLA cost analysis of the
compiled step) and training images/s per stage, sampling FLOPs and seconds per image at the
same output size and sampler steps, the train vs held-out denoising-loss gap of every
diffusion stage, and for the cascade, error propagation: base samples corrupted in controlled
ways (a blotch, noise, a wrong class) followed through the super-resolution stages, at several
augmentation levels, and (with --no_aug_control) through SR stages trained without
noise-conditioning augmentation.

Writes into --out: compare.json, compare.md (tables), quality_vs_time.png, samples.png,
error_propagation.png, and the workdirs (re-running resumes; finished stages are not
retrained and keep their measured times).
"""
import argparse
import copy
import json
import os
import shutil
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))
from ldm_jax import platform  # noqa: E402

platform.configure()
platform.quiet_library_logs()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ldm_jax import codecs, load, sharding  # noqa: E402
from ldm_jax import data as data_lib  # noqa: E402
from ldm_jax import workdir as workdir_lib  # noqa: E402
from ldm_jax.checkpoint import Checkpointer  # noqa: E402
from ldm_jax.config_schema import AUTOENCODER  # noqa: E402
from ldm_jax.evaluation.classifier import train_judge  # noqa: E402
from ldm_jax.evaluation.metrics import frechet_distance  # noqa: E402
from ldm_jax.models.builders import build_autoencoder  # noqa: E402
from ldm_jax.pipeline import CascadePipeline, load_stages  # noqa: E402
from ldm_jax.train import checks, stage_autoencoder, stage_diffusion  # noqa: E402
from ldm_jax.train.autoencoder import AutoencoderTask  # noqa: E402
from ldm_jax.train.diffusion import DiffusionTask  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_report import figures, markdown  # noqa: E402  pylint: disable=g-import-not-at-top

SYSTEMS = ("ldm", "pixel", "cascade")
# Share of a system's budget per stage (the default presets' own proportions).
STAGE_SHARES = {
    "ldm": {AUTOENCODER: 0.4, "ldm": 0.6},
    "pixel": {"pixel": 1.0},
    "cascade": {"base": 0.4, "sr16": 0.3, "sr32": 0.3},
}
AE_GAN_FRACTION = 0.25   # the last quarter of the autoencoder's steps adds the PatchGAN
COMPILE_SECONDS = 45.0   # per stage, before its first step
LOOP_OVERHEAD = 1.1      # data, metrics and checkpoints on top of the compiled step


def log(msg: str) -> None:
  print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def system_config(system: str, preset: str, data_dir: str):
  module = __import__(system)
  config = workdir_lib.migrate(module.get_config(preset))
  if data_dir:
    config.data.data_dir = data_dir
  return config


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _random_batch(config, batch: int, rng) -> dict:
  s, c = config.data.image_size, config.data.channels
  return {"image": rng.uniform(-1, 1, (batch, s, s, c)).astype(np.float32),
          "label": rng.integers(0, 10, batch).astype(np.int32)}


def _init(task):
  """The task's initial state, compiled like the loop compiles it (run-once options)."""
  key = jax.random.key(0)
  return jax.jit(task.init_state).lower(key).compile(platform.run_once_compiler_options())(key)


def _time_steps(fn, state, args, repeats: int) -> tuple:
  state = fn(state, *args)[0]  # warm-up
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(repeats):
    state = fn(state, *args)[0]
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / repeats


def _stage_task(config, stage: str, codec_params=None):
  """The task of a stage with random codec parameters (cost does not depend on them)."""
  codec, params = _codec(config, stage, codec_params)
  return DiffusionTask(config, stage, codec, 10, codec_params=params,
                       lowres_resolution=load.lowres_resolution(config, stage))


def _codec(config, stage: str, codec_params=None):
  if config[stage].codec == "pixel":
    return codecs.PixelCodec(load.stage_resolution(config, stage), config.data.channels), {}
  ae = build_autoencoder(config.autoencoder, config.data.channels)
  if codec_params is None:
    s = config.data.image_size
    codec_params = ae.init(jax.random.key(0), jnp.zeros((1, s, s, config.data.channels)))[
        "params"]
  return codecs.LatentCodec(ae, 1.0, config.data.image_size), codec_params


def measure_step(config, stage: str, repeats: int = 3) -> dict:
  """Seconds per training step (compiled, warm) and training FLOPs per image of a stage."""
  rng = np.random.default_rng(0)
  if stage == AUTOENCODER:
    task = AutoencoderTask(config)
    batch = _random_batch(config, config.train.batch_size, rng)
    out = {}
    for gan in (False, True):
      fn = jax.jit(task.make_train_step(gan), donate_argnums=0)
      state = _init(task)
      compiled = fn.lower(state, batch, jax.random.key(1)).compile()
      out[gan] = (_time_steps(compiled, state, (batch, jax.random.key(1)), repeats),
                  _flops(compiled) / config.train.batch_size)
    sec = (1 - AE_GAN_FRACTION) * out[False][0] + AE_GAN_FRACTION * out[True][0]
    flops = (1 - AE_GAN_FRACTION) * out[False][1] + AE_GAN_FRACTION * out[True][1]
    return {"sec_per_step": sec, "train_flops_per_image": flops,
            "batch_size": int(config.train.batch_size)}
  task = _stage_task(config, stage)
  block = config[stage]
  batch = _random_batch(config, block.train.batch_size, rng)
  fn = jax.jit(task.make_train_step(), donate_argnums=0)
  state = _init(task)
  args = (batch, jax.random.key(1), task.codec_params)
  compiled = fn.lower(state, *args).compile()
  return {"sec_per_step": _time_steps(compiled, state, args, repeats),
          "train_flops_per_image": _flops(compiled) / block.train.batch_size,
          "batch_size": int(block.train.batch_size)}


def plan_steps(config, system: str, budget_s: float, points: int, steps_cap: int) -> dict:
  """Measures each stage and picks its num_steps (a multiple of `points`) to fill its share
  of the budget."""
  plan = {}
  for stage, share in STAGE_SHARES[system].items():
    m = measure_step(config, stage)
    # The loop adds compilation (about a minute per stage here), data and logging to the
    # measured compute: plan with that overhead so the measured wall time fits the budget.
    usable = max(0.0, budget_s * share - COMPILE_SECONDS)
    steps = int(usable / (m["sec_per_step"] * LOOP_OVERHEAD)) // points * points
    steps = max(points * 2, steps)
    if steps_cap:
      steps = min(steps, max(points * 2, steps_cap // points * points))
    plan[stage] = {**m, "num_steps": steps}
    log(f"{system}/{stage}: {m['sec_per_step']:.3f} s/step, "
        f"{m['train_flops_per_image'] / 1e9:.3f} GFLOP/image -> {steps} steps")
  return plan


def apply_plan(config, plan: dict, points: int) -> None:
  """Sets each stage's steps; checkpoints at every curve point are kept."""
  for stage, p in plan.items():
    steps = p["num_steps"]
    train = config.train if stage == AUTOENCODER else config[stage].train
    optim = config.optim if stage == AUTOENCODER else config[stage].optim
    train.update(num_steps=steps, checkpoint_every=steps // points, eval_every=steps,
                 keep_checkpoints=points + 1, log_every=max(1, min(50, steps // 10)))
    optim.warmup_steps = min(int(optim.warmup_steps), max(1, steps // 10))
    if stage == AUTOENCODER:
      config.loss.disc_start = int(steps * (1 - AE_GAN_FRACTION))
      config.train.update(eval_max_examples=1000, num_eval_images=8)
    else:
      config[stage].sample.update(num_samples=16, steps=min(25, config[stage].sample.steps))


def _final_step(workdir: str, stage: str):
  ckpt_dir = workdir_lib.checkpoint_dir(workdir, stage)
  if not os.path.isdir(ckpt_dir):
    return None
  c = Checkpointer(ckpt_dir, async_save=False)
  try:
    return c.latest_step()
  finally:
    c.close()


def train_system(config, workdir: str, times: dict, on_stage=lambda: None) -> None:
  """run(config, workdir) stage by stage, timing each (wall and process CPU seconds); a stage
  already trained keeps the time measured when it was. `on_stage()` after each stage."""
  checks.check_stages(config)
  mesh = sharding.make_mesh(config.mesh)
  workdir_lib.write_config(config, workdir)
  for stage in config.stages:
    num_steps = config.train.num_steps if stage == AUTOENCODER else config[stage].train.num_steps
    if _final_step(workdir, stage) == num_steps and stage in times:
      continue
    wall, cpu = time.perf_counter(), time.process_time()
    if stage == AUTOENCODER:
      stage_autoencoder.run_autoencoder(config, workdir, mesh)
    else:
      stage_diffusion.run_diffusion(config, stage, workdir, mesh)
    times[stage] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    on_stage()
    log(f"trained {workdir}/{stage}: {times[stage]['wall_s']:.0f} s")


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def load_pipeline(config, workdir: str, fraction: float):
  """The system's sampler with every diffusion stage at `fraction` of its steps."""
  names = workdir_lib.diffusion_stages(config)
  return load_stages(config, workdir, names, {
      n: int(round(config[n].train.num_steps * fraction)) for n in names})


def generate(pipe, labels: np.ndarray, args, seed: int = 0) -> tuple:
  """Float images in [-1, 1] for `labels`, in batches; (images, seconds per image)."""
  out, start = [], time.perf_counter()
  for i in range(0, len(labels), args.batch):
    part = labels[i:i + args.batch]
    if len(part) < args.batch:  # one batch shape: one compiled sampler
      part = np.concatenate([part, np.zeros(args.batch - len(part), part.dtype)])
    images = pipe.sample(args.batch, sampler="ddim", steps=args.steps, guidance=args.guidance,
                         seed=seed + i, labels=part, as_uint8=False)
    out.append(np.asarray(images)[:len(labels[i:i + args.batch])])
  return np.concatenate(out), (time.perf_counter() - start) / len(labels)


def quality(pipe, judge, test_features, per_class: int, args) -> dict:
  labels = np.repeat(np.arange(10), per_class).astype(np.int32)
  images, sec = generate(pipe, labels, args)
  return {"class_accuracy": float((judge.predict(images) == labels).mean()),
          "frechet_distance": frechet_distance(judge.features(images), test_features),
          "num_samples": int(len(labels)), "sec_per_image": sec, "images": images,
          "labels": labels}


def sampling_flops(pipe, args) -> float:
  """FLOPs per image of sampling: `steps` guided denoiser calls (a doubled batch) and the
  codec's decoder, from XLA's cost analysis of each compiled piece (a scan's cost is not
  multiplied by its trip count, so the chain is counted per step)."""
  stages = pipe.stages if isinstance(pipe, CascadePipeline) else [pipe]
  total, b = 0.0, 2
  for st in stages:
    shape = (2 * b,) + st.latent_shape
    cond = st.condition(2 * b, labels=np.zeros(2 * b, np.int32))
    if st.is_super_resolution:
      cond = {**cond, "lowres": jnp.zeros(shape), "aug_level": jnp.zeros((2 * b,), jnp.int32)}
    denoise = jax.jit(lambda p, x, t, c, st=st: st.model(p, x, t, c))
    total += args.steps * _flops(denoise.lower(st.params, jnp.zeros(shape),
                                               jnp.zeros((2 * b,), jnp.int32), cond).compile())
    decode = jax.jit(lambda p, z, st=st: st.codec.decode(p, z))
    total += _flops(decode.lower(st.codec_params, jnp.zeros((b,) + st.latent_shape)).compile())
  return total / b


def real_images(config, split: str, count: int) -> tuple:
  source = data_lib.make_source(config.data, split)
  batches = data_lib.eval_batches(source, global_batch=min(count, 500),
                                  image_size=config.data.image_size,
                                  channels=config.data.channels, max_examples=count)
  parts = [(b["image"][b["mask"] > 0], b["label"][b["mask"] > 0]) for b in batches]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def loss_gap(config, workdir: str, train_set, test_set, args) -> dict:
  """Mean conditional denoising loss of each diffusion stage (final parameters) on training
  images and on held-out images, with the same timesteps and noise for both."""
  out = {}
  for name in workdir_lib.diffusion_stages(config):
    parts = load.load_stage(config, workdir, name)
    task = DiffusionTask(config, name, parts.codec, 10, codec_params=parts.codec_params,
                         lowres_resolution=load.lowres_resolution(config, name))
    fn = jax.jit(task.denoising_loss)
    losses = {}
    for split, (x, y) in (("train", train_set), ("held_out", test_set)):
      total, count = 0.0, 0
      for i in range(0, len(x) - args.batch + 1, args.batch):
        for r in range(args.loss_repeats):
          batch = {"image": x[i:i + args.batch], "label": y[i:i + args.batch].astype(np.int32)}
          total += float(fn(parts.params, batch, jax.random.key(1000 * r + i),
                            parts.codec_params))
          count += 1
      losses[split] = total / max(count, 1)
    out[name] = {**losses, "gap": losses["held_out"] - losses["train"],
                 "ratio": losses["held_out"] / losses["train"]}
  return out


def corrupt(base: np.ndarray, kind: str, rng) -> np.ndarray:
  """Controlled corruptions of base samples [N, h, w, C] in [-1, 1]."""
  x = base.copy()
  n, h = x.shape[0], x.shape[1]
  if kind == "blotch":  # a white square covering 1/16 of the image
    size = max(1, h // 4)
    for i in range(n):
      r, c = rng.integers(0, h - size + 1, 2)
      x[i, r:r + size, c:c + size] = 1.0
  elif kind == "noise":
    x = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  else:
    raise ValueError(kind)
  return x


def error_propagation(pipe: CascadePipeline, judge, args, levels) -> dict:
  """How much of a corruption of the base output survives into the cascade's output.

  survival = |down(out(corrupted base)) - down(out(clean base))| / |corrupted - clean base|
  (L2 at the base resolution, same sampler noise for both runs; 1: carried over whole, 0:
  removed). Wrong class: base samples of class a go through SR stages asked for class b;
  survival is the fraction of outputs the classifier still calls a (vs b)."""
  n = args.propagation_per_class * 10
  labels = np.repeat(np.arange(10), args.propagation_per_class).astype(np.int32)
  base_pipe = pipe.stages[0]
  base = np.asarray(base_pipe.sample(n, sampler="ddim", steps=args.steps,
                                     guidance=args.guidance, seed=7, labels=labels,
                                     as_uint8=False))
  other = (labels + 5) % 10
  base_other = np.asarray(base_pipe.sample(n, sampler="ddim", steps=args.steps,
                                           guidance=args.guidance, seed=8, labels=other,
                                           as_uint8=False))
  rng = np.random.default_rng(0)
  corrupted = {k: corrupt(base, k, rng) for k in ("blotch", "noise")}
  size = base.shape[1]
  results, shown = {}, {}
  kw = dict(sampler="ddim", steps=args.steps, guidance=args.guidance, seed=11)
  for level in levels:
    clean = pipe.sample(n, labels=labels, base_images=base, aug_level=level, as_uint8=False,
                        stage_outputs=True, **kw)
    row = {"final_accuracy_clean": float((judge.predict(clean[-1]) == labels).mean())}
    shown[("clean", level)] = clean
    for kind, bad in corrupted.items():
      outs = pipe.sample(n, labels=labels, base_images=bad, aug_level=level, as_uint8=False,
                         stage_outputs=True, **kw)
      shown[(kind, level)] = outs
      down = np.asarray(codecs.resize(jnp.asarray(outs[-1]), size))
      down_clean = np.asarray(codecs.resize(jnp.asarray(clean[-1]), size))
      num = np.linalg.norm((down - down_clean).reshape(n, -1), axis=1)
      den = np.linalg.norm((bad - base).reshape(n, -1), axis=1)
      row[f"{kind}_survival"] = float(np.mean(num / np.maximum(den, 1e-6)))
      row[f"{kind}_final_accuracy"] = float((judge.predict(outs[-1]) == labels).mean())
    # Wrong class: base of class `other`, SR stages asked for `labels`.
    outs = pipe.sample(n, labels=labels, base_images=base_other, aug_level=level,
                       as_uint8=False, stage_outputs=True, **kw)
    shown[("wrong_class", level)] = outs
    pred = judge.predict(outs[-1])
    row["wrong_class_survival"] = float((pred == other).mean())
    row["wrong_class_corrected"] = float((pred == labels).mean())
    results[f"aug_{level:g}"] = row
    log(f"error propagation at aug level {level:g}: {row}")
  return results, shown, (base, corrupted, base_other)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--budget_minutes", type=float, default=40.0,
                 help="training minutes per system (split over its stages)")
  p.add_argument("--out", required=True)
  p.add_argument("--preset", default="default", choices=["default", "smoke"])
  p.add_argument("--data_dir", default="", help="TFDS data dir (config.data.data_dir)")
  p.add_argument("--systems", default=",".join(SYSTEMS))
  p.add_argument("--points", type=int, default=4, help="points of the quality curve")
  p.add_argument("--samples_per_class", type=int, default=100, help="final point")
  p.add_argument("--curve_per_class", type=int, default=20, help="earlier points")
  p.add_argument("--steps", type=int, default=50, help="DDIM steps for every system")
  p.add_argument("--guidance", type=float, default=3.0)
  p.add_argument("--batch", type=int, default=100, help="sampling / loss batch")
  p.add_argument("--loss_images", type=int, default=1000)
  p.add_argument("--loss_repeats", type=int, default=2)
  p.add_argument("--propagation_per_class", type=int, default=10)
  p.add_argument("--aug_levels", default="0,0.1,0.3")
  p.add_argument("--no_aug_control", action=argparse.BooleanOptionalAction, default=True,
                 help="also train the cascade's SR stages without augmentation")
  p.add_argument("--classifier_epochs", type=int, default=2)
  p.add_argument("--steps_cap", type=int, default=0, help="most steps per stage (0: none)")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  systems = [s for s in args.systems.split(",") if s]
  times_path = os.path.join(args.out, "train_times.json")
  times = json.load(open(times_path, encoding="utf-8")) if os.path.exists(times_path) else {}
  budget_s = args.budget_minutes * 60

  def save_times():
    with open(times_path, "w", encoding="utf-8") as f:
      json.dump(times, f, indent=2)

  configs, plans = {}, {}
  for system in systems:  # a resumed comparison keeps its plan
    configs[system] = system_config(system, args.preset, args.data_dir)
    plans[system] = times.get(f"{system}_plan") or plan_steps(
        configs[system], system, budget_s, args.points, args.steps_cap)
    apply_plan(configs[system], plans[system], args.points)
    times[f"{system}_plan"] = plans[system]
    save_times()
  for system in systems:
    t = times.setdefault(system, {})
    train_system(configs[system], os.path.join(args.out, system), t, save_times)
  control = None
  if args.no_aug_control and "cascade" in systems:
    control = copy.deepcopy(configs["cascade"])
    control_dir = os.path.join(args.out, "cascade_noaug")
    for name in workdir_lib.diffusion_stages(control):
      if control[name].lowres.stage:
        control[name].lowres.update(aug_max=0.0, sample_aug_level=0.0)
    base = control.stages[0]
    if not os.path.isdir(os.path.join(control_dir, base)):
      shutil.copytree(os.path.join(args.out, "cascade", base), os.path.join(control_dir, base))
    t = times.setdefault("cascade_noaug", {base: times["cascade"][base]})
    train_system(control, control_dir, t, save_times)

  log("training the judge (classifier) ...")
  data_cfg = configs[systems[0]].data
  judge = train_judge(data_cfg, epochs=args.classifier_epochs)
  test_features = judge.features(judge.test_images)
  n_real = args.samples_per_class * 10
  train_x, train_y = real_images(configs[systems[0]], data_cfg.train_split,
                                 max(n_real, args.loss_images))
  real = {"classifier_test_accuracy": judge.test_accuracy, "num_images": n_real,
          "frechet_distance_train_vs_test": frechet_distance(judge.features(train_x[:n_real]),
                                                             test_features)}
  log(f"real data: {real}")
  test_set = (judge.test_images[:args.loss_images], judge.test_labels[:args.loss_images])
  train_set = (train_x[:args.loss_images], train_y[:args.loss_images])

  report = {"budget_minutes": args.budget_minutes, "preset": args.preset,
            "guidance": args.guidance, "steps": args.steps, "real": real, "systems": {},
            "command": "python benchmarks/compare.py " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv)}
  samples, shown = {}, {}
  for system in systems:
    config, wd = configs[system], os.path.join(args.out, system)
    t = times[system]
    diff = workdir_lib.diffusion_stages(config)
    fixed = sum(v["wall_s"] for k, v in t.items() if k not in diff)  # the autoencoder
    scaled = sum(t[k]["wall_s"] for k in diff)
    curve = []
    for k in range(1, args.points + 1):
      frac = k / args.points
      pipe = load_pipeline(config, wd, frac)
      per_class = args.samples_per_class if k == args.points else args.curve_per_class
      q = quality(pipe, judge, test_features, per_class, args)
      images, labels = q.pop("images"), q.pop("labels")
      q.update(fraction=frac, train_minutes=(fixed + frac * scaled) / 60)
      curve.append(q)
      log(f"{system} at {frac:.2f} of its steps: {q}")
    samples[system] = (images, labels)
    params = {}
    if AUTOENCODER in config.stages:
      params[AUTOENCODER] = count_params(pipe.codec_params)
      params[AUTOENCODER + " (decoder)"] = count_params(pipe.codec_params["decoder"])
    for st in (pipe.stages if isinstance(pipe, CascadePipeline) else [pipe]):
      params[st.name] = count_params(st.params)
    total = sum(v for k, v in params.items() if "(" not in k)
    ips = {k: plans[system][k]["batch_size"] * plans[system][k]["num_steps"] / t[k]["wall_s"]
           for k in plans[system]}
    report["systems"][system] = {
        "plan": plans[system], "train_times": t, "train_minutes": (fixed + scaled) / 60,
        "train_images_per_sec": ips, "parameters": params, "parameters_total": total,
        "sampling_flops_per_image": sampling_flops(pipe, args), "curve": curve,
        "loss_gap": loss_gap(config, wd, train_set, test_set, args)}
    if system == "cascade":
      levels = [float(v) for v in args.aug_levels.split(",")]
      prop, shown_main, _ = error_propagation(pipe, judge, args, levels)
      report["error_propagation"] = {"trained with augmentation": prop}
      shown.update({k: v for k, v in shown_main.items() if k[1] == levels[-1]})
      if control is not None:
        cpipe = load_pipeline(control, os.path.join(args.out, "cascade_noaug"), 1.0)
        cprop, _, _ = error_propagation(cpipe, judge, args, [0.0])
        report["error_propagation"]["trained without augmentation"] = cprop
  figures(args.out, report["systems"], samples, shown, real)
  with open(os.path.join(args.out, "compare.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, default=float)
  with open(os.path.join(args.out, "compare.md"), "w", encoding="utf-8") as f:
    f.write(markdown(report))
  log(f"wrote {args.out}/compare.md, compare.json and the figures")
  return report


if __name__ == "__main__":
  main()
