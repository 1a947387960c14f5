"""Single layers of the UNet train step, torch against XLA:CPU, forward and backward apart.

  python -m benchmarks.layers_vs_torch [--rounds=2]

What the train-step profile (vs_diffusers.py --profile) cannot say: a fusion's time in a trace
includes waiting for the cores that concurrently running convolutions hold. Here each piece runs
alone, in a fresh process per side (torch, ldm_jax with `ldm_jax.platform`'s flag, and for the
convolutions also XLA without the flag), medians of 7 calls after 2 warm-ups:

  conv  a 2048^3 float32 matmul (the machine's attainable peak), then
        a 3x3 convolution at the train_plain shapes (batch 32): forward, input gradient (dx),
        weight gradient (dw), GFLOP/s of each
  gn    GroupNorm(32 groups) + SiLU of [32, 32, 32, 192] (the first decoder ResBlock's input):
        forward, forward + backward; ldm_jax's fused op (`models/norm.py`) and Flax's
        nn.GroupNorm + nn.silu (the code before)
"""
import argparse
import pathlib

from benchmarks import timing

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONV_SHAPES = ((32, 64, 64), (32, 128, 64), (16, 128, 128), (8, 128, 128))  # (size, cin, cout)
BATCH = 32
GN_SHAPE = (32, 32, 32, 192)


def _median_ms(fn) -> float:
  return timing.upper_median(timing.timed(fn, 7, warmups=2)[1]) * 1e3


def _torch(kind: str) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  f = torch.nn.functional
  out = {}
  if kind == "conv":
    a = torch.randn(2048, 2048)
    out["matmul"] = dict(fwd=_median_ms(lambda: a @ a))
    for s, cin, cout in CONV_SHAPES:
      x = torch.randn(BATCH, cin, s, s)
      w = torch.randn(cout, cin, 3, 3)
      g = torch.randn(BATCH, cout, s, s)
      back = lambda mask: torch.ops.aten.convolution_backward(  # noqa: E731
          g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)
      with torch.no_grad():
        out[f"{s}x{s} {cin}->{cout}"] = dict(
            fwd=_median_ms(lambda: f.conv2d(x, w, padding=1)),
            dx=_median_ms(lambda: back([True, False, False])),
            dw=_median_ms(lambda: back([False, True, False])))
  else:
    n, h, w_, c = GN_SHAPE
    x = torch.randn(n, c, h, w_, requires_grad=True)
    scale = torch.ones(c, requires_grad=True)
    bias = torch.zeros(c, requires_grad=True)
    g = torch.randn(n, c, h, w_)

    def fwd():
      with torch.no_grad():
        return f.silu(f.group_norm(x, 32, scale, bias, 1e-5))

    def fwd_bwd():
      return torch.autograd.grad(f.silu(f.group_norm(x, 32, scale, bias, 1e-5)),
                                 (x, scale, bias), g)
    out["torch"] = dict(fwd=_median_ms(fwd), fwd_bwd=_median_ms(fwd_bwd))
  return out


def _jax(kind: str, flag: bool) -> dict:
  from ldm_jax import platform  # pylint: disable=g-import-not-at-top
  if flag:
    platform.configure(compilation_cache=False)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from ldm_jax.models import layers  # pylint: disable=g-import-not-at-top
  ready = jax.block_until_ready
  keys = jax.random.split(jax.random.key(0), 3)
  out = {}
  if kind == "conv":
    a = jax.random.normal(keys[0], (2048, 2048))
    mm = jax.jit(lambda a: a @ a)
    out["matmul"] = dict(fwd=_median_ms(lambda: ready(mm(a))))
    for s, cin, cout in CONV_SHAPES:
      x = jax.random.normal(keys[0], (BATCH, s, s, cin))
      w = jax.random.normal(keys[1], (3, 3, cin, cout))
      g = jax.random.normal(keys[2], (BATCH, s, s, cout))
      conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
          x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      fwd = jax.jit(conv)
      dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
      dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
      out[f"{s}x{s} {cin}->{cout}"] = dict(
          fwd=_median_ms(lambda: ready(fwd(x, w))), dx=_median_ms(lambda: ready(dx(x, w, g))),
          dw=_median_ms(lambda: ready(dw(x, w, g))))
  else:
    x = jax.random.normal(keys[0], GN_SHAPE)
    g = jax.random.normal(keys[1], GN_SHAPE)
    variants = {
        "ldm_jax (models/norm.py)": (layers.GroupNorm(num_groups=32, epsilon=1e-5),
                                     lambda m, p, x: m.apply({"params": p}, x, silu=True)),
        "flax nn.GroupNorm + nn.silu": (nn.GroupNorm(num_groups=32, epsilon=1e-5),
                                        lambda m, p, x: nn.silu(m.apply({"params": p}, x))),
    }
    for name, (module, apply) in variants.items():
      params = module.init(keys[2], x)["params"]
      fn = lambda p, x, m=module, a=apply: a(m, p, x)  # noqa: E731
      fwd = jax.jit(fn)
      fwd_bwd = jax.jit(lambda p, x, g, fn=fn: jax.vjp(fn, p, x)[1](g))
      out[name] = dict(fwd=_median_ms(lambda: ready(fwd(params, x))),
                       fwd_bwd=_median_ms(lambda: ready(fwd_bwd(params, x, g))))
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    kind, side = args.child.split(":")
    result = _torch(kind) if side == "torch" else _jax(kind, side == "jax")
    timing.emit_result(result)
    return
  runs = {}
  for r in range(args.rounds):
    for kind, sides in (("conv", ["torch", "jax", "jax_noflag"]), ("gn", ["torch", "jax"])):
      for side in sides if r % 2 == 0 else sides[::-1]:
        result = timing.run_child([*timing.module_command(__file__), f"--child={kind}:{side}"],
                                  f"{kind} ({side})")
        for name, row in result.items():
          for op, ms in row.items():
            runs.setdefault((kind, side, name, op), []).append(ms)
  med = {k: timing.upper_median(v) for k, v in runs.items()}
  mm = 2 * 2048 ** 3 / 1e9
  print("matmul 2048^3 float32 (the machine's peak): " + ", ".join(
      f"{side} {mm / med[('conv', side, 'matmul', 'fwd')] * 1e3:.0f} GFLOP/s"
      for side in ("torch", "jax")))
  print("| 3x3 conv, batch 32 | op | torch | ldm_jax (flag) | XLA, no flag | GFLOP/s torch / ours |")
  print("|---|---|---:|---:|---:|---:|")
  for s, cin, cout in CONV_SHAPES:
    name = f"{s}x{s} {cin}->{cout}"
    gflop = 2 * BATCH * s * s * cin * cout * 9 / 1e9
    for op in ("fwd", "dx", "dw"):
      t, j, n = (med[("conv", side, name, op)] for side in ("torch", "jax", "jax_noflag"))
      print(f"| {name} | {op} | {t:.1f} ms | {j:.1f} ms | {n:.1f} ms | "
            f"{gflop / t * 1e3:.0f} / {gflop / j * 1e3:.0f} |")
  print(f"\n| GroupNorm(32) + SiLU, {list(GN_SHAPE)} | forward | forward + backward |")
  print("|---|---:|---:|")
  for (kind, side, name, op), ms in sorted(med.items()):
    if kind == "gn" and op == "fwd":
      print(f"| {name} | {ms:.1f} ms | {med[(kind, side, name, 'fwd_bwd')]:.1f} ms |")


if __name__ == "__main__":
  main()
