"""Profiles of one call for vs_diffusers.py's `--profile`: the per-op times of torch.profiler
(`torch_ops`) or of the perfetto trace jax.profiler writes (`jax_ops`), as (name, ms, count)
rows, and the most expensive of them written to a text file (`write_top`)."""
import glob
import gzip
import json
import os


def torch_ops(fn) -> list:
  """(name, self CPU ms, count) of every op of one fn() under torch.profiler."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    fn()
  return [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()]


def jax_ops(fn, trace_dir: str) -> list:
  """(name, total ms, count) of one fn() under jax.profiler, whose trace stays in trace_dir."""
  import jax  # pylint: disable=g-import-not-at-top
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    fn()
  return xla_ops(trace_dir)


def xla_ops(trace_dir: str) -> list:
  """(name, total ms, count) of every complete event of the perfetto trace jax.profiler wrote
  (XLA:CPU emits one per executed thunk: a fusion, convolution, dot, copy, ...)."""
  path, = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path, "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  totals = {}
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      ms, n = totals.get(e["name"], (0.0, 0))
      totals[e["name"]] = (ms + e["dur"] / 1e3, n + 1)
  return [(k, ms, n) for k, (ms, n) in totals.items()]


def write_top(folder: str, workload: str, side: str, ops: list) -> None:
  """The 40 most expensive ops of one profiled call into <folder>/<workload>_<side>.txt."""
  ops = sorted(ops, key=lambda o: -o[1])
  lines = [f"{workload} ({side}): one call, by self time", f"{'ms':>10} {'count':>6}  op"]
  lines += [f"{ms:10.2f} {n:6d}  {name[:110]}" for name, ms, n in ops[:40]]
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f"{workload}_{side}.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
