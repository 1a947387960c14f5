"""Each system of a benchmarks/compare.py run at its own best sampling setting, and how close
its samples come to the training images (issue 20: a comparison runs every system at the
setting its paper tunes, and memorisation is measured, not assumed).

  python -m benchmarks.compare_sweep --out=runs/compare16 [--sweep_per_class=20] \\
      [--final_per_class=100] [--steps=20]

Reads the trained workdirs under --out (ldm, pixel, cascade), then for each system:
1. Sweeps what its paper tunes, one axis at a time with the others held at the best so far
   (coordinate search), at `--sweep_per_class` samples per class (10 classes, balanced):
   guidance for all; x_0 thresholding (static as DDPM/ADM/CDM, dynamic as Imagen) for the
   pixel model; base guidance, SR noise-augmentation level and SR guidance for the cascade.
   The LDM's latents are unbounded, so it is not thresholded. The best setting is the one with
   the lowest classifier Frechet distance (the distribution metric; accuracy rewards a model
   that draws every class's single most typical image).
2. Draws `--final_per_class` x 10 samples at that setting: class accuracy, Frechet distance,
   steady-state sampling seconds per image (the first batch, which compiles, timed apart).
3. Memorisation: each sample's L2 distance (RMS per pixel, images in [-1, 1]) to its nearest
   training image, against the same for as many held-out test images; ratio < 1 means the
   samples sit closer to the training set than unseen real images do. A picture shows one
   sample per class beside its three nearest training images. A run trained on a slice of
   the training split (compare.py --train_split) is measured against that slice.
The judge is the classifier of `python -m ldm_jax.evaluate` (cached; the same seed, epochs
and data as compare.py's, so the same parameters). Writes sweep.json, sweep.md and
memorisation_<system>.png into --out.
"""
import argparse
import json
import os
import sys
import time

from ldm_jax import platform

platform.configure()
platform.quiet_library_logs()

# pylint: disable=g-import-not-at-top,g-bad-import-order
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ldm_jax import images as image_io  # noqa: E402
from ldm_jax import workdir as workdir_lib  # noqa: E402
from ldm_jax.models import codecs  # noqa: E402
from ldm_jax.evaluation import classifier, run as eval_run  # noqa: E402
from ldm_jax.evaluation.metrics import frechet_distance  # noqa: E402
from ldm_jax.sampling import CascadePipeline, from_workdir  # noqa: E402
from benchmarks.compare_budget import log  # noqa: E402
from benchmarks.compare_quality import judge_data  # noqa: E402
# pylint: enable=g-import-not-at-top,g-bad-import-order


def floats(text: str) -> list:
  return [float(v) for v in text.split(",") if v]


def axes_of(config, pipe, args) -> tuple[dict, dict]:
  """(the starting setting: the config's own, {axis: values}) of a system."""
  start = {"guidance": args.start_guidance}
  axes = {"guidance": floats(args.guidance)}
  if isinstance(pipe, CascadePipeline):
    sr = config[pipe.stages[1].name]
    start.update(aug_level=float(sr.lowres.sample_aug_level),
                 sr_guidance=float(sr.sample.guidance))
    axes.update(aug_level=floats(args.aug_levels), sr_guidance=floats(args.sr_guidance))
  elif isinstance(pipe.codec, codecs.PixelCodec):
    start["thresholding"] = str(config[pipe.name].sample.thresholding)
    axes["thresholding"] = [t for t in args.thresholding.split(",") if t]
  return start, axes


def sample_kwargs(pipe, setting: dict) -> dict:
  """pipe.sample keywords of a setting (a cascade: per stage; thresholding at its own)."""
  if isinstance(pipe, CascadePipeline):
    n_sr = len(pipe.stages) - 1
    return {"guidance": [setting["guidance"]] + [setting["sr_guidance"]] * n_sr,
            "aug_level": [setting["aug_level"]] * n_sr}
  return dict(setting)


def draw(pipe, labels: np.ndarray, setting: dict, args) -> tuple:
  """(images in [-1, 1], steady seconds per image, first batch seconds)."""
  out, times = [], []
  for i in range(0, len(labels), args.batch):
    part = labels[i:i + args.batch]
    n = len(part)
    if n < args.batch:  # one batch shape: one compiled sampler
      part = np.concatenate([part, np.zeros(args.batch - n, part.dtype)])
    t0 = time.perf_counter()
    images = np.asarray(pipe.sample(args.batch, sampler="ddim", steps=args.steps, seed=i,
                                    labels=part, as_uint8=False,
                                    **sample_kwargs(pipe, setting)))
    times.append(time.perf_counter() - t0)
    out.append(images[:n])
  steady = times[1:] or times
  return np.concatenate(out), float(np.mean(steady)) / args.batch, times[0]


def score(pipe, judge, test_features, per_class: int, setting: dict, args) -> tuple:
  labels = np.repeat(np.arange(10), per_class).astype(np.int32)
  images, sec, first = draw(pipe, labels, setting, args)
  row = {**setting, "num_samples": int(len(labels)),
         "class_accuracy": float((judge.predict(images) == labels).mean()),
         "frechet_distance": frechet_distance(judge.features(images), test_features),
         "saturated": float(np.mean(np.abs(images) > 0.999)),
         "sec_per_image": sec, "first_batch_s": first}
  return row, images, labels


def coordinate_sweep(pipe, judge, test_features, start: dict, axes: dict, args,
                     name: str) -> tuple[dict, list]:
  """One axis at a time, the others at the best so far; lowest Frechet distance wins."""
  best, rows, seen = dict(start), [], {}
  for axis, values in axes.items():
    for v in values:
      setting = {**best, axis: v}
      key = json.dumps(setting, sort_keys=True)
      if key not in seen:
        seen[key] = score(pipe, judge, test_features, args.sweep_per_class, setting, args)[0]
        rows.append(seen[key])
        log(f"{name} sweep {setting}: accuracy {seen[key]['class_accuracy']:.3f}, "
            f"FD {seen[key]['frechet_distance']:.2f}")
    best = min((json.loads(k) for k in seen),
               key=lambda s: seen[json.dumps(s, sort_keys=True)]["frechet_distance"])
  return best, rows


def nearest(queries: np.ndarray, bank: np.ndarray, chunk: int = 10_000) -> tuple:
  """(RMS-per-pixel L2 distance of each query to its nearest bank image, the index), from
  |q|^2 + |b|^2 - 2 q.b in chunks of the bank."""
  q = jnp.asarray(queries.reshape(len(queries), -1), jnp.float32)
  qq = jnp.sum(q * q, axis=1, keepdims=True)
  best_d = jnp.full((len(queries),), jnp.inf)
  best_i = jnp.zeros((len(queries),), jnp.int32)
  for s in range(0, len(bank), chunk):
    b = jnp.asarray(bank[s:s + chunk].reshape(-1, q.shape[1]), jnp.float32)
    d = qq + jnp.sum(b * b, axis=1)[None] - 2.0 * q @ b.T
    i = jnp.argmin(d, axis=1)
    d = jnp.take_along_axis(d, i[:, None], axis=1)[:, 0]
    better = d < best_d
    best_d, best_i = jnp.where(better, d, best_d), jnp.where(better, i + s, best_i)
  rms = np.sqrt(np.maximum(np.asarray(best_d), 0.0) / q.shape[1])
  return rms, np.asarray(best_i)


def memorisation(samples, labels, train_x, test_x, out_png: str, names) -> dict:
  d_samples, idx = nearest(samples, train_x)
  d_test, _ = nearest(test_x[:len(samples)], train_x)
  closest = np.quantile(d_test, 0.01)
  picks = [int(np.flatnonzero(labels == c)[0]) for c in range(10)]
  tiles = []
  for p in picks:  # the sample, then its three nearest training images
    d2 = np.sum((train_x.reshape(len(train_x), -1) - samples[p].reshape(1, -1)) ** 2, axis=1)
    tiles += [samples[p]] + [train_x[j] for j in np.argsort(d2)[:3]]
  image_io.save_png(out_png, image_io.make_grid(np.stack(tiles), ncols=4, min_width=4 * 96,
                                                row_labels=names or None))
  return {"sample_nn_rms": float(d_samples.mean()), "test_nn_rms": float(d_test.mean()),
          "ratio": float(d_samples.mean() / d_test.mean()),
          "share_closer_than_test_1pct": float(np.mean(d_samples < closest)),
          "num_samples": int(len(samples)), "train_images": int(len(train_x)),
          "nearest_train_index_first": [int(idx[p]) for p in picks]}


def markdown(result: dict) -> str:
  real = result["real"]
  lines = ["# Each system at its own best setting", "",
           f"Command: `{result['command']}`", "",
           f"Judge test accuracy {real['classifier_test_accuracy']:.3f}; Frechet distance of "
           f"{real['num_images']} training images to the test split "
           f"{real['frechet_distance_train_vs_test']:.2f}.", "",
           "| system | best setting | samples | class accuracy | Frechet distance | saturated "
           "| sampling s / image (steady) | nearest-train RMS samples / test | ratio |",
           "|---|---|---|---|---|---|---|---|---|"]
  for system, r in result["systems"].items():
    f, m = r["final"], r["memorisation"]
    setting = ", ".join(f"{k} {v}" for k, v in r["best"].items())
    lines.append(f"| {system} | {setting} | {f['num_samples']} | {f['class_accuracy']:.3f} | "
                 f"{f['frechet_distance']:.2f} | {f['saturated']:.3f} | "
                 f"{f['sec_per_image']:.4f} | {m['sample_nn_rms']:.3f} / {m['test_nn_rms']:.3f}"
                 f" | {m['ratio']:.3f} |")
  lines += ["", "## The sweeps", "", "| system | setting | samples | class accuracy | "
            "Frechet distance | saturated |", "|---|---|---|---|---|---|"]
  for system, r in result["systems"].items():
    for row in r["sweep"]:
      setting = ", ".join(f"{k} {row[k]}" for k in r["best"])
      lines.append(f"| {system} | {setting} | {row['num_samples']} | "
                   f"{row['class_accuracy']:.3f} | {row['frechet_distance']:.2f} | "
                   f"{row['saturated']:.3f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="a benchmarks.compare output folder")
  p.add_argument("--systems", default="ldm,pixel,cascade")
  p.add_argument("--steps", type=int, default=20, help="DDIM steps (every stage)")
  p.add_argument("--batch", type=int, default=100)
  p.add_argument("--sweep_per_class", type=int, default=20)
  p.add_argument("--final_per_class", type=int, default=100)
  p.add_argument("--start_guidance", type=float, default=3.0)
  p.add_argument("--guidance", default="1.5,3,5", help="base guidance values")
  p.add_argument("--thresholding", default="static,dynamic", help="pixel model")
  p.add_argument("--aug_levels", default="0.05,0.1,0.2", help="cascade SR sampling levels")
  p.add_argument("--sr_guidance", default="1,2", help="cascade SR guidance")
  p.add_argument("--memorisation_train_images", type=int, default=0, help="0: all")
  p.add_argument("--judge_epochs", type=int, default=2)
  p.add_argument("--judge_train_images", type=int, default=0, help="0: all (a check's knob)")
  p.add_argument("--cache_dir", default=None, help="the judge's cache (ldm_jax.evaluate's)")
  args = p.parse_args(argv)
  systems = [s for s in args.systems.split(",") if s]
  data_cfg = workdir_lib.read_config(os.path.join(args.out, systems[0])).data
  judge, _ = eval_run.cached_judge(judge_data(data_cfg), eval_run.Options(
      judge_epochs=args.judge_epochs, judge_train_images=args.judge_train_images,
      cache_dir=args.cache_dir), log)
  test_features = judge.features(judge.test_images)
  train_x, _ = classifier.train_split(data_cfg, args.memorisation_train_images)
  n_real = 10 * args.final_per_class
  result = {"command": "python -m benchmarks.compare_sweep " + " ".join(
      argv if argv is not None else sys.argv[1:]), "steps": args.steps,
            "real": {"classifier_test_accuracy": judge.test_accuracy, "num_images": n_real,
                     "frechet_distance_train_vs_test": frechet_distance(
                         judge.features(train_x[:n_real]), test_features)},
            "systems": {}}
  log(f"real data: {result['real']}")
  for system in systems:
    workdir = os.path.join(args.out, system)
    pipe = from_workdir(workdir)
    start, axes = axes_of(workdir_lib.read_config(workdir), pipe, args)
    best, rows = coordinate_sweep(pipe, judge, test_features, start, axes, args, system)
    final, images, labels = score(pipe, judge, test_features, args.final_per_class, best, args)
    log(f"{system} at its best {best}: {final}")
    mem = memorisation(images, labels, train_x, judge.test_images,
                       os.path.join(args.out, f"memorisation_{system}.png"), pipe.class_names)
    log(f"{system} memorisation: {mem}")
    result["systems"][system] = {"best": best, "sweep": rows, "final": final,
                                 "memorisation": mem,
                                 "checkpoint_steps": getattr(pipe, "checkpoint_steps", None)}
    with open(os.path.join(args.out, "sweep.json"), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2, default=float)
  with open(os.path.join(args.out, "sweep.md"), "w", encoding="utf-8") as f:
    f.write(markdown(result))
  log(f"wrote {args.out}/sweep.md and sweep.json")
  return result


if __name__ == "__main__":
  main()
