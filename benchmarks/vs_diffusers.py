"""ldm_jax against the PyTorch reference (diffusers + torch), side by side on this machine.

  python -m benchmarks.vs_diffusers --out=runs/vs_diffusers            # full, ~7 min, 2 quiet cores
  python -m benchmarks.vs_diffusers --quick --out=runs/vs_diffusers_q  # ~3 min
  python -m benchmarks.vs_diffusers --only=sample_default --variants=fast,plain_conv,callback

Every workload is ONE architecture: a diffusers config (for the default preset's models,
translated from `configs/ldm.py` / `configs/autoencoder.py`), built as a diffusers model on the
torch side and, through `ldm_jax.convert.diffusers_models` (the converter's config mapping), as
our Flax model on the JAX side. Weights are random (speed does not depend on their values).
Each measurement is a fresh subprocess; the sides alternate (torch first in odd rounds, JAX
first in even ones); a process does one untimed warm-up call (JAX: compilation) and `reps`
timed calls. The table shows medians over all timed calls of all rounds, the speed of ldm_jax
relative to torch (torch time / ours: > 1 is faster), GFLOP/s from XLA's cost analysis of the
JAX program (the same count for both sides), each process's peak resident memory
(`ru_maxrss`: weights, activations, the framework itself; on the JAX side also XLA's compiler,
which for the SD UNet holds more than the run), and the XLA program's own memory from its
buffer assignment (`memory_analysis()`: arguments + outputs + temporaries - donated aliases).
`--profile=DIR` profiles one more call per side and writes its most expensive ops.

Workloads (issue 10):
  train_plain      UNet2DModel (64,128,128), 2 blocks/level, no attention; 32x32x4, batch 32,
                   MSE + Adam train step
  train_attn       the same with self-attention in the last two levels and the middle
  sample_default   the default LDM preset's UNet (8x8x4 latents, 10 classes + null): 64 images,
                   DDIM-50 (--quick: DDIM-10), guidance 3 = batch 128 per step; the scanned
                   sampler against a Python loop of diffusers' DDIMScheduler
  ae_encode        the default preset's autoencoder: posterior of 64 32x32x1 images
  ae_decode        ... and decoding 64 8x8x4 latents
  sd_step          Stable Diffusion 1.x UNet (860M): one guided step, batch 2, 64x64x4, 77x768
                   context (full run only: about 4 minutes and 10 GB)
  conv_2x2, conv_4x4, conv_8x8   (only with --only) one 3x3 convolution, batch 128,
                   256 -> 128 channels, at 2x2 / 4x4 / 8x8 (torch.nn.Conv2d against layers.conv)

JAX variants (`--variants`, each its own fresh process, alternating with the others):
  fast        the default model code (`layers.window_matmul_conv` on small images on CPU)
  plain_conv  every convolution through XLA's convolution (the code before issue 10)
  callback    sample_default with the per-step host progress callback sample.py installs
  one_budget  chunked attention's backward pass with the forward's chunks (the code before
              `attention.BACKWARD_LOGITS_BUDGET`)
  onednn      XLA:CPU's oneDNN custom calls on (--xla_cpu_experimental_onednn_custom_call)

This file parses the flags, alternates the processes and writes the report; the workload table
is `vs_diffusers_workloads.py`, what a child process runs `vs_diffusers_runners.py` (with
`profiles.py` for `--profile` and `timing.py`'s timer).
"""
import argparse
import json
import os
import statistics
import sys
import time

from benchmarks import timing
from benchmarks.vs_diffusers_runners import VARIANTS, child
from benchmarks.vs_diffusers_workloads import shrink, workloads


def measure(name: str, w: dict, side: str, device: str) -> dict:
  spec = json.dumps(dict(workload=w, side=side, device=device))
  t0 = time.time()
  out = timing.run_child([*timing.module_command(__file__), "--child", spec],
                         f"{name} ({side})")
  print(f"  {name:15s} {side:11s} median {statistics.median(out['secs']):8.3f} s  "
        f"first {out['first_s']:7.2f} s  peak {out['peak_mb'] / 1024:5.2f} GB  "
        f"(process {time.time() - t0:.0f} s)", flush=True)
  return out


def summarise(results: dict, table: dict, variants) -> str:
  head = ("| workload | diffusers + torch | " + " | ".join(f"ldm_jax ({v})" for v in variants) +
          " | speed vs torch (" + ", ".join(variants) + ") | GFLOP | GFLOP/s torch / ours | "
          "peak memory torch / ours | XLA program memory |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for name, w in table.items():
    r = results.get(name)
    if not r:
      continue
    med = {side: statistics.median([s for o in outs for s in o["secs"]])
           for side, outs in r.items()}
    gflop = r[variants[0]][0]["gflop"]
    peak = {side: max(o.get("device_peak_mb", o["peak_mb"]) for o in outs) / 1024
            for side, outs in r.items()}
    program = max(o.get("program_mb", 0) for o in r[variants[0]]) / 1024
    ratios = ", ".join(f"{med['torch'] / med[v]:.2f}x" if v in med else "-" for v in variants)
    lines.append(
        f"| {w['label']} | {med['torch']:.3f} s | " +
        " | ".join(f"{med[v]:.3f} s" if v in med else "-" for v in variants) +
        f" | **{ratios}** | {gflop:.1f} | {gflop / med['torch']:.0f} / "
        f"{gflop / med[variants[0]]:.0f} | {peak['torch']:.2f} / {peak[variants[0]]:.2f} GB | "
        f"{program:.2f} GB |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="1 round, fewer calls, DDIM-10, no SD")
  p.add_argument("--rounds", type=int, default=None, help="default: 1 (--quick) or 2")
  p.add_argument("--only", default="", help="comma-separated workload names")
  p.add_argument("--variants", default="fast", help="JAX variants: " + ", ".join(VARIANTS))
  p.add_argument("--device", default="cpu", help="torch device (cpu, cuda); JAX uses its "
                 "default backend. On an accelerator, peak memory is the device's.")
  p.add_argument("--dry_run", action="store_true", help="tiny shapes, one call: a code check")
  p.add_argument("--torch_threads", type=int, default=0,
                 help="torch.set_num_threads in the torch processes (0: torch's default)")
  p.add_argument("--out", default="", help="folder for vs_diffusers.md and vs_diffusers.json")
  p.add_argument("--profile", default="", help="folder: after timing, profile one more call "
                 "on each side (torch.profiler, jax.profiler) and write its top ops there")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child is not None:
    child(json.loads(args.child))
    return
  table = workloads(args.quick)
  if args.dry_run:
    table = {n: shrink(w) for n, w in table.items()}
  for name, w in table.items():
    w.update(torch_threads=args.torch_threads, name=name,
             profile=os.path.abspath(args.profile) if args.profile else "")
  names = [n for n in args.only.split(",") if n] or [
      n for n, w in table.items()
      if not (args.quick and w.get("full_only")) and not w.get("on_request")]
  variants = [v for v in args.variants.split(",") if v]
  for n in names:
    if n not in table:
      sys.exit(f"error: --only: unknown workload {n!r} (one of {', '.join(table)})")
  for v in variants:
    if v not in VARIANTS:
      sys.exit(f"error: --variants: unknown variant {v!r} ({', '.join(VARIANTS)})")
  rounds = args.rounds or (1 if args.quick or args.dry_run else 2)
  results, t0 = {}, time.time()
  for r in range(rounds):
    print(f"round {r + 1}/{rounds}", flush=True)
    for n in names:
      w = table[n]
      sides = ["torch"] + [v for v in variants if v != "callback" or w["kind"] == "sample"]
      if r % 2:
        sides = sides[::-1]
      if w.get("full_only") and r:  # the SD step: one round is already ~4 minutes
        continue
      for side in sides:
        results.setdefault(n, {}).setdefault(side, []).append(measure(n, w, side, args.device))
  used = [v for v in variants if any(v in r for r in results.values())]
  report = summarise(results, {n: table[n] for n in names}, used)
  print(report)
  print(f"total {time.time() - t0:.0f} s")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vs_diffusers.md"), "w", encoding="utf-8") as f:
      f.write(report + "\n")
    with open(os.path.join(args.out, "vs_diffusers.json"), "w", encoding="utf-8") as f:
      json.dump(dict(args=vars(args), workloads={n: table[n] for n in names},
                     results=results, wall_s=time.time() - t0), f, indent=1)


if __name__ == "__main__":
  main()
