"""Sampling speed and guidance quality of a trained LDM workdir.

  python -m benchmarks.ldm_sampling --workdir=runs/default [--per_class=20]

Prints: the time to sample 64 images with DDIM-50 (first call, with compilation, and warm),
the test accuracy of a small classifier trained on the training split, and the fraction of
generated samples it assigns to the requested class for guidance scales 1, 2 and 4.
"""
import argparse
import json
import os
import time

from ldm_jax import platform  # noqa: E402

platform.configure()
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from ldm_jax.evaluation.classifier import train_classifier  # noqa: E402
from ldm_jax.sampling import LatentDiffusionPipeline  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--per_class", type=int, default=20)
  p.add_argument("--steps", type=int, default=50)
  args = p.parse_args()
  pipe = LatentDiffusionPipeline.from_workdir(args.workdir)
  t0 = time.time()
  pipe.sample(64, sampler="ddim", steps=50, guidance=3.0, seed=0)
  first = time.time() - t0
  t0 = time.time()
  pipe.sample(64, sampler="ddim", steps=50, guidance=3.0, seed=1)
  warm = time.time() - t0
  print(f"DDIM-50, 64 images: first call {first:.2f} s, warm {warm:.2f} s")

  with open(os.path.join(args.workdir, "config.json"), encoding="utf-8") as f:
    data_cfg = ml_collections.ConfigDict(json.load(f)["data"])
  t0 = time.time()
  predict, test_acc = train_classifier(data_cfg)
  print(f"classifier test accuracy {test_acc:.4f} (trained in {time.time() - t0:.0f} s)")
  n = len(pipe.class_names)
  labels = np.repeat(np.arange(n), args.per_class)
  results = {"ddim50_64_first_s": first, "ddim50_64_warm_s": warm,
             "classifier_test_accuracy": test_acc}
  for g in (1.0, 2.0, 4.0):
    images = pipe.sample(len(labels), sampler="ddim", steps=args.steps, guidance=g, seed=0,
                         labels=labels, as_uint8=False)
    acc = float((predict(images) == labels).mean())
    results[f"class_accuracy_guidance_{g:g}"] = acc
    print(f"guidance {g:g}: class accuracy {acc:.4f} over {len(labels)} samples")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
