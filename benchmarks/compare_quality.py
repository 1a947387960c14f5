"""What benchmarks/compare.py measures of a trained system: samples' class accuracy and
Frechet distance under the project's classifier, sampling FLOPs, the train vs held-out
denoising-loss gap, and how corruptions of a cascade's base output survive its
super-resolution stages. Imported by compare.py after `platform.configure()`."""
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.compare_budget import log
from ldm_jax.models import codecs
from ldm_jax.sampling import load
from ldm_jax import data as data_lib
from ldm_jax import workdir as workdir_lib
from ldm_jax.evaluation.metrics import frechet_distance
from ldm_jax.config_schema import AUTOENCODER
from ldm_jax.sampling import CascadePipeline, load_stages
from ldm_jax.train.diffusion_task import DiffusionTask
from benchmarks.timing import xla_flops


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def load_pipeline(config, workdir: str, fraction: float):
  """The system's sampler with every diffusion stage at `fraction` of its steps."""
  names = workdir_lib.diffusion_stages(config)
  return load_stages(config, workdir, names, {
      n: int(round(config[n].train.num_steps * fraction)) for n in names})


def base_guidance(pipe, guidance: float):
  """`guidance` for the base stage; a cascade's SR stages keep their own (config.<sr>.sample
  .guidance: 1, unguided, as CDM samples its SR models)."""
  if isinstance(pipe, CascadePipeline):
    return [guidance] + [None] * (len(pipe.stages) - 1)
  return guidance


def generate(pipe, labels: np.ndarray, args, seed: int = 0) -> tuple:
  """Float images in [-1, 1] for `labels`, in batches; (images, seconds per image)."""
  out, start = [], time.perf_counter()
  for i in range(0, len(labels), args.batch):
    part = labels[i:i + args.batch]
    if len(part) < args.batch:  # one batch shape: one compiled sampler
      part = np.concatenate([part, np.zeros(args.batch - len(part), part.dtype)])
    images = pipe.sample(args.batch, sampler="ddim", steps=args.steps,
                         guidance=base_guidance(pipe, args.guidance), seed=seed + i,
                         labels=part, as_uint8=False)
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
    total += args.steps * xla_flops(denoise.lower(st.params, jnp.zeros(shape),
                                                  jnp.zeros((2 * b,), jnp.int32), cond).compile())
    decode = jax.jit(lambda p, z, st=st: st.codec.decode(p, z))
    total += xla_flops(decode.lower(st.codec_params, jnp.zeros((b,) + st.latent_shape)).compile())
  return total / b


def judge_data(data_cfg):
  """The judge's data block: the whole training split even when the systems train on a TFDS
  slice of it (`--train_split=train[:1000]`), so that every run is scored by one classifier."""
  cfg = data_cfg.copy_and_resolve_references()
  cfg.train_split = data_cfg.train_split.partition("[")[0]
  return cfg


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
  kw = dict(sampler="ddim", steps=args.steps, guidance=base_guidance(pipe, args.guidance),
            seed=11)
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


def parameters(config, pipe) -> dict:
  """Parameters per model of a system's sampler (the autoencoder's decoder also apart)."""
  params = {}
  if AUTOENCODER in config.stages:
    params[AUTOENCODER] = count_params(pipe.codec_params)
    params[AUTOENCODER + " (decoder)"] = count_params(pipe.codec_params["decoder"])
  for st in (pipe.stages if isinstance(pipe, CascadePipeline) else [pipe]):
    params[st.name] = count_params(st.params)
  return params


def measure_system(system: str, config, workdir: str, times: dict, plan: dict, judge,
                   test_features, loss_sets: tuple, args) -> tuple:
  """One system's entry of compare.json: the quality curve at `args.points` fractions of its
  diffusion stages' steps (against training minutes: the autoencoder's counted whole),
  parameters, training images/s, sampling FLOPs and the loss gap on `loss_sets` (train,
  held-out). Returns (entry, the final point's (images, labels), the final sampler)."""
  diff = workdir_lib.diffusion_stages(config)
  fixed = sum(v["wall_s"] for k, v in times.items() if k not in diff)  # the autoencoder
  scaled = sum(times[k]["wall_s"] for k in diff)
  curve = []
  for k in range(1, args.points + 1):
    frac = k / args.points
    pipe = load_pipeline(config, workdir, frac)
    per_class = args.samples_per_class if k == args.points else args.curve_per_class
    q = quality(pipe, judge, test_features, per_class, args)
    images, labels = q.pop("images"), q.pop("labels")
    q.update(fraction=frac, train_minutes=(fixed + frac * scaled) / 60)
    curve.append(q)
    log(f"{system} at {frac:.2f} of its steps: {q}")
  params = parameters(config, pipe)
  ips = {k: plan[k]["batch_size"] * plan[k]["num_steps"] / times[k]["wall_s"] for k in plan}
  entry = {
      "plan": plan, "train_times": times, "train_minutes": (fixed + scaled) / 60,
      "train_images_per_sec": ips, "parameters": params,
      "parameters_total": sum(v for k, v in params.items() if "(" not in k),
      "sampling_flops_per_image": sampling_flops(pipe, args), "curve": curve,
      "loss_gap": loss_gap(config, workdir, *loss_sets, args),
      "sr_vs_bicubic": sr_vs_bicubic(workdir)}
  return entry, (images, labels), pipe


def sr_vs_bicubic(workdir: str) -> dict:
  """The trainer's end-of-training check of each super-resolution stage (summary.json
  `sr_psnr` / `bicubic_psnr` on held-out images from their real downsampled versions):
  {stage: {sr_psnr, bicubic_psnr, images}}; empty when no stage ran it."""
  summary = workdir_lib.read_summary(workdir)
  return {stage: {"sr_psnr": s["sr_psnr"], "bicubic_psnr": s["bicubic_psnr"],
                  "images": s["sr_eval_images"]}
          for stage, s in summary.items() if isinstance(s, dict) and "sr_psnr" in s}
