"""Pixel-space vs cascaded vs latent diffusion, trained from scratch on the same data at the
same CPU-time budget, then measured side by side in one run on one machine.

  python -m benchmarks.compare --budget_minutes=40 --out=runs/compare
  python -m benchmarks.compare --preset=smoke --budget_minutes=0.5 --out=/tmp/compare  # check

Each system (configs/ldm.py, configs/pixel.py, configs/cascade.py, preset `--preset`) gets
`--budget_minutes` of training, split over its stages by STAGE_SHARES (or `--shares`): each
stage's step time is measured first (compiled, warm) and its num_steps set to fill its share. Then, for each
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

This file trains and assembles the report; compare_budget.py times the steps and plans the
budget, compare_quality.py measures the trained systems, compare_report.py draws and writes.
"""
import argparse
import copy
import importlib
import json
import os
import shutil
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
from ldm_jax import platform  # noqa: E402

platform.configure()
platform.quiet_library_logs()
from ldm_jax import sharding  # noqa: E402
from ldm_jax import workdir as workdir_lib  # noqa: E402
from ldm_jax.checkpoint import Checkpointer  # noqa: E402
from ldm_jax.config_schema import AUTOENCODER  # noqa: E402
from ldm_jax.errors import UserError  # noqa: E402
from ldm_jax.evaluation.classifier import train_judge  # noqa: E402
from ldm_jax.evaluation.metrics import frechet_distance  # noqa: E402
from ldm_jax.train import checks, lock  # noqa: E402
from ldm_jax.train import autoencoder_stage
from ldm_jax.train import diffusion_stage
from ldm_jax.train import run as run_lib  # noqa: E402

# The helpers below configure nothing themselves: they come after platform.configure().
# pylint: disable=g-import-not-at-top,g-bad-import-order
from benchmarks.compare_budget import apply_plan, log, parse_shares, plan_steps  # noqa: E402
from benchmarks.compare_quality import (  # noqa: E402
    error_propagation, judge_data, load_pipeline, measure_system, real_images)
from benchmarks.compare_report import figures, markdown  # noqa: E402
# pylint: enable=g-import-not-at-top,g-bad-import-order

SYSTEMS = ("ldm", "pixel", "cascade")


def system_config(system: str, preset: str, data_dir: str, train_split: str = ""):
  module = importlib.import_module(f"configs.{system}")
  config = workdir_lib.migrate(module.get_config(preset))
  if data_dir:
    config.data.data_dir = data_dir
  if train_split:
    config.data.train_split = train_split
  if preset == "smoke":  # the command's check run: no end-of-training SR-vs-bicubic pass
    for stage in config.stages:
      if stage in config and "lowres" in config[stage]:
        config[stage].train.sr_eval_images = 0
  return config


def _final_step(workdir: str, stage: str):
  ckpt_dir = workdir_lib.checkpoint_dir(workdir, stage)
  if not os.path.isdir(ckpt_dir):
    return None
  c = Checkpointer(ckpt_dir, read_only=True)
  try:
    return c.latest_step()
  finally:
    c.close()


def train_system(config, workdir: str, times: dict, on_stage=lambda: None) -> None:
  """run(config, workdir) stage by stage, timing each (wall and process CPU seconds); a stage
  already trained keeps the time measured when it was. `on_stage()` after each stage."""
  checks.check_stages(config)
  mesh = sharding.make_mesh(config.mesh)
  workdir = workdir_lib.ensure_writable(workdir)
  with lock.held(workdir):
    config = run_lib.keep_config(workdir_lib.migrate(config), workdir, allow_config_change=False)
    workdir_lib.write_config(config, workdir)
    _train_stages(config, workdir, mesh, times, on_stage)


def _train_stages(config, workdir: str, mesh, times: dict, on_stage) -> None:
  for stage in config.stages:
    num_steps = config.train.num_steps if stage == AUTOENCODER else config[stage].train.num_steps
    if _final_step(workdir, stage) == num_steps and stage in times:
      continue
    wall, cpu = time.perf_counter(), time.process_time()
    if stage == AUTOENCODER:
      autoencoder_stage.run_autoencoder(config, workdir, mesh)
    else:
      diffusion_stage.run_diffusion(config, stage, workdir, mesh)
    times[stage] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    on_stage()
    log(f"trained {workdir}/{stage}: {times[stage]['wall_s']:.0f} s")


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
  p.add_argument("--classifier_images", type=int, default=0,
                 help="the classifier trains on (and takes its reference features from) the "
                      "first this many images of each split; 0: all (a quick check's knob)")
  p.add_argument("--steps_cap", type=int, default=0, help="most steps per stage (0: none)")
  p.add_argument("--train_split", default="",
                 help="the systems' training split, e.g. a TFDS slice 'train[:1000]' (the "
                      "overfitting runs; '' = the preset's); the judge always uses the whole "
                      "split, the loss gap and memorisation the slice")
  p.add_argument("--shares", default="",
                 help="a stage's share of its system's budget, over STAGE_SHARES: "
                      "'base=0.35,sr16=0.15,sr32=0.5' (each system's shares sum to 1)")
  args = p.parse_args(argv)
  shares = parse_shares(args.shares)
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
    configs[system] = system_config(system, args.preset, args.data_dir, args.train_split)
    planned = times.get(f"{system}_shares", shares[system])
    if planned != shares[system]:
      raise UserError(f"--shares: {args.out} was planned with {system} shares {planned}, "
                      f"not {shares[system]}: use another --out, or the same shares")
    plans[system] = times.get(f"{system}_plan") or plan_steps(
        configs[system], system, budget_s, args.points, args.steps_cap, shares)
    times[f"{system}_shares"] = shares[system]
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
  judge = train_judge(judge_data(data_cfg), epochs=args.classifier_epochs,
                      max_train_images=args.classifier_images,
                      max_test_images=args.classifier_images)
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
            "command": "python -m benchmarks.compare " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv)}
  samples, shown = {}, {}
  for system in systems:
    wd = os.path.join(args.out, system)
    report["systems"][system], samples[system], pipe = measure_system(
        system, configs[system], wd, times[system], plans[system], judge, test_features,
        (train_set, test_set), args)
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
