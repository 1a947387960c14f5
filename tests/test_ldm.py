"""Stage 2 end to end: train.py on the smoke preset (both stages), sample.py, the notebook."""
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from ldm_jax.train.writers import read_jsonl

ROOT = pathlib.Path(__file__).parents[1]
from configs import ldm as ldm_configs


@pytest.fixture(scope="module")
def smoke_workdir(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ldm_smoke")
  cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/ldm.py:smoke",
         f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}"]
  done = subprocess.run(cmd, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-4000:]
  (workdir / "train.stderr").write_text(done.stderr)
  return workdir


def test_console_is_readable_when_piped(smoke_workdir):
  """Piped output: whole lines (no carriage returns), one progress line kind, a line at each
  stage boundary and a final one; no absl prefixes or library start-up notices."""
  text = (smoke_workdir / "train.stderr").read_text()
  assert "\r" not in text
  lines = text.splitlines()
  for noise in ("Unable to initialize backend", "dataset_info.json", "OpenCV", "oneDNN",
                "steps_per_sec", "Setting work unit notes", "] "):
    assert not any(noise in line for line in lines), (noise, text[-3000:])
  assert any(line.startswith("== autoencoder: autoencoder, 80 steps") for line in lines), text
  assert any(line.startswith("autoencoder: 80 steps, checkpoints in ") and "test PSNR" in line
             for line in lines), text
  assert any(line.startswith("ldm  step 60/60  loss ") and "steps/s  done" in line
             for line in lines), text
  assert any(line.startswith("ldm: ") and "final loss" in line for line in lines), text
  assert lines[-1] == f"done: {smoke_workdir / 'summary.json'}"


def test_smoke_run_trains_both_stages(smoke_workdir):
  summary = json.loads((smoke_workdir / "summary.json").read_text())
  assert summary["autoencoder"]["steps"] == 80
  ldm = summary["ldm"]
  assert ldm["steps"] == 60 and ldm["latent_shape"] == [8, 8, 4]
  assert (smoke_workdir / ldm["sample_grid"]).exists()
  config = json.loads((smoke_workdir / "config.json").read_text())
  # The estimated latent scale is stored in the resolved config and gives ~unit-std latents.
  assert config["ldm"]["diffusion"]["latent_scale"] == pytest.approx(ldm["latent_scale"])
  history = [h for h in read_jsonl(smoke_workdir / "ldm" / "metrics.jsonl") if "loss" in h]
  assert history[-1]["loss"] < 0.7 * history[0]["loss"]
  assert all(0.8 < h["latent_std"] < 1.25 for h in history)


def test_sample_cli_same_seed_same_png(smoke_workdir, tmp_path, sample_cli):
  a = sample_cli(smoke_workdir, tmp_path / "a.png")
  b = sample_cli(smoke_workdir, tmp_path / "b.png")
  assert a == b
  c = sample_cli(smoke_workdir, tmp_path / "c.png", "--label=7", "--trajectory",
              "--trajectory_frames=4")
  assert c != a


def test_sample_cli_missing_workdir_is_one_line(tmp_path):
  done = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--workdir={tmp_path}",
                         f"--out={tmp_path / 'x.png'}"], capture_output=True, text=True)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      f"error: no trained model in '{tmp_path}': looked for {tmp_path}/config.json")


def test_pipeline_guidance_one_and_runtime_values(smoke_workdir):
  from ldm_jax.sampling import LatentDiffusionPipeline
  pipe = LatentDiffusionPipeline.from_workdir(str(smoke_workdir))
  a = pipe.sample(4, steps=4, guidance=1.0, seed=0, labels=[1, 2, 3, 4], as_uint8=False)
  b = pipe.sample(4, steps=4, guidance=2.0, seed=0, labels=[1, 2, 3, 4], as_uint8=False)
  assert len(pipe._compiled) == 1  # the guidance scale is a runtime value
  assert not np.allclose(a, b)
  # Guidance 1 equals the conditional model alone: DDIM (eta 0) with the plain conditional
  # denoiser, started from the same noise.
  import jax.numpy as jnp
  from ldm_jax import diffusion
  from ldm_jax.models.autoencoder import AutoencoderKL
  r_init, r_steps = jax.random.split(jax.random.key(0))
  x_T = jax.random.normal(r_init, (4,) + pipe.latent_shape, jnp.float32)
  cond = {"labels": jnp.array([1, 2, 3, 4], jnp.int32)}
  z0 = diffusion.ddim_sample(lambda x, t: pipe.model(pipe.params, x, t, cond), x_T,
                             pipe.schedule, num_steps=4, rng=r_steps)
  ref = pipe.autoencoder.apply({"params": pipe.ae_params}, z0 / pipe.latent_scale,
                               method=AutoencoderKL.decode)
  np.testing.assert_allclose(a, np.clip(np.asarray(ref), -1, 1), atol=1e-4)


@pytest.mark.parametrize("preset", ["default", "text", "cin256", "txt2img_f8"])
def test_presets_build_and_initialise(preset):
  from ldm_jax.models.conditioning import Tokenizer
  from ldm_jax.train.autoencoder_task import AutoencoderTask
  from ldm_jax.models.codecs import LatentCodec
  from ldm_jax.train.diffusion_task import DiffusionTask
  from ldm_jax.train.diffusion_stage import caption_vocabulary
  from ldm_jax.data import CLASS_NAMES
  config = ldm_configs.get_config(preset)
  ae = AutoencoderTask(config).model
  tok = Tokenizer.from_captions(caption_vocabulary(CLASS_NAMES))
  task = DiffusionTask(config, "ldm", LatentCodec(ae, 1.0, config.data.image_size), 1000, tok)
  if preset in ("cin256", "txt2img_f8"):  # paper-size: shapes only
    state = jax.eval_shape(task.init_state, jax.random.key(0))
  else:
    state = jax.jit(task.init_state)(jax.random.key(0))
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)) / 1e6
  expected = {"default": (1, 20), "text": (1, 20), "cin256": (300, 500),
              "txt2img_f8": (800, 1600)}[preset]
  assert expected[0] < n < expected[1], n


def test_notebook_executes_on_smoke_workdir(smoke_workdir, run_notebook):
  outputs = run_notebook(smoke_workdir, 5)
  text = "".join(o.get("text", "") for o in outputs)
  assert "ldm: latent space [8, 8, 4]" in text


def test_damaged_stage2_checkpoint_falls_back_for_sampling_and_training(smoke_workdir, tmp_path,
                                                                        tfds_dir):
  """The newest stage-2 checkpoint truncated: sample.py samples from the one before (reading
  writes nothing), and the same train command resumes from it, moves the damaged step aside
  and trains to the end again."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "damaged"
  shutil.copytree(smoke_workdir, workdir)
  ckpts = workdir / "ldm" / "checkpoints"
  for f in (ckpts / "60" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  before = sorted(str(p) for p in workdir.rglob("*"))
  out = tmp_path / "s.png"
  done = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--workdir={workdir}",
                         "--num_samples=4", "--steps=4", f"--out={out}"],
                        capture_output=True, text=True)
  assert done.returncode == 0 and out.exists(), done.stderr[-3000:]
  assert f"{ckpts}/60 does not restore" in done.stderr or f"{ckpts}/60:" in done.stderr, (
      done.stderr[-3000:])
  assert sorted(str(p) for p in workdir.rglob("*")) == before
  cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/ldm.py:smoke",
         f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}"]
  done = subprocess.run(cmd, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"{ckpts}/60 does not restore" in done.stderr, done.stderr[-3000:]
  assert f"ldm: resumed from {ckpts} at step 30" in done.stderr
  assert (ckpts / "damaged" / "60").is_dir() and (ckpts / "60").is_dir()
  assert json.loads((workdir / "summary.json").read_text())["ldm"]["steps"] == 60
