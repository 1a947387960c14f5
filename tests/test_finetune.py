"""Fine-tuning (issue 21 item 1): `train.py --config=configs/finetune.py
--config.init_from=<workdir>` on a captioned folder, from a converted tiny random Stable
Diffusion; a class-conditional workdir on a class folder; diffusers' training loss on the same
batch; metadata.jsonl captions."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ldm_jax.checkpoint import restore_eval_params
from ldm_jax.data.folder import FolderSource
from ldm_jax.errors import UserError
from ldm_jax.train.writers import read_jsonl

torch = pytest.importorskip("torch", exc_type=ImportError)
diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
pytest.importorskip("transformers", exc_type=ImportError)

ROOT = pathlib.Path(__file__).parents[1]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
          "yellow": (230, 220, 30)}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def captioned_folder(folder, n=16, size=16, metadata=False):
  """n images: a coloured square on grey at a random place, captioned with its colour."""
  rng = np.random.default_rng(0)
  os.makedirs(folder, exist_ok=True)
  rows = []
  for i in range(n):
    name = list(COLORS)[i % len(COLORS)]
    img = np.full((size, size, 3), 128, np.uint8)
    y, x = rng.integers(0, size // 2, 2)
    img[y:y + size // 2, x:x + size // 2] = COLORS[name]
    Image.fromarray(img).save(os.path.join(folder, f"{i:03d}.png"))
    caption = f"a {name} square"
    if metadata:
      rows.append(json.dumps({"file_name": f"{i:03d}.png", "text": caption}))
    else:
      pathlib.Path(folder, f"{i:03d}.txt").write_text(caption)
  if metadata:
    pathlib.Path(folder, "metadata.jsonl").write_text("\n".join(rows) + "\n")
  return str(folder)


@pytest.fixture(scope="module")
def sd_workdir(tmp_path_factory):
  """A tiny random SD folder converted to a workdir; (reference pipeline, workdir)."""
  import test_parity_pipeline as tpp  # pylint: disable=g-import-not-at-top
  from ldm_jax.convert import stable_diffusion as sd  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp("finetune_sd")
  ref_pipe, folder = tpp.tiny_sd(tmp)
  workdir = str(tmp / "converted")
  sd.convert_diffusers(folder, workdir)
  return ref_pipe, workdir


def _train(workdir, init_from, data, steps, *extra):
  flags = {"init_from": init_from, "data.folder": data, "finetune.train.num_steps": steps,
           "finetune.train.batch_size": 8, "finetune.train.log_every": 1,
           "finetune.train.checkpoint_every": 4, "finetune.train.eval_every": 1000,
           "finetune.optim.lr": 2e-3, "finetune.optim.ema_decay": 0.9,
           "finetune.train.async_checkpoint": False}
  cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/finetune.py",
         f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in flags.items()], *extra]
  return subprocess.run(cmd, capture_output=True, text=True)


def _losses(workdir):
  rows = [r for r in read_jsonl(os.path.join(workdir, "ldm", "metrics.jsonl")) if "loss" in r]
  return {r["step"]: r["loss"] for r in rows}


def test_fine_tune_a_converted_sd_on_captions_resumes_exactly(sd_workdir, tmp_path):
  _, source = sd_workdir
  data = captioned_folder(tmp_path / "data")
  straight, resumed = str(tmp_path / "ft"), str(tmp_path / "ft_resumed")
  done = _train(straight, source, data, 16)
  assert done.returncode == 0, done.stderr[-3000:]
  losses = _losses(straight)
  assert sorted(losses) == list(range(1, 17))
  first, last = np.mean([losses[s] for s in range(1, 5)]), np.mean([losses[s] for s in
                                                                    range(13, 17)])
  print(f"fine-tune loss: first 4 steps {first:.4f}, last 4 {last:.4f}")
  assert last < first

  config = json.load(open(os.path.join(straight, "config.json"), encoding="utf-8"))
  assert config["init_from"] == os.path.abspath(source) and config["stages"] == ["ldm"]
  assert config["ldm"]["autoencoder_workdir"] == os.path.abspath(source)
  assert config["ldm"]["conditioning"]["kind"] == "clip"
  # The UNet moved, the CLIP text encoder (frozen by default) did not.
  src, _, _ = restore_eval_params(os.path.join(source, "ldm", "checkpoints"))
  ft, meta, step = restore_eval_params(os.path.join(straight, "ldm", "checkpoints"))
  assert step == 16 and meta["init_from"] == f"{os.path.abspath(source)}@0"
  jax.tree.map(np.testing.assert_array_equal, ft["text"], src["text"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ft["unet"],
                                       src["unet"]))
  assert max(moved) > 0

  # Stopped at 8 and resumed with the same command: the same losses and parameters.
  assert _train(resumed, source, data, 8).returncode == 0
  done = _train(resumed, source, data, 16)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from" in done.stderr
  assert _losses(resumed) == losses
  again, _, _ = restore_eval_params(os.path.join(resumed, "ldm", "checkpoints"))
  jax.tree.map(np.testing.assert_array_equal, again, ft)

  # The fine-tuned workdir samples like any other.
  out = tmp_path / "s.png"
  done = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--workdir={straight}",
                         "--prompt=a red square", "--steps=2", "--num_samples=2",
                         f"--out={out}"], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert out.exists()


def test_first_step_loss_equals_diffusers_training_loss(sd_workdir):
  """Our training loss (DiffusionTask.loss, what every step differentiates) against
  diffusers' train_text_to_image on the same images, captions, posterior noise, noise and
  timesteps: latents = vae.encode(x).latent_dist sampled * scaling_factor, add_noise, the
  UNet on the text encoder's last hidden state, MSE against the noise."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ldm_jax.sampling import LatentDiffusionPipeline  # pylint: disable=g-import-not-at-top
  from ldm_jax.train import finetune  # pylint: disable=g-import-not-at-top
  from ldm_jax.train.diffusion_task import DiffusionTask  # pylint: disable=g-import-not-at-top
  from configs import finetune as finetune_configs
  ref, source = sd_workdir
  cfg = finetune_configs.get_config()
  cfg.init_from = source
  config = finetune.resolve(cfg)
  pipe = LatentDiffusionPipeline.from_workdir(source)
  task = DiffusionTask(config, "ldm", pipe.codec, 0, pipe.model.tokenizer,
                       codec_params=pipe.codec_params)
  rng = np.random.default_rng(3)
  images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  post_noise = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  noise = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = np.array([37, 811], np.int32)
  captions = ["a red square", "a blue square"]
  cond = pipe.condition(2, prompt=captions)
  z0 = pipe.codec.from_moments(pipe.codec.moments(pipe.codec_params, images), post_noise)
  ours = float(task.loss(pipe.params, z0, t, noise, cond, jax.random.key(0)))

  nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
  with torch.no_grad():
    dist = ref.vae.encode(nchw(images)).latent_dist
    latents = (dist.mean + dist.std * nchw(post_noise)) * ref.vae.config.scaling_factor
    sched = diffusers.DDPMScheduler.from_config(ref.scheduler.config)
    noisy = sched.add_noise(latents, nchw(noise), torch.from_numpy(t).long())
    ids = ref.tokenizer(captions, padding="max_length", max_length=ref.tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
    hidden = ref.text_encoder(ids)[0]
    pred = ref.unet(noisy, torch.from_numpy(t).long(), hidden).sample
    theirs = float(torch.nn.functional.mse_loss(pred.float(), nchw(noise).float(),
                                                reduction="mean"))
  print(f"training loss ours {ours:.7f} diffusers {theirs:.7f}")
  assert abs(ours - theirs) <= 1e-5
  del ml_collections


def test_metadata_jsonl_captions_and_its_mistakes(tmp_path):
  data = captioned_folder(tmp_path / "meta", n=4, metadata=True)
  src = FolderSource(data)
  assert src.captions == ["a red square", "a green square", "a blue square", "a yellow square"]
  path = pathlib.Path(data, "metadata.jsonl")
  path.write_text('{"file_name": "000.png", "text": "x"}\n{"file_name": "nope.png", "text": "y"}\n')
  with pytest.raises(UserError, match=r"metadata\.jsonl line 2: 'nope\.png' is not an image"):
    FolderSource(data)
  path.write_text('{"file_name": "000.png"}\n')
  with pytest.raises(UserError, match=r"line 1: not a JSON object with \"file_name\" and"):
    FolderSource(data)
  path.write_text('{"file_name": "000.png", "text": "a"}\n{"file_name": "000.png", "text": "b"}\n')
  with pytest.raises(UserError, match=r"line 2: '000\.png' is listed twice \(first on line 1\)"):
    FolderSource(data)


def test_fine_tune_refusals_are_one_line(sd_workdir, tmp_path):
  _, source = sd_workdir
  plain = tmp_path / "plain"
  plain.mkdir()
  for i in range(2):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(plain / f"{i}.png")
  cases = [
      ((str(tmp_path / "nowhere"), str(plain)), "is not a workdir (no config.json)"),
      ((source, str(plain)), "has no captions: a CLIP-conditioned model trains on captioned"),
  ]
  for (init, data), message in cases:
    done = _train(str(tmp_path / "w"), init, data, 2)
    assert done.returncode == 1, done.stderr[-2000:]
    assert message in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
  done = _train(str(tmp_path / "w2"), source, captioned_folder(tmp_path / "d"), 2,
                "--config.data.image_size=32")
  assert done.returncode == 1
  assert "config.data.image_size=32 differs from the source model's 16" in done.stderr
  assert not (tmp_path / "w2" / "ldm").exists()


def test_fine_tune_a_class_conditional_workdir_on_a_class_folder(tfds_dir, tmp_path):
  """A class-conditional workdir fine-tunes on a folder with as many class folders as it has
  classes (labels by sorted folder name); another number of classes is one line."""
  from test_evaluate import tiny_ldm_workdir  # pylint: disable=g-import-not-at-top
  source = tiny_ldm_workdir(tmp_path / "class_src", tfds_dir)
  data = tmp_path / "classes"
  rng = np.random.default_rng(1)
  for c in range(10):
    (data / f"c{c}").mkdir(parents=True)
    for i in range(2):
      img = np.clip(rng.normal(25 * c, 20, (32, 32)), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(data / f"c{c}" / f"{i}.png")
  done = _train(str(tmp_path / "ft"), source, str(data), 4, "--config.finetune.train.batch_size=8")
  assert done.returncode == 0, done.stderr[-3000:]
  losses = _losses(str(tmp_path / "ft"))
  assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
  _, meta, _ = restore_eval_params(str(tmp_path / "ft" / "ldm" / "checkpoints"))
  assert meta["num_classes"] == 10 and meta["class_names"] == [f"c{c}" for c in range(10)]
  for c in range(3, 10):
    for f in (data / f"c{c}").iterdir():
      f.unlink()
    (data / f"c{c}").rmdir()
  done = _train(str(tmp_path / "ft3"), source, str(data), 4)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].endswith(
      "has 3 classes, the source model 10: its label table would not fit (fine-tune on a "
      "folder with as many class folders)")
