"""A trained cascade at its own best settings, and each super-resolution stage against bicubic
upsampling (issue 20): the sanity figures a cascade must pass before it is compared.

  python -m benchmarks.cascade_sr --workdir=runs/cascade --out=runs/cascade_sr.json \\
      [--sr_images=500] [--samples_per_class=100] [--aug_levels=0,0.05,0.1,0.2]

1. Every SR stage upsamples the real downsampled test images (held out) at each augmentation
   level and thresholding rule; PSNR and the project classifier's accuracy (at the judge's
   32x32, every image resized the same bicubic way) beside bicubic's and the real images'.
2. The whole cascade draws `samples_per_class` x 10 balanced samples for each base guidance
   and SR augmentation level (SR stages at their own guidance), scored by class accuracy and
   the classifier Frechet distance to the test split; the real-data value beside it is the
   distance of as many training images.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from ldm_jax import platform  # noqa: E402

platform.configure()

import numpy as np  # noqa: E402

from ldm_jax import workdir as workdir_lib  # noqa: E402
from ldm_jax.evaluation import classifier, run as eval_run, super_resolution  # noqa: E402
from ldm_jax.evaluation.metrics import frechet_distance  # noqa: E402
from ldm_jax.sampling import CascadePipeline, from_workdir  # noqa: E402


def floats(text: str) -> list:
  return [float(v) for v in text.split(",") if v]


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sr_table(pipe: CascadePipeline, judge, args) -> list:
  n = args.sr_images
  images, labels = judge.test_images[:n], judge.test_labels[:n]
  rows = []
  for i, stage in enumerate(pipe.stages[1:], start=1):
    low = pipe.stages[i - 1].latent_shape[0]
    for rule in args.thresholding.split(","):
      for level in floats(args.aug_levels):
        kw = dict(stage.sample_defaults, aug_level=level, thresholding=rule)
        if args.steps:
          kw["steps"] = args.steps[i]

        def up(lr, lab, stage=stage, kw=kw):
          return stage.sample(len(lr), seed=0, lowres=lr, labels=lab, as_uint8=False, **kw)

        t0 = time.perf_counter()
        r = super_resolution.sr_vs_bicubic(up, images, labels, stage.latent_shape[0], low,
                                           batch_size=min(250, n), predict=judge.predict,
                                           judge_resolution=judge.test_images.shape[1])
        r.update(stage=stage.name, aug_level=level, thresholding=rule,
                 steps=kw["steps"], guidance=kw["guidance"],
                 seconds=time.perf_counter() - t0)
        log(f"{stage.name} aug {level:g} {rule}: {super_resolution.describe(r)}")
        rows.append(r)
  return rows


def cascade_table(pipe: CascadePipeline, judge, test_feats, args) -> list:
  labels = np.repeat(np.arange(10), args.samples_per_class).astype(np.int32)
  n_sr = len(pipe.stages) - 1
  grid = ([tuple(float(v) for v in pair.split(":")) for pair in args.settings.split(";")]
          if args.settings else [(g, a) for g in floats(args.base_guidance)
                                 for a in floats(args.cascade_aug_levels)])
  rows = []
  for g, level in grid:  # one row per (base guidance, SR augmentation level)
    out, t0 = [], time.perf_counter()
    for j in range(0, len(labels), args.batch):
      part = labels[j:j + args.batch]
      out.append(np.asarray(pipe.sample(len(part), seed=j, labels=part, as_uint8=False,
                                        guidance=[g] + [None] * n_sr,
                                        aug_level=[level] * n_sr, steps=args.steps)))
    images = np.concatenate(out)
    r = {"base_guidance": g, "aug_level": level, "num_samples": int(len(images)),
         "steps": args.steps, "class_accuracy": float((judge.predict(images) == labels).mean()),
         "frechet_distance": frechet_distance(judge.features(images), test_feats),
         "saturated": float(np.mean(np.abs(images) > 0.999)),
         "sec_per_image": (time.perf_counter() - t0) / len(images)}
    log(f"cascade g={g:g} aug={level:g}: {r}")
    rows.append(r)
    if args.grid_out:
      from ldm_jax import images as image_io  # pylint: disable=g-import-not-at-top
      order = np.argsort(labels, kind="stable")
      keep = np.concatenate([order[labels[order] == c][:8] for c in range(10)])
      grid_img = image_io.make_grid(image_io.to_uint8(images[keep]), ncols=8,
                                    min_width=8 * 96, row_labels=pipe.class_names or None)
      image_io.save_png(f"{args.grid_out}_g{g:g}_aug{level:g}.png", grid_img)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--sr_images", type=int, default=500)
  p.add_argument("--aug_levels", default="0,0.05,0.1,0.2")
  p.add_argument("--thresholding", default="static", help="comma list of rules for SR")
  p.add_argument("--samples_per_class", type=int, default=100)
  p.add_argument("--base_guidance", default="1,3")
  p.add_argument("--cascade_aug_levels", default="0.05,0.1")
  p.add_argument("--settings", default="", help="instead of the guidance x aug grid: "
                 "'g:aug;g:aug', e.g. '3:0.05;3:0.1;1:0.05'")
  p.add_argument("--steps", default=None, help="per-stage steps, e.g. 50,20,20")
  p.add_argument("--batch", type=int, default=250)
  p.add_argument("--grid_out", default="", help="path prefix of an 8-per-class sample grid "
                 "per cascade setting")
  args = p.parse_args()
  if args.steps:
    args.steps = [int(s) for s in args.steps.split(",")]
  config = workdir_lib.read_config(args.workdir)
  pipe = from_workdir(args.workdir)
  if not isinstance(pipe, CascadePipeline):
    sys.exit(f"error: {args.workdir} is not a cascade workdir")
  judge, _ = eval_run.cached_judge(config.data, eval_run.Options(), log)
  test_feats = judge.features(judge.test_images)
  n_real = 10 * args.samples_per_class
  train_x, _ = classifier.train_split(config.data, n_real)
  result = {"workdir": os.path.abspath(args.workdir),
            "checkpoint_steps": pipe.checkpoint_steps,
            "judge_test_accuracy": judge.test_accuracy,
            "real_frechet_distance": frechet_distance(judge.features(train_x), test_feats),
            "real_images": int(len(train_x))}
  log(f"judge test accuracy {judge.test_accuracy:.4f}, real-data FD "
      f"{result['real_frechet_distance']:.2f} ({n_real} training images)")
  if args.sr_images:
    result["super_resolution"] = sr_table(pipe, judge, args)
  if args.samples_per_class:
    result["cascade"] = cascade_table(pipe, judge, test_feats, args)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  log(f"wrote {args.out}")


if __name__ == "__main__":
  main()
