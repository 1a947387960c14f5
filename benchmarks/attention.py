"""Plain against memory-efficient attention (`ldm_jax.models.attention`): time and peak memory.

  python -m benchmarks.attention                          # self, cross: forward and gradient
  python -m benchmarks.attention --only=self_grad --rounds=3 --reps=3
  python -m benchmarks.attention --only=train_attn        # the UNet train step (slow)

Each measurement is a fresh subprocess (so that `ru_maxrss`, the process's peak resident
memory, belongs to one program); the variants alternate, the order flipping every round.
A child builds the inputs and parameters, reads its peak memory (`base`), compiles, makes one
untimed call and `--reps` timed calls, and reads the peak again. The table gives medians over
all timed calls of all rounds, the spread (min-max of the per-process medians), the peak and
the peak above `base` (median over processes), and XLA's temporary buffer size.

Variants:
  plain      every call on XLA's jax.nn.dot_product_attention (the code before issue 10): the
             layers' choice with `LOGITS_BUDGET` raised so that nothing is chunked
  auto       the layers' default (`attention.attention`: blockwise above `LOGITS_BUDGET`)

Workloads (Stable Diffusion 1.x's first level: 64x64 latents = 4096 tokens, 320 channels, 8
heads of 40, guided batch 2):
  self, self_grad     CrossAttention without context (attn1); forward, or the gradient of a
                      loss w.r.t. parameters and input (what the train step differentiates)
  cross, cross_grad   CrossAttention to a 77x768 context (attn2)
  train_attn          (only with --only) UNet2DModel-shaped train step with attention in the
                      last two levels and the middle (issue 10's table): (64,128,128), 2 blocks
                      per level, heads of 32 channels; 32x32x4, batch 32, MSE + Adam
"""
import argparse
import pathlib
import statistics
import sys
import time

from benchmarks import timing

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKLOADS = {
    "self": dict(kind="layer", grad=False, context=None),
    "self_grad": dict(kind="layer", grad=True, context=None),
    "cross": dict(kind="layer", grad=False, context=(77, 768)),
    "cross_grad": dict(kind="layer", grad=True, context=(77, 768)),
    "train_attn": dict(kind="train", on_request=True),
}
VARIANTS = ("plain", "auto")


def _layer_call(w, jax, jnp):
  """(function, args) for one SD-size CrossAttention layer."""
  from ldm_jax.models import layers  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (2, 4096, 320))
  ctx = None if w["context"] is None else jax.random.normal(keys[1], (2,) + tuple(w["context"]))
  layer = layers.CrossAttention(num_heads=8, head_dim=40)
  params = jax.jit(layer.init)(keys[2], x[:1, :8], None if ctx is None else ctx[:1])

  if w["grad"]:
    def fn(p, x, c):
      return jax.grad(lambda p, x: jnp.mean(jnp.square(layer.apply(p, x, c))), (0, 1))(p, x)
  else:
    def fn(p, x, c):
      return layer.apply(p, x, c)
  return fn, (params, x, ctx), ()


def _train_call(jax, jnp):
  """(function, args, donated) for the UNet train step of issue 10's `train_attn` row."""
  import optax  # pylint: disable=g-import-not-at-top
  from ldm_jax.models.unet import UNet  # pylint: disable=g-import-not-at-top
  unet = UNet(model_channels=64, out_channels=4, num_res_blocks=2, channel_mult=(1, 2, 2),
              attention_levels=(1, 2), num_head_channels=32, num_groups=32, mid_attention=True,
              norm_eps=1e-5, symmetric_downsample=True)
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (32, 32, 32, 4))
  t = jax.random.randint(keys[1], (32,), 0, 1000)
  target = jax.random.normal(keys[2], x.shape)
  params = jax.jit(unet.init)(keys[3], x[:1], t[:1])["params"]
  opt = optax.adam(1e-4)

  def step(p, o, x, t, target):
    loss, g = jax.value_and_grad(
        lambda p: jnp.mean(jnp.square(unet.apply({"params": p}, x, t) - target)))(p)
    updates, o = opt.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  return step, (params, jax.jit(opt.init)(params), x, t, target), (0, 1)


def child(name: str, variant: str, reps: int, budget: int) -> dict:
  from ldm_jax import platform  # pylint: disable=g-import-not-at-top
  platform.configure()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ldm_jax.models import attention  # pylint: disable=g-import-not-at-top

  if variant == "plain":
    attention.LOGITS_BUDGET = sys.maxsize  # nothing is chunked: XLA's attention everywhere
  elif budget:
    attention.LOGITS_BUDGET = budget
  w = WORKLOADS[name]
  fn, args, donate = (_layer_call(w, jax, jnp) if w["kind"] == "layer"
                      else _train_call(jax, jnp))
  jax.block_until_ready(args)
  base = timing.peak_rss_mb()
  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  temp = compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
  state = list(args)

  def call():
    out = compiled(*state)
    if donate:  # the train step returns (params, opt_state, loss)
      state[0], state[1] = out[0], out[1]
    jax.block_until_ready(out)

  _, secs = timing.timed(call, reps)
  return dict(secs=secs, compile_s=compile_s, peak_mb=timing.peak_rss_mb(), base_mb=base,
              temp_mb=temp)


def measure(name: str, variant: str, reps: int, budget: int) -> dict:
  cmd = [*timing.module_command(__file__), f"--child={name}:{variant}", f"--reps={reps}",
         f"--budget={budget}"]
  return timing.run_child(cmd, f"{name}/{variant}")


def summarise(results: dict) -> str:
  lines = ["| workload | variant | s/call (median, spread) | peak RSS MB (above base) | "
           "XLA temp MB | compile s |", "|---|---|---|---|---|---|"]
  for (name, variant), runs in results.items():
    secs = [s for r in runs for s in r["secs"]]
    medians = [statistics.median(r["secs"]) for r in runs]
    peak = statistics.median(r["peak_mb"] for r in runs)
    above = statistics.median(r["peak_mb"] - r["base_mb"] for r in runs)
    lines.append(
        f"| {name} | {variant} | {statistics.median(secs):.3f} "
        f"({min(medians):.3f}-{max(medians):.3f}) | {peak:.0f} ({above:.0f}) | "
        f"{runs[0]['temp_mb']:.0f} | {statistics.median(r['compile_s'] for r in runs):.1f} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", default="", help="comma-separated workload names")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--reps", type=int, default=3, help="timed calls per process")
  p.add_argument("--budget", type=int, default=0,
                 help="LOGITS_BUDGET of the auto variant (default: the module's)")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    name, variant = args.child.split(":")
    timing.emit_result(child(name, variant, args.reps, args.budget))
    return
  names = (args.only.split(",") if args.only else
           [n for n, w in WORKLOADS.items() if not w.get("on_request")])
  variants = args.variants.split(",")
  unknown = [n for n in names if n not in WORKLOADS] + [v for v in variants
                                                        if v not in VARIANTS]
  if unknown:
    sys.exit(f"error: unknown workload or variant {unknown[0]!r} (workloads: "
             f"{', '.join(WORKLOADS)}; variants: {', '.join(VARIANTS)})")
  results = {(n, v): [] for n in names for v in variants}
  for r in range(args.rounds):
    for name in names:
      for variant in (variants if r % 2 == 0 else variants[::-1]):
        res = measure(name, variant, args.reps, args.budget)
        results[(name, variant)].append(res)
        print(f"round {r + 1} {name} {variant}: {statistics.median(res['secs']):.3f} s, "
              f"peak {res['peak_mb']:.0f} MB (base {res['base_mb']:.0f})", flush=True)
  print(summarise(results))


if __name__ == "__main__":
  main()
