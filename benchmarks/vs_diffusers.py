"""ldm_jax against the PyTorch reference (diffusers + torch), side by side on this machine.

  python benchmarks/vs_diffusers.py --out=runs/vs_diffusers            # full, ~7 min, 2 quiet cores
  python benchmarks/vs_diffusers.py --quick --out=runs/vs_diffusers_q  # ~3 min
  python benchmarks/vs_diffusers.py --only=sample_default --variants=fast,plain_conv,callback

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
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
NULL_CLASSES = 10  # the default preset's Fashion-MNIST classes; + 1 null label


# --- Workload definitions (plain data: the child processes get them as JSON). ---


def _unet2d_config(u, sample_size: int, in_channels: int, num_class_embeds=None) -> dict:
  """A diffusers UNet2DModel config for our `config.ldm.unet` block `u`."""
  n = len(u["channel_mult"])
  attn = set(u["attention_levels"])
  return dict(
      _class_name="UNet2DModel", sample_size=sample_size, in_channels=in_channels,
      out_channels=in_channels,
      block_out_channels=[u["model_channels"] * m for m in u["channel_mult"]],
      down_block_types=["AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n)],
      up_block_types=["AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n))],
      layers_per_block=u["num_res_blocks"], attention_head_dim=u["num_head_channels"],
      norm_num_groups=u["num_groups"], attn_norm_num_groups=u["num_groups"],
      norm_eps=1e-5, add_attention=bool(u["mid_attention"]),
      resnet_time_scale_shift="scale_shift" if u["scale_shift_norm"] else "default",
      num_class_embeds=num_class_embeds)


def _vae_config(a, channels: int, image_size: int) -> dict:
  """A diffusers AutoencoderKL config for our `config.autoencoder` block `a`."""
  n = len(a["ch_mult"])
  attn = set(a["attn_levels"])
  return dict(
      _class_name="AutoencoderKL", in_channels=channels, out_channels=channels,
      sample_size=image_size, block_out_channels=[a["ch"] * m for m in a["ch_mult"]],
      down_block_types=["AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D"
                        for i in range(n)],
      up_block_types=["AttnUpDecoderBlock2D" if i in attn else "UpDecoderBlock2D"
                      for i in reversed(range(n))],
      layers_per_block=a["num_res_blocks"], latent_channels=a["z_channels"],
      norm_num_groups=a["num_groups"], mid_block_add_attention=bool(a["mid_attention"]),
      use_quant_conv=bool(a["quant_conv"]), use_post_quant_conv=bool(a["quant_conv"]))


def workloads(quick: bool) -> dict:
  sys.path.insert(0, str(ROOT / "configs"))
  import ldm as ldm_configs  # pylint: disable=g-import-not-at-top
  c = ldm_configs.get_config("default")
  unet, ae = c.ldm.unet.to_dict(), c.autoencoder.to_dict()
  f = 2 ** (len(ae["ch_mult"]) - 1)
  latent = c.data.image_size // f
  plain = dict(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(),
               num_head_channels=32, num_groups=32, mid_attention=False,
               scale_shift_norm=False)
  attn = dict(plain, attention_levels=(1, 2), mid_attention=True)
  sd = dict(_class_name="UNet2DConditionModel", sample_size=64, cross_attention_dim=768,
            attention_head_dim=8, layers_per_block=2,
            block_out_channels=[320, 640, 1280, 1280])
  reps = (lambda q, full: q) if quick else (lambda q, full: full)
  return {
      "train_plain": dict(kind="train", model=_unet2d_config(plain, 32, 4), batch=32, size=32,
                          channels=4, reps=reps(2, 5),
                          label="UNet2DModel (64,128,128), 2 blocks/level, no attention; "
                                "32x32x4, batch 32: train step"),
      "train_attn": dict(kind="train", model=_unet2d_config(attn, 32, 4), batch=32, size=32,
                         channels=4, reps=reps(2, 5),
                         label="same, attention in the last two levels and the middle"),
      "sample_default": dict(kind="sample", model=_unet2d_config(unet, latent, 4, NULL_CLASSES + 1),
                             batch=64, size=latent, channels=4, steps=10 if quick else 50,
                             guidance=3.0, reps=reps(1, 3),
                             label=f"default LDM UNet ({latent}x{latent}x4, class-conditional):"
                                   f" 64 images, DDIM-{10 if quick else 50}, guidance 3 "
                                   "(batch 128)"),
      "ae_encode": dict(kind="encode", model=_vae_config(ae, c.data.channels, c.data.image_size),
                        batch=64, size=c.data.image_size, channels=c.data.channels,
                        reps=reps(5, 20),
                        label=f"default autoencoder: encode 64 {c.data.image_size}x"
                              f"{c.data.image_size}x{c.data.channels} images"),
      "ae_decode": dict(kind="decode", model=_vae_config(ae, c.data.channels, c.data.image_size),
                        batch=64, size=latent, channels=ae["z_channels"], reps=reps(5, 20),
                        label=f"default autoencoder: decode 64 {latent}x{latent}x"
                              f"{ae['z_channels']} latents"),
      "sd_step": dict(kind="guided_step", model=sd, batch=2, size=64, channels=4, context=(77, 768),
                      reps=1, full_only=True,
                      label="Stable Diffusion 1.x UNet (860M): one guided step, batch 2, "
                            "64x64x4, 77x768 context"),
      **{f"conv_{n}x{n}": dict(kind="conv", model=dict(_class_name="conv", features=128),
                               batch=128, size=n, channels=256, reps={2: 50, 4: 20, 8: 5}[n],
                               on_request=True,
                               label=f"one 3x3 convolution at {n}x{n}, batch 128, 256 -> 128 "
                                     "channels")
         for n in (2, 4, 8)},
  }


def shrink(w: dict) -> dict:
  """A dry-run copy of workload `w`: the same code path with tiny shapes and one call."""
  w = json.loads(json.dumps(w))
  m = w["model"]
  w["label"] = "(dry run, tiny shapes) " + w["label"]
  if w["kind"] == "conv":
    m["features"] = 8
    w.update(batch=4, channels=16, reps=1)
    return w
  m["block_out_channels"] = [min(c, 16 if m["_class_name"] != "UNet2DConditionModel" else 32)
                             for c in m["block_out_channels"]]
  m["norm_num_groups"] = 4
  if "attn_norm_num_groups" in m:
    m["attn_norm_num_groups"] = 4
  if m["_class_name"] == "UNet2DModel":
    m["attention_head_dim"] = 4
  if "cross_attention_dim" in m:
    m.update(cross_attention_dim=16, attention_head_dim=2)
    w["context"] = [5, 16]
  w.update(batch=min(w["batch"], 4), reps=1, size=min(w["size"], 16 if w["kind"] == "encode"
                                                              else 8))
  if "steps" in w:
    w["steps"] = 3
  return w


# --- Child: one side, one workload, one fresh process. ---


def _peak_mb() -> float:
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed(fn, reps: int):
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  secs = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    secs.append(time.perf_counter() - t0)
  return first, secs


def run_torch(w: dict, device: str) -> dict:
  if os.environ.get("VS_DIFFUSERS_HIDE_TORCHVISION", "1") == "1":
    # diffusers imports transformers, which imports torchvision when it is installed; a
    # torchvision built for another torch (e.g. CUDA beside a CPU torch) then breaks the import.
    # None of the measured code uses torchvision. VS_DIFFUSERS_HIDE_TORCHVISION=0 keeps it.
    sys.modules.setdefault("torchvision", None)
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  if w.get("torch_threads"):
    torch.set_num_threads(w["torch_threads"])
  if w["kind"] == "conv":
    return _torch_conv(torch, w, device)
  cfg = {k: v for k, v in w["model"].items() if k != "_class_name"}
  model = getattr(diffusers, w["model"]["_class_name"])(**cfg).to(device)
  b, s, ch = w["batch"], w["size"], w["channels"]
  x = torch.randn(b, ch, s, s, device=device)
  if w["kind"] == "train":
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    t = torch.randint(0, 1000, (b,), device=device)
    target = torch.randn_like(x)

    def call():
      opt.zero_grad(set_to_none=True)
      loss = torch.nn.functional.mse_loss(model(x, t).sample, target)
      loss.backward()
      opt.step()
  elif w["kind"] == "sample":
    model.eval()
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1)
    labels = torch.arange(b, device=device) % NULL_CLASSES
    both = torch.cat([labels, torch.full((b,), NULL_CLASSES, device=device)])

    @torch.inference_mode()
    def call():
      sched.set_timesteps(w["steps"])
      z = x
      for t in sched.timesteps:
        out = model(torch.cat([z, z]), t, class_labels=both).sample
        cond, uncond = out.chunk(2)
        z = sched.step(uncond + w["guidance"] * (cond - uncond), t, z).prev_sample
      return z
  elif w["kind"] == "guided_step":
    model.eval()
    ctx = torch.randn(b, *w["context"], device=device)
    t = torch.full((b,), 500, device=device)

    @torch.inference_mode()
    def call():
      return model(x, t, encoder_hidden_states=ctx).sample
  elif w["kind"] == "encode":
    model.eval()

    @torch.inference_mode()
    def call():
      post = model.encode(x).latent_dist
      return post.mean, post.logvar
  else:
    model.eval()

    @torch.inference_mode()
    def call():
      return model.decode(x).sample
  cuda = device.startswith("cuda")

  def synced():
    call()
    if cuda:
      torch.cuda.synchronize()

  first, secs = _timed(synced, w["reps"])
  if w.get("profile"):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
      synced()
    _write_profile(w, "torch", [(e.key, e.self_cpu_time_total / 1e3, e.count)
                                for e in prof.key_averages()])
  out = dict(first_s=first, secs=secs, threads=torch.get_num_threads())
  if cuda:
    out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
  return out


def _torch_conv(torch, w: dict, device: str) -> dict:
  b, s, ch, o = w["batch"], w["size"], w["channels"], w["model"]["features"]
  conv = torch.nn.Conv2d(ch, o, 3, padding=1).to(device).eval()
  x = torch.randn(b, ch, s, s, device=device)

  @torch.inference_mode()
  def call():
    conv(x)
    if device.startswith("cuda"):
      torch.cuda.synchronize()

  first, secs = _timed(call, w["reps"])
  return dict(first_s=first, secs=secs, threads=torch.get_num_threads())


def run_jax(w: dict, variant: str) -> dict:
  sys.path.insert(0, str(ROOT))
  sys.path.insert(0, str(ROOT / "configs"))
  from ldm_jax import platform  # pylint: disable=g-import-not-at-top
  if variant == "onednn":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_experimental_onednn_custom_call=true")
  platform.configure()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import autoencoder as ae_configs  # pylint: disable=g-import-not-at-top
  import ldm as ldm_configs  # pylint: disable=g-import-not-at-top
  from ldm_jax import diffusion  # pylint: disable=g-import-not-at-top
  from ldm_jax.convert import diffusers_models as dm  # pylint: disable=g-import-not-at-top
  from ldm_jax.models import layers  # pylint: disable=g-import-not-at-top
  from ldm_jax.models import builders  # pylint: disable=g-import-not-at-top

  if variant == "plain_conv":  # every convolution through XLA's convolution
    layers._use_window_matmul = lambda *a, **k: False  # pylint: disable=protected-access
  b, s, ch = w["batch"], w["size"], w["channels"]
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (b, s, s, ch))
  init_opts = platform.run_once_compiler_options()
  if w["kind"] == "conv":  # the model code's convolution (layers.conv), as a ResBlock has it
    conv = layers.conv(w["model"]["features"], 3)
    params = conv.init(keys[1], x[:1])["params"]
    step = jax.jit(lambda p, x: conv.apply({"params": p}, x)).lower(params, x).compile()
    flops, calls = step.cost_analysis(), 1
    call = lambda: jax.block_until_ready(step(params, x))  # noqa: E731
  elif w["kind"] in ("encode", "decode"):
    ae = ae_configs.base_config().autoencoder
    ae.update(dm.vae_config_from_diffusers(w["model"]))
    vae = builders.build_autoencoder(ae, w["model"]["in_channels"])
    image = jnp.zeros((1, w["model"]["sample_size"], w["model"]["sample_size"],
                       w["model"]["in_channels"]))
    params = jax.jit(vae.init, compiler_options=init_opts)(keys[1], image)["params"]
    if w["kind"] == "encode":
      def fn(p, x):
        post = vae.apply({"params": p}, x, method=vae.encode)
        return post.mean, post.logvar
    else:
      def fn(p, x):
        return vae.apply({"params": p}, x, method=vae.decode)
    step = jax.jit(fn).lower(params, x).compile()
    flops, calls = step.cost_analysis(), 1
    call = lambda: jax.block_until_ready(step(params, x))  # noqa: E731
  else:
    config = dict(w["model"])
    classes = config.pop("num_class_embeds", None)
    cfg, _ = dm.unet_config_from_diffusers(config)
    stage = ldm_configs.ldm_block()
    stage.unet.update(cfg)
    stage.conditioning.kind = "text" if cfg["context_dim"] else ("class" if classes else "none")
    unet = builders.build_unet(stage, config["out_channels"] if "out_channels" in config else ch,
                      (classes - 1) if classes else 0)
    ctx = (jax.random.normal(keys[2], (b,) + tuple(w["context"])) if w.get("context")
           else None)
    t = jax.random.randint(keys[3], (b,), 0, 1000)
    params = jax.jit(lambda k: unet.init(k, x[:1], t[:1], context=None if ctx is None else
                                         ctx[:1]), compiler_options=init_opts)(keys[1])["params"]
    if w["kind"] == "train":
      opt = optax.adam(1e-4)
      opt_state = jax.jit(opt.init)(params)
      target = jax.random.normal(keys[2], x.shape)

      def train_step(p, o, x, t, target):
        loss, g = jax.value_and_grad(
            lambda p: jnp.mean(jnp.square(unet.apply({"params": p}, x, t) - target)))(p)
        updates, o = opt.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

      step = jax.jit(train_step, donate_argnums=(0, 1)).lower(
          params, opt_state, x, t, target).compile()
      flops, calls = step.cost_analysis(), 1
      state = [params, opt_state]

      def call():
        state[0], state[1], loss = step(state[0], state[1], x, t, target)
        jax.block_until_ready(loss)
    elif w["kind"] == "guided_step":
      step = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, context=c)).lower(
          params, x, t, ctx).compile()
      flops, calls = step.cost_analysis(), 1
      call = lambda: jax.block_until_ready(step(params, x, t, ctx))  # noqa: E731
    else:  # sample: the project's scanned DDIM with guidance in each step
      sched = diffusion.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
      labels = jnp.arange(b) % (classes - 1)
      null = jnp.full((b,), classes - 1)
      progress = variant == "callback"

      def model_fn(z, t, cond, p):
        if progress:  # what pipeline.py adds when sample.py shows progress
          jax.debug.callback(lambda t: None, t)
        return unet.apply({"params": p}, z, t, labels=cond)

      def run(p, z, scale):
        return diffusion.ddim_sample(diffusion.guided(model_fn), z, sched,
                                     num_steps=w["steps"], model_args=(labels, null, scale, p))

      step = jax.jit(run).lower(params, x, w["guidance"]).compile()
      one = jax.jit(lambda p, z, t: diffusion.guided(model_fn)(z, t, labels, null, 3.0, p))
      flops = one.lower(params, x, t).compile().cost_analysis()
      calls = w["steps"]  # XLA counts a scan's body once
      call = lambda: jax.block_until_ready(step(params, x, w["guidance"]))  # noqa: E731
  if isinstance(flops, (list, tuple)):
    flops = flops[0]
  first, secs = _timed(call, w["reps"])
  if w.get("profile"):
    trace_dir = os.path.join(w["profile"], f"{w['name']}_{variant}_trace")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      call()
    _write_profile(w, variant, _xla_ops(trace_dir))
  out = dict(first_s=first, secs=secs, gflop=flops["flops"] * calls / 1e9,
             backend=jax.default_backend())
  mem = step.memory_analysis()  # XLA's buffer assignment: what the program itself holds
  if mem is not None:
    out["program_mb"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                         + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2 ** 20
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2 ** 20
  return out


def _xla_ops(trace_dir: str) -> list:
  """(name, total ms, count) of every complete event of the perfetto trace jax.profiler wrote
  (XLA:CPU emits one per executed thunk: a fusion, convolution, dot, copy, ...)."""
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
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


def _write_profile(w: dict, side: str, ops: list) -> None:
  """The 40 most expensive ops of one profiled call into <profile>/<workload>_<side>.txt."""
  ops = sorted(ops, key=lambda o: -o[1])
  lines = [f"{w['name']} ({side}): one call, by self time", f"{'ms':>10} {'count':>6}  op"]
  lines += [f"{ms:10.2f} {n:6d}  {name[:110]}" for name, ms, n in ops[:40]]
  os.makedirs(w["profile"], exist_ok=True)
  with open(os.path.join(w["profile"], f"{w['name']}_{side}.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def child(spec: dict) -> None:
  w = spec["workload"]
  out = (run_torch(w, spec["device"]) if spec["side"] == "torch" else
         run_jax(w, spec["side"]))
  out["peak_mb"] = _peak_mb()
  print("RESULT " + json.dumps(out), flush=True)


# --- Parent: alternate fresh processes, summarise. ---


def measure(name: str, w: dict, side: str, device: str) -> dict:
  spec = json.dumps(dict(workload=w, side=side, device=device))
  t0 = time.time()
  done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec],
                        capture_output=True, text=True)
  lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
  if done.returncode or not lines:
    sys.exit(f"error: {name} ({side}) failed with exit code {done.returncode}:\n"
             f"{done.stderr[-3000:]}")
  out = json.loads(lines[-1][len("RESULT "):])
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
  p.add_argument("--variants", default="fast", help="JAX variants: fast, plain_conv, callback")
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
    if v not in ("fast", "plain_conv", "callback", "onednn"):
      sys.exit(f"error: --variants: unknown variant {v!r} (fast, plain_conv, callback)")
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
