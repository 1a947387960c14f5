"""A workdir is trained by one train.py at a time and keeps its config (issue 22 items 1, 2, 7):
the lock and its take-over of a dead holder, the refusal of a changed config with the keys that
may change on resume, an unreadable config.json, a checkpoint that does not fit the config, and
an unknown preset of every config file, each one line."""
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from ldm_jax import workdir as workdir_lib
from ldm_jax.checkpoint import DAMAGED, Checkpointer, abstract_like
from ldm_jax.errors import ConfigMismatch, UserError
from ldm_jax.train import config_change, lock
from ldm_jax.train.run import keep_config, run

from configs import autoencoder as ae_configs
from configs import cascade as cascade_configs
from configs import finetune as finetune_configs
from configs import ldm as ldm_configs
from configs import pixel as pixel_configs

ROOT = pathlib.Path(__file__).parents[1]

PRESETS = {ae_configs: ("default", "smoke", "kl_f8", "kl_f4"),
           ldm_configs: ("default", "smoke", "text", "cin256", "txt2img_f8"),
           pixel_configs: ("default", "smoke"),
           cascade_configs: ("default", "smoke", "imagenet64_256")}
EVERY_CONFIG_FILE = {**PRESETS, finetune_configs: ("default", "lora")}


def _dead_pid() -> int:
  p = subprocess.Popen(["true"])
  p.wait()
  return p.pid


def _write_lock(workdir, **holder):
  (workdir / lock.LOCK_FILE).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": os.getpid(), "started": 0.0,
       "started_utc": "1970-01-01T00:00:00+00:00", **holder}))


# --- one trainer per workdir -------------------------------------------------------------

def test_lock_is_taken_released_and_refused_to_a_second_trainer(tmp_path):
  with lock.held(str(tmp_path)) as path:
    holder = json.loads(pathlib.Path(path).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(UserError, match=rf"is being trained by another train.py \(pid "
                                        rf"{os.getpid()} on {socket.gethostname()}, started "):
      lock.acquire(str(tmp_path))
    assert os.path.exists(path)  # the refusal leaves the holder's lock alone
  assert not os.path.exists(path)


@pytest.mark.parametrize("holder", ["dead pid", "reused pid", "zombie", "unreadable"])
def test_lock_of_a_holder_that_is_gone_is_taken_over_with_a_warning(tmp_path, caplog, holder):
  zombie = None
  if holder == "dead pid":
    _write_lock(tmp_path, pid=_dead_pid(), started=1e18)
  elif holder == "reused pid":  # this pid, but this process started after the lock was taken
    _write_lock(tmp_path, started=0.0)
  elif holder == "zombie":  # killed, not yet reaped by its parent
    zombie = subprocess.Popen(["sleep", "60"])
    zombie.kill()
    for _ in range(200):
      if pathlib.Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
        break
    _write_lock(tmp_path, pid=zombie.pid, started=1e18)
  else:
    (tmp_path / lock.LOCK_FILE).write_text('{"host": "')  # killed while writing it
  with caplog.at_level(logging.WARNING):
    path = lock.acquire(str(tmp_path))
  assert json.loads(pathlib.Path(path).read_text())["pid"] == os.getpid()
  assert "taking over the lock of a trainer that is gone" in caplog.text
  lock.release(path)
  if zombie is not None:
    zombie.wait()


def test_lock_held_on_another_host_says_how_to_remove_it(tmp_path):
  _write_lock(tmp_path, host="other-host.example", pid=1, started=1e18)
  with pytest.raises(UserError, match=r"locked by a train.py on another host \(pid 1 on "
                                      r"other-host.example.*if that job is gone, delete "):
    lock.acquire(str(tmp_path))
  assert (tmp_path / lock.LOCK_FILE).exists()


def test_second_train_py_exits_at_once_naming_the_holder_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  path = lock.acquire(str(workdir))  # a live trainer: this test process
  try:
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/ldm.py:smoke",
         f"--workdir={workdir}"], capture_output=True, text=True, timeout=300)
  finally:
    lock.release(path)
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert done.returncode == 1 and len(lines) == 1, done.stderr
  assert lines[0].startswith(f"error: {workdir} is being trained by another train.py (pid "
                             f"{os.getpid()} on {socket.gethostname()}, started "), lines[0]
  assert lines[0].endswith(f"; lock {workdir}/{lock.LOCK_FILE}"), lines[0]
  assert sorted(p.name for p in workdir.iterdir()) == []  # nothing written, lock released


# --- a workdir keeps its config -----------------------------------------------------------

@pytest.mark.parametrize("module, preset",
                         [(m, p) for m, presets in PRESETS.items() for p in presets],
                         ids=[f"{m.__name__}:{p}" for m, presets in PRESETS.items()
                              for p in presets])
def test_every_preset_resumes_with_its_own_stored_config(tmp_path, module, preset):
  config = workdir_lib.migrate(module.get_config(preset))
  workdir_lib.write_config(config, str(tmp_path))
  assert config_change.changed_keys(workdir_lib.read_config(str(tmp_path)), config) == []


def _stored_smoke(tmp_path):
  config = workdir_lib.migrate(ldm_configs.get_config("smoke"))
  config.ldm.diffusion.latent_scale = 0.8125  # as resolved by a first run
  workdir_lib.write_config(config, str(tmp_path))
  return workdir_lib.migrate(ldm_configs.get_config("smoke"))  # what a resume passes


def test_changed_config_is_refused_in_one_line_and_nothing_is_written(tmp_path):
  new = _stored_smoke(tmp_path)
  before = (tmp_path / "config.json").read_text()
  new.ldm.unet.model_channels = 2 * new.ldm.unet.model_channels
  new.loss.kl_weight = 0.5
  with pytest.raises(UserError) as info:
    run(new, str(tmp_path))
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"{tmp_path} was trained with another config (2 changed key(s): ")
  assert "ldm.unet.model_channels: " in message and "loss.kl_weight: 1e-06 -> 0.5" in message
  assert "use a new --workdir, or --allow_config_change" in message
  assert (tmp_path / "config.json").read_text() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # lock released


def test_changes_list_changed_values_first_and_stages_before_all():
  stored = workdir_lib.migrate(ae_configs.get_config("smoke"))
  changes = config_change.changed_keys(stored, workdir_lib.migrate(pixel_configs.get_config("smoke")))
  assert changes[0] == ("stages", ["autoencoder"], ["pixel"])
  one_side = ["<absent>" in (old, new) for _, old, new in changes]
  assert one_side == sorted(one_side) and not one_side[0] and one_side[-1]


def test_allow_config_change_that_the_checkpoints_do_not_fit_keeps_their_config(tmp_path,
                                                                               tfds_dir):
  """--allow_config_change with another architecture: one line, and config.json is again the
  config the checkpoints were trained with (sampling and a plain resume still work)."""
  def smoke(steps):
    c = pixel_configs.get_config("smoke")
    c.data.data_dir = str(tfds_dir)
    c.pixel.train.num_steps = steps
    c.pixel.train.sr_eval_images = 0
    return c
  run(smoke(2), str(tmp_path))
  before = (tmp_path / "config.json").read_bytes()
  wider = smoke(4)
  wider.pixel.unet.model_channels *= 2
  with pytest.raises(ConfigMismatch) as info:
    run(wider, str(tmp_path), allow_config_change=True)
  message = str(info.value)
  assert "\n" not in message and "pixel/checkpoints/2 does not fit the config" in message
  assert message.endswith(f"{tmp_path}/config.json is back to the config they were trained with")
  assert (tmp_path / "config.json").read_bytes() == before
  assert len(list(tmp_path.glob("config.previous-*.json"))) == 1
  assert not (tmp_path / "train.lock").exists()


def test_changes_list_the_first_few_keys_with_old_and_new_values():
  changes = [(f"k{i}", i, i + 1) for i in range(7)]
  assert config_change.describe(changes) == "k0: 0 -> 1, k1: 1 -> 2, k2: 2 -> 3, k3: 3 -> 4 " \
                                             "and 3 more"


def test_resumable_keys_may_change_and_a_resolved_latent_scale_is_kept(tmp_path):
  new = _stored_smoke(tmp_path)
  new.ldm.train.num_steps *= 2
  new.ldm.train.checkpoint_every = 7
  new.train.log_every = 3
  new.ldm.optim.lr = 1e-5
  new.ldm.optim.warmup_steps = 11
  new.ldm.sample.steps = 13
  new.ldm.train.grad_accum_steps = 2
  new.data.num_threads = 1
  new.data.data_dir = "/elsewhere"
  new.mesh.data = 2
  kept = keep_config(new, str(tmp_path), allow_config_change=False)
  assert kept.ldm.diffusion.latent_scale == 0.8125  # resolved by the first run, not 0 again
  assert kept.ldm.train.num_steps == new.ldm.train.num_steps and kept.ldm.optim.lr == 1e-5
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_allow_config_change_keeps_the_old_config_beside_the_new(tmp_path, caplog):
  new = _stored_smoke(tmp_path)
  before = (tmp_path / "config.json").read_text()
  new.ldm.diffusion.parameterization = "v"
  with caplog.at_level(logging.WARNING):
    kept = keep_config(new, str(tmp_path), allow_config_change=True)
  assert kept.ldm.diffusion.parameterization == "v"
  previous = sorted(tmp_path.glob("config.previous-*.json"))
  assert len(previous) == 1 and previous[0].read_text() == before
  assert "ldm.diffusion.parameterization: 'eps' -> 'v'" in caplog.text


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a config: it holds a JSON list"),
    (b"\xff\xfe\x00garbage", "is not valid JSON"),
])
def test_unreadable_config_json_is_one_line_and_left_untouched(tmp_path, content, message):
  path = tmp_path / "config.json"
  (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
  before = path.read_bytes()
  with pytest.raises(UserError, match=f"{path} {message}") as info:
    run(ldm_configs.get_config("smoke"), str(tmp_path))
  assert "\n" not in str(info.value)
  assert path.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def _abstract(tree):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return abstract_like(tree, jax.tree.map(lambda _: one, tree))


def test_checkpoint_that_does_not_fit_the_config_says_so_and_is_not_quarantined(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=5, save_every=1, async_save=False)
  for step in (1, 2):
    ckpt.save(step, {"params": {"w": jnp.ones((4, 8)), "b": jnp.zeros((8,))}}, {"step": step},
              force=True)
  ckpt.wait()
  wider = _abstract({"params": {"w": jnp.ones((4, 16)), "b": jnp.zeros((16,))}})
  with pytest.raises(UserError) as info:
    ckpt.restore_newest(wider, quarantine=True)
  assert str(info.value).startswith(
      f"checkpoint {tmp_path}/2 does not fit the config (params.b has shape (8,) in the "
      "checkpoint, (16,) in the config): the config changed since it was saved")
  grown = _abstract({"params": {"w": jnp.ones((4, 8)), "b": jnp.zeros((8,)),
                                    "extra": jnp.zeros((3,))}})
  with pytest.raises(UserError, match=r"1 array\(s\) of the config are not in the checkpoint, "
                                      r"e\.g\. params\.extra"):
    ckpt.restore_newest(grown, quarantine=True)
  assert not (tmp_path / DAMAGED).exists() and ckpt.all_steps() == [1, 2]
  ckpt.close()


# --- one line for an unknown preset ---------------------------------------------------------

@pytest.mark.parametrize("module", list(EVERY_CONFIG_FILE), ids=lambda m: m.__name__)
def test_unknown_preset_lists_the_presets(module):
  with pytest.raises(UserError) as info:
    module.get_config("nope")
  name = module.__name__.rsplit(".", 1)[-1]
  assert str(info.value) == (f"unknown preset 'nope' for configs/{name}.py "
                             f"({', '.join(EVERY_CONFIG_FILE[module])})")


@pytest.mark.parametrize("config, line", [
    ("configs/pixel.py:nope", "error: unknown preset 'nope' for configs/pixel.py (default, smoke)"),
    ("configs/nope.py", "error: --config=configs/nope.py: no such file"),
])
def test_train_py_unknown_preset_or_config_file_is_one_line(tmp_path, config, line):
  done = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--config={config}",
                         f"--workdir={tmp_path}/run"], capture_output=True, text=True, cwd=ROOT)
  lines = [x for x in done.stderr.splitlines() if x.strip()]
  assert done.returncode == 1 and lines == [line], done.stderr


def test_checkpoint_setup_prints_no_library_warning(tmp_path):
  """The convert CLIs, train.py and sample.py all create a Checkpointer: orbax's 'Type handler
  registry ... overriding' warning must not reach their output (issue 22 item 7)."""
  code = ("from ldm_jax.checkpoint import Checkpointer\n"
          f"Checkpointer({str(tmp_path / 'c')!r}, async_save=False).close()\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert done.returncode == 0, done.stderr
  assert "overriding" not in done.stderr and "Type handler" not in done.stderr, done.stderr
