"""Pixel space and cascades on the one diffusion stack: codecs, the super-resolution step and
its augmentation, config checks, smoke pixel and cascade runs through train.py and sample.py,
and benchmarks/compare.py on a tiny budget."""
import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion, workdir as workdir_lib
from ldm_jax.models import codecs
from ldm_jax.errors import UserError
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.train import checks
from ldm_jax.train.diffusion_task import DiffusionTask, lowres_condition
from ldm_jax.train.loop import init_state
from ldm_jax.train.writers import read_jsonl

ROOT = pathlib.Path(__file__).parents[1]
from configs import cascade as cascade_configs
from configs import ldm as ldm_configs


def _images(n=2, size=32, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 1)).astype(np.float32)


def test_pixel_codec_is_the_identity_at_its_size_and_averages_when_shrinking():
  x = jnp.asarray(_images())
  codec = codecs.PixelCodec(32, 1)
  assert codec.shape == (32, 32, 1)
  np.testing.assert_array_equal(codec.decode({}, codec.encode({}, x)), x)
  small = codecs.PixelCodec(8, 1).encode({}, x)
  assert small.shape == (2, 8, 8, 1)
  # A 4x shrink of a constant image is that constant; of any image, about its block means.
  np.testing.assert_allclose(codecs.resize(jnp.full((1, 32, 32, 1), 0.3), 8), 0.3, atol=1e-6)
  blocks = np.asarray(x).reshape(2, 8, 4, 8, 4, 1).mean(axis=(2, 4))
  assert np.abs(np.asarray(small) - blocks).mean() < 0.15
  assert float(jnp.abs(small - blocks).mean()) < float(jnp.abs(x[:, ::4, ::4] - blocks).mean())


def test_latent_codec_round_trip_is_the_scaled_autoencoder():
  ae = AutoencoderKL(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, in_channels=1, num_groups=8)
  x = jnp.asarray(_images())
  params = ae.init(jax.random.key(0), x)["params"]
  codec = codecs.LatentCodec(ae, 0.5, 32)
  assert codec.shape == (8, 8, 4)
  z = codec.encode(params, x)  # no rng: the posterior mode
  mode = ae.apply({"params": params}, x, method=AutoencoderKL.encode).mode()
  np.testing.assert_allclose(z, 0.5 * mode, rtol=1e-6)
  rec = ae.apply({"params": params}, mode, method=AutoencoderKL.decode)
  np.testing.assert_allclose(codec.decode(params, z), rec, rtol=1e-5, atol=1e-6)
  sampled = codec.encode(params, x, jax.random.key(1))
  assert not np.allclose(sampled, z)


def test_augment_keeps_level_zero_and_noises_level_s_to_timestep_s_minus_one():
  sched = diffusion.make_schedule("linear", 1000, 1e-4, 0.02)
  x = jnp.asarray(_images(3, 8))
  noise = jax.random.normal(jax.random.key(0), x.shape)
  out = diffusion.augment(sched, x, jnp.array([0, 1, 500]), noise)
  np.testing.assert_array_equal(out[0], x[0])
  for i, t in ((1, 0), (2, 499)):
    a = float(sched.sqrt_alphas_cumprod[t])
    s = float(sched.sqrt_one_minus_alphas_cumprod[t])
    np.testing.assert_allclose(out[i], a * x[i] + s * noise[i], rtol=1e-5, atol=1e-6)


def _sr_task(aug_max=0.5):
  config = workdir_lib.migrate(cascade_configs.get_config("smoke"))
  config.sr16.lowres.aug_max = aug_max
  config.sr16.optim.warmup_steps = 1
  return DiffusionTask(config, "sr16", codecs.PixelCodec(16, 1), 10, lowres_resolution=8)


def test_lowres_condition_is_the_target_shrunk_and_grown_back():
  x = jnp.asarray(_images(2, 16))
  low = lowres_condition(x, 8)
  assert low.shape == x.shape
  np.testing.assert_allclose(low, codecs.resize(codecs.resize(x, 8), 16))



def test_super_resolution_model_sees_the_lowres_image_and_the_augmentation_level():
  task = _sr_task()
  state = init_state(task, jax.random.key(0), None)
  unet = state.params["unet"]
  assert unet["conv_in"]["kernel"].shape[2] == 2  # x_t and the low-resolution image
  assert "aug_embed_0" in unet and "aug_embed_1" in unet
  # Random (non-zero) parameters: the output depends on both extra inputs.
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  x, t = jnp.asarray(_images(2, 16)), jnp.array([10, 500])
  cond = {"labels": jnp.array([1, 2]), "lowres": jnp.asarray(_images(2, 16, 1)),
          "aug_level": jnp.array([0, 0])}
  base = task.model(params, x, t, cond)
  assert not np.allclose(base, task.model(params, x, t, {**cond, "aug_level": jnp.array([300, 300])}))
  assert not np.allclose(base, task.model(params, x, t, {**cond, "lowres": -cond["lowres"]}))
  # The held-out loss of the task feeds the level through to the model as well.
  batch = {"image": _images(4, 32), "label": np.arange(4, dtype=np.int32)}
  loss = jax.jit(task.denoising_loss, static_argnames="aug_level")
  a = loss(params, batch, jax.random.key(0), {}, aug_level=0)
  b = loss(params, batch, jax.random.key(0), {}, aug_level=400)
  assert np.isfinite(float(a)) and float(a) != float(b)


def test_super_resolution_step_trains_the_augmentation_embedding():
  task = _sr_task()
  state = init_state(task, jax.random.key(0), None)
  batch = {"image": _images(8, 32), "label": (np.arange(8) % 10).astype(np.int32)}
  step = jax.jit(task.make_train_step())
  new = state
  for _ in range(5):  # zero-initialised conv_out and a warm-up step: it moves on step 4
    new, metrics = step(new, batch, jax.random.key(1), {})
    assert np.isfinite(float(metrics.compute()["loss"]))
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       state.params["unet"]["aug_embed_0"], new.params["unet"]["aug_embed_0"])
  assert max(jax.tree.leaves(moved)) > 0
  # Without augmentation (aug_max 0) the level is always 0: the embedding is a constant input.
  assert _sr_task(0.0).dc.aug_steps == 0 and task.dc.aug_steps == 500


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.sr16.lowres.update(stage="sr32"),
     r"config\.sr16\.lowres\.stage='sr32' must be a diffusion stage trained before it"),
    (lambda c: c.update(stages=("base", "sr16", "sr16")), r"must name each stage once"),
    (lambda c: c.sr32.update(codec="latent"), r"needs an autoencoder"),
    (lambda c: c.sr16.update(resolution=9), r"halves the 9x9 images"),
    (lambda c: c.sr16.update(resolution=8), r"makes 8x8 images, not smaller"),
    (lambda c: c.sr16.lowres.update(aug_max=1.5), r"aug_max=1\.5"),
    (lambda c: c.update(stages=("base", "nope")), r"names 'nope' but config\.nope"),
])
def test_bad_cascade_configs_fail_with_one_line(edit, message):
  config = workdir_lib.migrate(cascade_configs.get_config("smoke"))
  edit(config)
  with pytest.raises(UserError, match=message):
    checks.check_stages(config)


def test_configs_saved_before_stages_were_named_migrate():
  old = ldm_configs.get_config("smoke").to_dict()
  del old["stages"]
  for key in ("codec", "resolution", "lowres"):
    del old["ldm"][key]
  import ml_collections
  config = workdir_lib.migrate(ml_collections.ConfigDict(old))
  assert tuple(config.stages) == ("autoencoder", "ldm")
  assert config.ldm.codec == "latent" and config.ldm.lowres.stage == ""
  assert workdir_lib.kind(config) == "ldm"
  checks.check_stages(config)


def _train(config, workdir, tfds_dir, *extra):
  cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/{config}",
         f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}", *extra]
  done = subprocess.run(cmd, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-4000:]
  return done


@pytest.fixture(scope="module")
def cascade_workdir(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cascade_smoke")
  _train("cascade.py:smoke", workdir, tfds_dir)
  return workdir


def test_smoke_cascade_trains_every_stage_in_order_and_resumes(cascade_workdir, tfds_dir):
  summary = json.loads((cascade_workdir / "summary.json").read_text())
  shapes = {s: summary[s]["latent_shape"] for s in ("base", "sr16", "sr32")}
  assert shapes == {"base": [8, 8, 1], "sr16": [16, 16, 1], "sr32": [32, 32, 1]}
  for stage in shapes:
    assert summary[stage]["steps"] == 20 and summary[stage]["codec"] == "pixel"
    if stage != "base":  # the SR-vs-bicubic check of every SR stage (issue 20)
      assert summary[stage]["sr_eval_images"] == 16
      assert 5.0 < summary[stage]["bicubic_psnr"] < 40.0 and np.isfinite(summary[stage]["sr_psnr"])
    assert (cascade_workdir / summary[stage]["sample_grid"]).exists()
    history = [h for h in read_jsonl(cascade_workdir / stage / "metrics.jsonl") if "loss" in h]
    assert all(np.isfinite(h["loss"]) for h in history)
  config = json.loads((cascade_workdir / "config.json").read_text())
  assert config["stages"] == ["base", "sr16", "sr32"] and config["sr32"]["lowres"]["stage"] == "sr16"
  before = {s: sorted(p.name for p in (cascade_workdir / s / "checkpoints").iterdir())
            for s in shapes}
  _train("cascade.py:smoke", cascade_workdir, tfds_dir)  # everything done: nothing retrains
  after = {s: sorted(p.name for p in (cascade_workdir / s / "checkpoints").iterdir())
           for s in shapes}
  assert before == after and before["sr16"] == ["10", "20"]
  assert json.loads((cascade_workdir / "summary.json").read_text()) == summary
  # Exact resume of a middle stage: drop sr16's last checkpoint, re-run: it trains steps
  # 11..20 again from step 10 and ends bit-identical (EMA included); sr32 is left alone.
  from ldm_jax.checkpoint import restore_eval_params
  ckpt_dir = str(cascade_workdir / "sr16" / "checkpoints")
  want, _, _ = restore_eval_params(ckpt_dir, 20)
  sr32_mtime = (cascade_workdir / "sr32" / "checkpoints" / "20").stat().st_mtime
  shutil.rmtree(cascade_workdir / "sr16" / "checkpoints" / "20")
  _train("cascade.py:smoke", cascade_workdir, tfds_dir)
  got, _, step = restore_eval_params(os.path.relpath(ckpt_dir))  # relative paths work too
  assert step == 20
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert (cascade_workdir / "sr32" / "checkpoints" / "20").stat().st_mtime == sr32_mtime


def test_cascade_sample_cli_same_seed_same_png(cascade_workdir, tmp_path, sample_cli):
  a = sample_cli(cascade_workdir, tmp_path / "a.png", steps=4)
  assert a == sample_cli(cascade_workdir, tmp_path / "b.png", steps=4)
  assert a != sample_cli(cascade_workdir, tmp_path / "c.png", "--aug_level=0.4", steps=4)
  from PIL import Image
  # 8 images of 32x32 in 3 columns, enlarged 6x (the smallest factor giving >= 512 px).
  assert Image.open(tmp_path / "a.png").size == (3 * (6 * 32 + 2) + 2,) * 2
  sample_cli(cascade_workdir, tmp_path / "t.png", "--trajectory", "--trajectory_frames=3", steps=4)


def test_cascade_pipeline_chains_stages_with_runtime_guidance_and_aug_level(cascade_workdir):
  from ldm_jax.sampling import CascadePipeline, LatentDiffusionPipeline
  pipe = LatentDiffusionPipeline.from_workdir(str(cascade_workdir))
  assert isinstance(pipe, CascadePipeline) and pipe.image_size == 32
  kw = dict(steps=3, seed=0, labels=[1, 2, 3, 4], as_uint8=False)
  a = pipe.sample(4, guidance=1.0, aug_level=0.0, **kw)
  b = pipe.sample(4, guidance=3.0, aug_level=0.3, **kw)
  assert a.shape == (4, 32, 32, 1) and not np.allclose(a, b)
  assert [len(s._compiled) for s in pipe.stages] == [1, 1, 1]  # runtime values: no retrace
  outs = pipe.sample(4, guidance=1.0, aug_level=0.0, stage_outputs=True, **kw)
  assert [o.shape[1] for o in outs] == [8, 16, 32]
  np.testing.assert_array_equal(outs[-1], a)
  # The SR chain alone from the base output reproduces the whole cascade.
  again = pipe.sample(4, guidance=1.0, aug_level=0.0, base_images=outs[0], **kw)
  np.testing.assert_array_equal(again, a)


def test_notebook_executes_on_cascade_workdir(cascade_workdir, run_notebook):
  outputs = run_notebook(cascade_workdir, 3)
  text = "".join(o.get("text", "") for o in outputs)
  assert "cascade of 3 stages" in text


def test_smoke_pixel_model_trains_and_samples(tfds_dir, tmp_path, sample_cli):
  workdir = tmp_path / "pixel"
  _train("pixel.py:smoke", workdir, tfds_dir)
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["pixel"]["steps"] == 30 and summary["pixel"]["latent_shape"] == [32, 32, 1]
  assert not (workdir / "autoencoder").exists()
  history = [h for h in read_jsonl(workdir / "pixel" / "metrics.jsonl") if "loss" in h]
  assert history[-1]["loss"] < history[0]["loss"]
  a = sample_cli(workdir, tmp_path / "a.png", "--label=3", steps=4)
  assert a == sample_cli(workdir, tmp_path / "b.png", "--label=3", steps=4)


def test_compare_runs_on_a_tiny_budget(tfds_dir, tmp_path):
  out = tmp_path / "compare"
  cmd = [sys.executable, "-m", "benchmarks.compare", "--preset=smoke",
         "--budget_minutes=0.05", f"--out={out}", f"--data_dir={tfds_dir}", "--points=2",
         "--samples_per_class=2", "--curve_per_class=1", "--steps=3", "--batch=10",
         "--loss_images=20", "--loss_repeats=1", "--propagation_per_class=1",
         "--aug_levels=0,0.2", "--classifier_epochs=1",
         "--classifier_images=2000"]
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-4000:]
  report = json.loads((out / "compare.json").read_text())
  assert set(report["systems"]) == {"ldm", "pixel", "cascade"}
  for system, r in report["systems"].items():
    assert len(r["curve"]) == 2 and r["curve"][-1]["num_samples"] == 20
    assert 0 <= r["curve"][-1]["class_accuracy"] <= 1
    assert np.isfinite(r["curve"][-1]["frechet_distance"])
    assert r["parameters_total"] > 0 and r["sampling_flops_per_image"] > 0
    assert all(np.isfinite(g["gap"]) for g in r["loss_gap"].values())
    assert all(v["train_flops_per_image"] > 0 for v in r["plan"].values())
  ldm, pixel = report["systems"]["ldm"], report["systems"]["pixel"]
  assert set(ldm["loss_gap"]) == {"ldm"} and set(report["systems"]["cascade"]["loss_gap"]) == {
      "base", "sr16", "sr32"}
  # A budget smaller than the compilation leaves the floor: two steps per curve point.
  assert pixel["plan"]["pixel"]["num_steps"] == 4 and ldm["plan"]["ldm"]["num_steps"] == 4
  prop = report["error_propagation"]
  assert set(prop) == {"trained with augmentation", "trained without augmentation"}
  assert set(prop["trained with augmentation"]) == {"aug_0", "aug_0.2"}
  for name in ("compare.md", "quality_vs_time.png", "samples.png", "error_propagation.png"):
    assert (out / name).stat().st_size > 0
  assert "| cascade |" in (out / "compare.md").read_text()

  # Each system at its own best setting, and memorisation, on the same trained workdirs.
  cmd = [sys.executable, "-m", "benchmarks.compare_sweep", f"--out={out}", "--steps=3",
         "--batch=10", "--sweep_per_class=1", "--final_per_class=2", "--guidance=1,3",
         "--thresholding=static,dynamic", "--aug_levels=0.1,0.3", "--sr_guidance=1",
         "--judge_epochs=1", "--judge_train_images=2000", f"--cache_dir={tmp_path / 'cache'}",
         "--memorisation_train_images=500"]
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-4000:]
  sweep = json.loads((out / "sweep.json").read_text())
  rows = {s: r["sweep"] for s, r in sweep["systems"].items()}
  assert [len(rows[s]) for s in ("ldm", "pixel", "cascade")] == [2, 3, 3]
  for system, r in sweep["systems"].items():
    assert r["best"] in [{k: row[k] for k in r["best"]} for row in r["sweep"]]
    assert r["final"]["num_samples"] == 20 and np.isfinite(r["final"]["frechet_distance"])
    assert r["memorisation"]["ratio"] > 0 and r["memorisation"]["train_images"] == 500
    assert (out / f"memorisation_{system}.png").stat().st_size > 0
  assert set(sweep["systems"]["cascade"]["best"]) == {"guidance", "aug_level", "sr_guidance"}
  assert "| pixel |" in (out / "sweep.md").read_text()


@pytest.mark.parametrize("config_name, preset, expected", [
    ("pixel", "default", {"pixel": (1, 20)}),
    ("cascade", "default", {"base": (1, 20), "sr16": (0.3, 10), "sr32": (0.3, 10)}),
    ("cascade", "imagenet64_256", {"base": (200, 600), "sr256": (50, 500)}),
])
def test_presets_build_with_their_stage_shapes(config_name, preset, expected):
  """Every stage of the presets builds (shapes only) at its resolution; parameter counts in
  millions within the published models' range for the accelerator preset."""
  from ldm_jax.sampling import load
  config = workdir_lib.migrate(importlib.import_module(f"configs.{config_name}").get_config(preset))
  checks.check_stages(config)
  for stage, (lo, hi) in expected.items():
    size = load.stage_resolution(config, stage)
    codec = codecs.PixelCodec(size, config.data.channels)
    task = DiffusionTask(config, stage, codec, 1000 if preset.startswith("imagenet") else 10,
                         lowres_resolution=load.lowres_resolution(config, stage))
    state = jax.eval_shape(task.init_state, jax.random.key(0))
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)) / 1e6
    assert lo < n < hi, (stage, n)


def _x0_error_gain(block) -> float:
  """How much an error in the network's output moves the x_0 the sampler's first step uses
  (d x0^ / d out at the first DDIM timestep of the stage's own sample.steps)."""
  sched = diffusion.make_schedule(block.diffusion.schedule, block.diffusion.num_timesteps,
                                  block.diffusion.beta_start, block.diffusion.beta_end)
  t = jnp.asarray([diffusion.timesteps("leading", sched.num_timesteps, block.sample.steps,
                                       1)[0]], jnp.int32)
  x = jnp.zeros((1, 1, 1, 1))
  f = lambda out: diffusion.predict_x0_and_eps(  # noqa: E731
      sched, x, t, out, block.diffusion.parameterization)[0].sum()
  return float(jax.grad(f)(jnp.zeros((1, 1, 1, 1))).sum() ** 2) ** 0.5


@pytest.mark.parametrize("preset", ["default", "smoke", "imagenet64_256"])
def test_super_resolution_stages_do_not_amplify_their_error_into_x0(preset):
  """The cause of the SR stages that lost to bicubic upsampling (issue 20): eps-prediction
  turns an output error d into an x_0 error d sigma / alpha, 95x at the linear schedule's
  first sampling step, so a short-trained SR model's early x_0 was noise whatever its
  low-resolution input said and the chain drifted into saturated noise. SR stages predict v
  (x_0^ = alpha x_t - sigma v^: the error is never amplified)."""
  config = cascade_configs.get_config(preset)
  sr = [s for s in config.stages if config[s].lowres.stage]
  assert sr
  for stage in sr:
    assert _x0_error_gain(config[stage]) <= 1.0, stage
    eps = config[stage].copy_and_resolve_references()
    eps.diffusion.parameterization = "eps"
    assert _x0_error_gain(eps) > 10.0  # what the eps stages had: the check can fail


def test_cascade_stage_settings_per_stage_and_defaults(cascade_workdir):
  from ldm_jax.sampling import settings as stage_settings
  from ldm_jax.sampling import LatentDiffusionPipeline
  pipe = LatentDiffusionPipeline.from_workdir(str(cascade_workdir))
  own = pipe.stage_settings()
  # Each stage's own config: the base guided, SR stages unguided, pixels clipped, aug levels.
  assert [s["guidance"] for s in own] == [3.0, 1.0, 1.0]
  assert [s["aug_level"] for s in own] == [None, 0.1, 0.1]
  assert [s["steps"] for s in own] == [4, 4, 4]
  assert [st.thresholding.kind for st in pipe.stages] == ["static"] * 3
  given = stage_settings.parse_all(guidance="2,1.5,1", steps="3,2,2", aug_level="0.2,0",
                                   thresholding="dynamic", sampler=None, eta=None)
  kw = stage_settings.sample_kwargs(pipe, given)
  assert kw["guidance"] == [2.0, 1.5, 1.0] and kw["steps"] == [3, 2, 2]
  assert kw["aug_level"] == [None, 0.2, 0.0] and kw["thresholding"] == ["dynamic"] * 3
  assert stage_settings.total_steps(kw) == 7
  rec = stage_settings.recorded(pipe, kw)
  assert rec["thresholding"] == ["dynamic (p=0.995, no upper bound)"] * 3
  base = dict(seed=0, labels=[1, 2, 3, 4], as_uint8=False)
  a = pipe.sample(4, **kw, **base)
  b = pipe.sample(4, **{**kw, "thresholding": ["dynamic", "dynamic", "none"]}, **base)
  c = pipe.sample(4, **{**kw, "guidance": [2.0, 1.5, 3.0]}, **base)
  assert a.shape == (4, 32, 32, 1) and not np.allclose(a, b) and not np.allclose(a, c)
  with pytest.raises(UserError, match="one per stage"):
    pipe.sample(4, steps=[3, 2], **base)
  for bad, match in (("guidance", "not a float"), ("thresholding", "one of"),
                     ("steps", "not a int")):
    with pytest.raises(UserError, match=match):
      stage_settings.parse(bad, "x")
  with pytest.raises(UserError, match="aug_level"):
    stage_settings.parse("aug_level", "1.5")


def test_evaluate_cascade_reports_each_sr_stage_against_bicubic(cascade_workdir, tmp_path):
  from ldm_jax.evaluation import run
  opts = run.Options(num_samples=10, batch_size=10, steps="2,2,2", guidance="2,1,1",
                     thresholding="static,none,static", sr_images=12, max_test_images=30,
                     judge_epochs=1, judge_train_images=256, cache_dir=str(tmp_path / "c"))
  result = run.evaluate(str(cascade_workdir), opts, log=lambda m: None)
  assert result["steps"] == [2, 2, 2] and result["guidance"] == [2.0, 1.0, 1.0]
  assert result["thresholding"] == ["static (clip to +-1)", "none", "static (clip to +-1)"]
  sr = result["super_resolution"]
  assert sorted(sr) == ["sr16", "sr32"]
  for name, r in sr.items():
    assert r["num_images"] == 12 and np.isfinite(r["psnr_sr"]) and r["psnr_bicubic"] > 5
    assert 0 <= r["accuracy_sr"] <= 1 and 0 <= r["accuracy_real"] <= 1
    assert r["settings"]["aug_level"] == 0.0 and r["settings"]["steps"] == 2
  assert sr["sr16"]["settings"]["thresholding"] == "none"
  saved = json.loads(open(result["path"], encoding="utf-8").read())
  assert saved["super_resolution"]["sr32"]["psnr_sr"] == sr["sr32"]["psnr_sr"]
