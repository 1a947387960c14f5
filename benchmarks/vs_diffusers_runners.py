"""What a child process of vs_diffusers.py does: build one workload on one side (`run_torch`:
diffusers + torch; `run_jax`: ldm_jax in one of the JAX variants), time its calls, and print
the figures as a `RESULT` line (`child`). Nothing here imports torch or JAX at module level:
the runners import them after setting what they read at import (torchvision hidden, the onednn
variant's XLA_FLAGS)."""
import os
import sys

from benchmarks import profiles
from benchmarks import timing
from benchmarks.vs_diffusers_workloads import NULL_CLASSES

# The JAX variants run_jax knows; vs_diffusers.py's docstring says what each one changes.
VARIANTS = ("fast", "plain_conv", "callback", "one_budget", "onednn")


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

  first, secs = timing.timed(synced, w["reps"])
  if w.get("profile"):
    profiles.write_top(w["profile"], w["name"], "torch", profiles.torch_ops(synced))
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

  first, secs = timing.timed(call, w["reps"])
  return dict(first_s=first, secs=secs, threads=torch.get_num_threads())


def run_jax(w: dict, variant: str) -> dict:
  from ldm_jax import platform  # pylint: disable=g-import-not-at-top
  if variant == "onednn":  # XLA:CPU rewrites matmuls and convolutions to oneDNN calls
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_experimental_onednn_custom_call=true")
  platform.configure()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from configs import autoencoder as ae_configs  # pylint: disable=g-import-not-at-top
  from configs import ldm as ldm_configs  # pylint: disable=g-import-not-at-top
  from ldm_jax import diffusion  # pylint: disable=g-import-not-at-top
  from ldm_jax.convert import diffusers_models as dm  # pylint: disable=g-import-not-at-top
  from ldm_jax.models import layers  # pylint: disable=g-import-not-at-top
  from ldm_jax.models import builders  # pylint: disable=g-import-not-at-top

  if variant == "plain_conv":  # every convolution through XLA's convolution
    layers._use_window_matmul = lambda *a, **k: False  # pylint: disable=protected-access
  if variant == "one_budget":
    from ldm_jax.models import attention  # pylint: disable=g-import-not-at-top
    attention.BACKWARD_LOGITS_BUDGET = attention.LOGITS_BUDGET
  b, s, ch = w["batch"], w["size"], w["channels"]
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (b, s, s, ch))
  init_opts = platform.run_once_compiler_options()
  if w["kind"] == "conv":  # the model code's convolution (layers.conv), as a ResBlock has it
    conv = layers.conv(w["model"]["features"], 3)
    params = conv.init(keys[1], x[:1])["params"]
    step = jax.jit(lambda p, x: conv.apply({"params": p}, x)).lower(params, x).compile()
    flops, calls = timing.xla_flops(step), 1
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
    flops, calls = timing.xla_flops(step), 1
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
      flops, calls = timing.xla_flops(step), 1
      state = [params, opt_state]

      def call():
        state[0], state[1], loss = step(state[0], state[1], x, t, target)
        jax.block_until_ready(loss)
    elif w["kind"] == "guided_step":
      step = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, context=c)).lower(
          params, x, t, ctx).compile()
      flops, calls = timing.xla_flops(step), 1
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
      flops = timing.xla_flops(one.lower(params, x, t).compile())
      calls = w["steps"]  # XLA counts a scan's body once
      call = lambda: jax.block_until_ready(step(params, x, w["guidance"]))  # noqa: E731
  first, secs = timing.timed(call, w["reps"])
  if w.get("profile"):
    trace_dir = os.path.join(w["profile"], f"{w['name']}_{variant}_trace")
    profiles.write_top(w["profile"], w["name"], variant, profiles.jax_ops(call, trace_dir))
  out = dict(first_s=first, secs=secs, gflop=flops * calls / 1e9,
             backend=jax.default_backend())
  mem = step.memory_analysis()  # XLA's buffer assignment: what the program itself holds
  if mem is not None:
    out["program_mb"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                         + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2 ** 20
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2 ** 20
  return out


def child(spec: dict) -> None:
  w = spec["workload"]
  out = (run_torch(w, spec["device"]) if spec["side"] == "torch" else
         run_jax(w, spec["side"]))
  out["peak_mb"] = timing.peak_rss_mb()
  timing.emit_result(out)
