"""sample.py hardening (issue 11, items 12 and 13): numeric flags are validated up front with
one line, the output format follows the extension, and many samples stream to files in
restartable batches."""
import io
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldm_jax import workdir as workdir_lib
from ldm_jax.errors import UserError

ROOT = pathlib.Path(__file__).parents[1]
from ldm_jax.cli import sample  # defines sample.py's flags on absl's FLAGS

BAD_FLAGS = [
    (["--num_samples=0"], r"--num_samples=0 must be at least 1"),
    (["--num_samples=-3"], r"--num_samples=-3 must be at least 1"),
    (["--steps=0"], r"--steps=0 must be at least 1"),
    (["--batch_size=0"], r"--batch_size=0 must be at least 1"),
    (["--label=-1"], r"--label=-1 must be at least 0"),
    (["--guidance=nan"], r"--guidance=nan must be a finite number"),
    (["--guidance=inf"], r"--guidance=inf must be a finite number"),
    (["--eta=-0.5"], r"--eta=-0.5 must be at least 0"),
    (["--aug_level=1.5"], r"--aug_level=1.5 must be in \[0, 1\)"),
    (["--strength=nan"], r"--strength=nan must be a finite number"),
    (["--seed=-1"], r"--seed=-1 must be in \[0, 2\^32\)"),
    (["--out=grid.gif"], r"--out=grid.gif: unknown extension '.gif'"),
    (["--out=grid"], r"--out=grid: unknown extension '\(none\)'"),
    (["--out_dir=d", "--trajectory"], r"drop --trajectory"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_refused_before_loading(flags, message):
  sample.FLAGS(["sample.py", "--workdir=/nonexistent", *flags])
  try:
    with pytest.raises(UserError, match=message):
      sample._check_flags()  # pylint: disable=protected-access
  finally:
    sample.FLAGS.unparse_flags()


@pytest.mark.parametrize("flag", ["--num_samples=0", "--guidance=nan"])
def test_bad_flag_is_one_line_and_exit_1(flag, tmp_path):
  done = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--workdir={tmp_path}",
                         flag], capture_output=True, text=True)
  assert done.returncode == 1
  assert len(done.stderr.strip().splitlines()) == 1, done.stderr
  assert done.stderr.startswith(f"error: {flag}")


@pytest.fixture(scope="module")
def tiny_workdir(tfds_dir, tmp_path_factory):
  from test_evaluate import tiny_ldm_workdir  # pylint: disable=g-import-not-at-top
  return tiny_ldm_workdir(tmp_path_factory.mktemp("tiny_ldm_cli"), tfds_dir)


def _run(workdir, *flags):
  cmd = [sys.executable, str(ROOT / "sample.py"), f"--workdir={workdir}", "--steps=2",
         "--guidance=2", "--seed=5", *flags]
  done = subprocess.run(cmd, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def test_jpeg_grid_and_restartable_png_folder(tiny_workdir, tmp_path):
  _run(tiny_workdir, "--num_samples=4", f"--out={tmp_path / 'grid.jpg'}")
  data = (tmp_path / "grid.jpg").read_bytes()
  assert data[:3] == b"\xff\xd8\xff"  # a JPEG, not PNG bytes under a .jpg name
  assert Image.open(io.BytesIO(data)).format == "JPEG"

  out = tmp_path / "many"
  done = _run(tiny_workdir, "--num_samples=5", "--batch_size=2", f"--out_dir={out}")
  names = sorted(p.name for p in out.iterdir())
  assert names == [f"{i:06d}.png" for i in range(5)] + ["sampling.json"]
  assert "sampling  image 5/5" in done.stderr and "ETA" in done.stderr
  before = {n: (out / n).read_bytes() for n in names}
  (out / "000004.png").unlink()  # the last batch was lost: only it is sampled again
  done = _run(tiny_workdir, "--num_samples=5", "--batch_size=2", f"--out_dir={out}")
  assert "2 of 3 batches already on disk" in done.stderr
  assert {n: (out / n).read_bytes() for n in names} == before
  images = np.stack([np.asarray(Image.open(out / n)) for n in names[:5]])
  assert images.shape == (5, 32, 32) and images.std() > 0
  # Another seed into the same folder is refused (one line), never mixed in.
  cmd = [sys.executable, str(ROOT / "sample.py"), f"--workdir={tiny_workdir}", "--steps=2",
         "--guidance=2", "--seed=6", "--num_samples=5", "--batch_size=2", f"--out_dir={out}"]
  done = subprocess.run(cmd, capture_output=True, text=True)
  assert done.returncode == 1 and "Traceback" not in done.stderr
  assert done.stderr.strip().splitlines()[-1] == (
      f"error: {out} holds samples drawn with other settings (seed: 5 there, 6 now): use "
      "another output path or delete it")
  # The manifest names the checkpoint the images came from; a folder begun on another step
  # (here: the manifest edited to an older one) is refused rather than continued.
  manifest = json.loads((out / "sampling.json").read_text())
  checkpoints = pathlib.Path(workdir_lib.checkpoint_dir(str(tiny_workdir), "ldm"))
  newest = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert manifest["checkpoint_steps"] == {"ldm": newest}
  manifest["checkpoint_steps"] = {"ldm": newest - 1}
  (out / "sampling.json").write_text(json.dumps(manifest))
  cmd[cmd.index("--seed=6")] = "--seed=5"
  done = subprocess.run(cmd, capture_output=True, text=True)
  assert done.returncode == 1 and "checkpoint_steps" in done.stderr.strip().splitlines()[-1]


def test_a_config_that_the_checkpoint_does_not_fit_is_one_line(tiny_workdir, tmp_path):
  """config.json changed by hand after training: one line naming the stage and the step."""
  import shutil  # pylint: disable=g-import-not-at-top
  edited = tmp_path / "edited"
  shutil.copytree(tiny_workdir, edited)
  config = workdir_lib.read_config(str(edited))
  config.ldm.unet.model_channels *= 2
  workdir_lib.write_config(config, str(edited))
  cmd = [sys.executable, str(ROOT / "sample.py"), f"--workdir={edited}", "--steps=2",
         "--num_samples=2", f"--out={tmp_path / 'x.png'}"]
  done = subprocess.run(cmd, capture_output=True, text=True)
  last = done.stderr.strip().splitlines()[-1]
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert last.startswith("error: stage 'ldm': the parameters of checkpoint step 0 do not fit "
                         "the workdir's config (For parameter "), last
  assert last.endswith("the config changed since they were saved"), last


def test_step_picks_a_saved_checkpoint_and_is_recorded(tiny_workdir, tmp_path):
  tiny_workdir_ = tiny_workdir
  """--step samples an older checkpoint (other images, recorded in sampling.json); a step
  that was not saved is one line listing the saved ones."""
  import shutil  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from ldm_jax.checkpoint import Checkpointer, restore_eval_params  # pylint: disable=g-import-not-at-top
  tiny_workdir = tmp_path / "two_steps"
  shutil.copytree(tiny_workdir_, tiny_workdir)
  checkpoints = pathlib.Path(workdir_lib.checkpoint_dir(str(tiny_workdir), "ldm"))
  params, meta, _ = restore_eval_params(str(checkpoints))
  ckpt = Checkpointer(str(checkpoints), keep=5, save_every=1, async_save=False)
  # (shifted, not scaled: the UNet's last convolution starts at zero)
  ckpt.save(3, {"params": jax.tree.map(lambda p: p + 0.05, params)}, meta, force=True)
  ckpt.wait()
  ckpt.close()
  saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert saved == [0, 3], saved
  grids = {}
  for step in (saved[0], saved[-1]):
    out = tmp_path / f"s{step}"
    _run(tiny_workdir, "--num_samples=2", f"--step={step}", f"--out_dir={out}")
    manifest = json.loads((out / "sampling.json").read_text())
    assert manifest["checkpoint_steps"] == {"ldm": step}
    grids[step] = np.asarray(Image.open(out / "000000.png"))
  assert np.abs(grids[saved[0]].astype(int) - grids[saved[-1]]).max() > 0
  cmd = [sys.executable, str(ROOT / "sample.py"), f"--workdir={tiny_workdir}", "--steps=2",
         "--num_samples=2", "--step=999999", f"--out={tmp_path / 'x.png'}"]
  done = subprocess.run(cmd, capture_output=True, text=True)
  assert done.returncode == 1 and "Traceback" not in done.stderr
  assert done.stderr.strip().splitlines()[-1] == (
      f"error: no checkpoint step 999999 in {checkpoints}: the saved steps are "
      f"{', '.join(map(str, saved))}")
  assert not (tmp_path / "x.png").exists()
