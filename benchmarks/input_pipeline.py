"""Decode throughput of the training input pipeline (grain) on a folder of 256x256 JPEGs.

  python -m benchmarks.input_pipeline [--images=2000] [--workers=0,1,2] [--threads=2]
                                      [--consumes=IMAGES_PER_S] [--out=runs/input_pipeline]

Writes `--images` JPEGs (256x256 RGB, quality 90: Fashion-MNIST images enlarged, tinted and
grained so that they compress like photographs, ~20 KB each; random texture when the Debian
files are absent) into `<out>/jpegs` once, then reads them as configs/ldm.py:cin256's stage 1
does (data.source='folder', 256x256x3, random crop and flip, global batch 96) through
`BatchStream.iterate` with `num_workers` = each of `--workers` (0: reader threads in this
process only) and `--threads` reader threads per process, and reports images/s after a
warm-up of 3 batches (worker start-up excluded and reported apart). `--consumes` is what the
trainer eats (images/s: batch / step time, e.g. `gpu_check.py`'s train_cin256 figure): the
table then says whether each setting keeps up.
"""
import argparse
import contextlib
import json
import os
import pathlib
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

FASHION = '/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'


def _seed_images(n: int, rng: np.random.Generator) -> np.ndarray:
  """n uint8 [28, 28] images: Fashion-MNIST when installed, else smoothed noise."""
  if os.path.exists(FASHION):
    import gzip  # pylint: disable=g-import-not-at-top
    with gzip.open(FASHION, 'rb') as f:
      raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return raw[rng.integers(0, len(raw), n)]
  return rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)


def write_jpegs(folder: pathlib.Path, n: int, seed: int = 0) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder.mkdir(parents=True, exist_ok=True)
  if len(list(folder.glob('*.jpg'))) == n:
    return
  rng = np.random.default_rng(seed)
  for i, small in enumerate(_seed_images(n, rng)):
    big = np.asarray(Image.fromarray(small).resize((256, 256), Image.Resampling.BICUBIC))
    tint = rng.uniform(0.3, 1.0, 3)
    rgb = big[..., None] * tint + rng.normal(0, 6, (256, 256, 3))
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(
        folder / f'{i:06d}.jpg', quality=90)


def measure(source, workers: int, threads: int, batch: int, num_batches: int) -> dict:
  from ldm_jax import data  # pylint: disable=g-import-not-at-top
  stream = data.BatchStream(source, global_batch=batch, image_size=256, channels=3, seed=0,
                            random_crop=True, random_flip=True, num_threads=threads,
                            prefetch=max(2, threads), num_workers=workers)
  t0 = time.perf_counter()
  with contextlib.closing(stream.iterate(0)) as it:
    for _ in range(3):
      next(it)
    warm = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(num_batches):
      next(it)
    sec = time.perf_counter() - t1
  return dict(workers=workers, threads=threads, batch=batch, batches=num_batches,
              startup_s=warm, images_per_s=batch * num_batches / sec)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--images', type=int, default=2000)
  p.add_argument('--workers', default='0,1,2')
  p.add_argument('--threads', type=int, default=2)
  p.add_argument('--batch', type=int, default=96, help="configs/autoencoder.py:kl_f4's batch")
  p.add_argument('--batches', type=int, default=15, help='timed batches per setting')
  p.add_argument('--consumes', type=float, default=0.0,
                 help="the trainer's images/s, to compare with (0: not known)")
  p.add_argument('--out', default='runs/input_pipeline')
  args = p.parse_args()
  out = pathlib.Path(args.out)
  t0 = time.perf_counter()
  write_jpegs(out / 'jpegs', args.images)
  print(f'{args.images} JPEGs in {out / "jpegs"} ({time.perf_counter() - t0:.1f} s to write)')
  from ldm_jax import data  # pylint: disable=g-import-not-at-top
  source = data.folder_source(out / 'jpegs')
  rows = []
  for w in (int(x) for x in args.workers.split(',')):
    r = measure(source, w, args.threads, args.batch, args.batches)
    if args.consumes:
      r['vs_consumption'] = r['images_per_s'] / args.consumes
    rows.append(r)
    print(f"  workers {w}  threads {args.threads}  {r['images_per_s']:7.0f} images/s  "
          f"(start-up + 3 batches {r['startup_s']:.1f} s)"
          + (f"  {r['vs_consumption']:.2f}x the trainer's {args.consumes:.0f} images/s"
             if args.consumes else ''), flush=True)
  (out / 'input_pipeline.json').write_text(json.dumps(
      dict(cores=os.cpu_count(), consumes=args.consumes, rows=rows), indent=2))


if __name__ == '__main__':
  main()
