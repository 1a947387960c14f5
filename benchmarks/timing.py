"""What the benchmarks share for measuring: timed calls, the median they report, the process's
peak resident memory, and the parent/child protocol of the benchmarks that measure each case
in a fresh process (the child prints one `RESULT <json>` line; the parent reads the last one).
"""
import json
import pathlib
import resource
import subprocess
import sys
import time

RESULT = "RESULT "


def timed(fn, reps: int, warmups: int = 1):
  """Calls fn() `warmups` times untimed, then `reps` times timed: (the first call's seconds or
  None without warm-ups, [seconds of each timed call])."""
  first = None
  for i in range(warmups):
    t0 = time.perf_counter()
    fn()
    if i == 0:
      first = time.perf_counter() - t0
  secs = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    secs.append(time.perf_counter() - t0)
  return first, secs


def xla_flops(compiled) -> float:
  """FLOPs of one call of a compiled JAX program, from XLA's cost analysis (which some jax
  releases return as a one-element list; a scan's body is counted once, not per step). XLA
  leaves the key out for a program without arithmetic (the pixel codec's identity decode): 0."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def upper_median(values):
  """The middle value; of an even count the upper of the two middle ones (not their mean)."""
  values = sorted(values)
  return values[len(values) // 2]


def peak_rss_mb() -> float:
  """This process's peak resident memory so far (`ru_maxrss`), MiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def emit_result(obj) -> None:
  """The child's answer to `run_child`: one line on stdout."""
  print(RESULT + json.dumps(obj), flush=True)


ROOT = pathlib.Path(__file__).resolve().parents[1]


def module_command(path: str) -> list:
  """The command that runs the benchmark file `path` as a module of this package
  (`python -m benchmarks.<name>`), as every child process is started."""
  return [sys.executable, "-m", f"benchmarks.{pathlib.Path(path).stem}"]


def run_child(cmd, what: str, env=None):
  """Runs `cmd` from the repository root (so `benchmarks` and `configs` import as packages)
  to its end and returns the JSON of its last `RESULT ` line; exits with the tail of its
  stderr when it fails or prints none (`what` names it in the message)."""
  done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=ROOT)
  lines = [l for l in done.stdout.splitlines() if l.startswith(RESULT)]
  if done.returncode or not lines:
    sys.exit(f"error: {what} failed with exit code {done.returncode}:\n{done.stderr[-3000:]}")
  return json.loads(lines[-1][len(RESULT):])
