"""Odd data a user may hand us (issue 11, items 5, 9, 10, 11): every image mode, symbolic links
out of and around the folder, undecodable files, data that changed under a resumed run."""
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from PIL import Image
import pytest

from ldm_jax import data, sharding
from ldm_jax.data import folder as folder_lib
from ldm_jax.data import sources
from ldm_jax.errors import UserError
from ldm_jax.train import loop
from ldm_jax.train.state import TrainState

# --- image modes ---------------------------------------------------------------------------------
# Each case: a 1-row image written in one Pillow mode and the uint8 pixels expected, worked out
# by hand from the documented rule (ldm_jax/data/images.py).


def _palette(colors):
  return [c for rgb in colors for c in rgb] + [0] * (768 - 3 * len(colors))


def _p_image(transparent):
  image = Image.new('P', (3, 1))
  image.putpalette(_palette([(255, 0, 0), (0, 0, 255), (10, 200, 30)]))
  image.putdata([0, 1, 2])
  if transparent:
    image.info['transparency'] = 0  # Index 0 (red) fully transparent.
  return image


def _row(values, dtype, mode=None):
  return Image.fromarray(np.array([values], dtype), mode)


MODE_CASES = [
    # (id, image, file name, expected [1, W, C])
    ('1', _row([0, 1, 1, 0], bool), 'a.png', [[0], [255], [255], [0]]),
    ('L', _row([0, 7, 128, 255], np.uint8), 'a.png', [[0], [7], [128], [255]]),
    # 16 bits scale by 1/257: 25700 = 100 * 257, 1000 / 257 = 3.89, 32896 = 128 * 257.
    ('I;16', _row([0, 25700, 65535, 1000, 32896], np.uint16), 'a.png',
     [[0], [100], [255], [4], [128]]),
    ('I;16B', Image.frombytes('I;16B', (3, 1), np.array([0, 514, 65535], '>u2').tobytes()),
     'a.tif', [[0], [2], [255]]),
    ('I', _row([0, 25700, 65535, 128], np.int32), 'a.tif', [[0], [100], [255], [0]]),
    # Floats are [0, 1]: 0.2 * 255 = 51, 0.25 * 255 = 63.75.
    ('F', _row([0.0, 0.2, 1.0, 0.25], np.float32), 'a.tif', [[0], [51], [255], [64]]),
    ('P', _p_image(False), 'a.png', [[255, 0, 0], [0, 0, 255], [10, 200, 30]]),
    ('P+transparency', _p_image(True), 'a.png', [[255, 255, 255], [0, 0, 255], [10, 200, 30]]),
    ('P+transparency.gif', _p_image(True), 'a.gif',
     [[255, 255, 255], [0, 0, 255], [10, 200, 30]]),
    # Over white: alpha 128 gives 200 * 128/255 + 255 * 127/255 = 227.4.
    ('LA', _row([[10, 0], [20, 255], [200, 128]], np.uint8, 'LA'), 'a.png',
     [[255], [20], [227]]),
    ('L+transparency', _row([10, 20], np.uint8), 'key.png', [[255], [20]]),
    ('RGB', _row([[1, 2, 3], [250, 128, 0]], np.uint8), 'a.png', [[1, 2, 3], [250, 128, 0]]),
    ('RGB+transparency', _row([[1, 2, 3], [4, 5, 6]], np.uint8), 'key.png',
     [[255, 255, 255], [4, 5, 6]]),
    # 0 * 128/255 + 255 * 127/255 = 127 exactly.
    ('RGBA', _row([[255, 0, 0, 255], [0, 255, 0, 0], [0, 0, 0, 128]], np.uint8, 'RGBA'),
     'a.png', [[255, 0, 0], [255, 255, 255], [127, 127, 127]]),
    # R = (255 - C)(255 - K) / 255: K = 51 leaves 204.
    ('CMYK', _row([[0, 0, 0, 0], [255, 0, 0, 0], [100, 50, 25, 0], [0, 0, 0, 255],
                   [0, 0, 0, 51]], np.uint8, 'CMYK'), 'a.tif',
     [[255, 255, 255], [0, 255, 255], [155, 205, 230], [0, 0, 0], [204, 204, 204]]),
]


def _save(image, path):
  if path.name == 'key.png':  # A tRNS colour key on an L or RGB image.
    image.save(path, transparency=10 if image.mode == 'L' else (1, 2, 3))
  elif image.mode == 'P' and 'transparency' in image.info:
    image.save(path, transparency=image.info['transparency'])
  else:
    image.save(path)


@pytest.mark.parametrize('case', MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_every_mode_reads_as_documented(tmp_path, case):
  name, image, filename, expected = case
  path = tmp_path / filename
  _save(image, path)
  mode = name.split('+')[0]
  with Image.open(path) as reread:  # The file really holds the mode under test.
    assert reread.mode == mode, reread.mode
  got = data.load_image(path)
  np.testing.assert_array_equal(got, np.array([expected], np.uint8))


def test_modes_through_a_folder_into_the_value_range(tmp_path):
  """16-bit mid-gray reaches the model as mid-gray, not white (the bug of issue 11 item 9)."""
  root = tmp_path / 'images'
  root.mkdir()
  Image.fromarray(np.full((4, 4), 32896, np.uint16)).save(root / 'gray16.png')  # 128 * 257.
  Image.fromarray(np.array([[0.0, 1.0], [0.5, 0.5]], np.float32)).save(root / 'float.tif')
  source = sources.folder_source(root)
  assert [f.name for f in source.files] == ['float.tif', 'gray16.png']
  x = data.preprocess(source[1]['image'], 4, 1)
  np.testing.assert_allclose(x, 128 / 127.5 - 1, atol=1e-6)


@pytest.mark.parametrize('values, dtype, match', [
    ([-1, 70000], np.int32, r'\[-1, 70000\].*16-bit'),
    ([0.0, 255.0], np.float32, r'\[0.0, 255.0\].*\[0, 1\]'),
    ([0.0, np.nan], np.float32, r'\[0, 1\]'),
], ids=['I beyond 16 bits', 'F in 0..255', 'F nan'])
def test_out_of_range_modes_are_refused_naming_the_file(tmp_path, values, dtype, match):
  path = tmp_path / 'odd.tif'
  _row(values, dtype).save(path)
  with pytest.raises(UserError, match=match) as e:
    data.load_image(path)
  assert str(path) in str(e.value) and '\n' not in str(e.value)


# --- symbolic links ------------------------------------------------------------------------------

def _png(path, value=0):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((2, 2), value, np.uint8)).save(path)


def test_symlinks_never_leave_the_folder_and_visit_each_file_once(tmp_path, caplog):
  outside = tmp_path / 'outside'
  _png(outside / 'secret.png', 9)
  root = tmp_path / 'root'
  _png(root / 'cat' / 'a.png', 1)
  _png(root / 'dog' / 'b.png', 2)
  (root / 'cat' / 'loop').symlink_to('..')  # The root itself: inside, already visited.
  (root / 'cat' / 'up').symlink_to('../..')  # Outside.
  (root / 'cat' / 'stolen.png').symlink_to(outside / 'secret.png')  # Outside.
  (root / 'dog' / 'again.png').symlink_to('b.png')  # Same file twice.
  (root / 'pets').symlink_to('cat')  # Same class folder twice.
  (root / 'stray').symlink_to(outside)  # Outside class folder.
  (outside / 'secret.txt').write_text('private')
  (root / 'cat' / 'a.txt').symlink_to(outside / 'secret.txt')  # An outside caption.
  (root / 'dog' / 'x.png').symlink_to('y.png')  # A loop of links.
  (root / 'dog' / 'y.png').symlink_to('x.png')
  with caplog.at_level(logging.WARNING):
    source = sources.folder_source(root)
  assert [os.path.relpath(f, root) for f in source.files] == ['cat/a.png', 'dog/again.png']
  assert source.class_names == ['cat', 'dog'] and source.labels == [0, 1]
  assert all(os.path.realpath(f).startswith(str(root.resolve()) + os.sep) for f in source.files)
  assert [int(source[i]['image'][0, 0, 0]) for i in range(2)] == [1, 2]
  warnings = [r.getMessage() for r in caplog.records if 'outside' in r.getMessage()]
  assert len(warnings) == 1 and 'skipped 4 symbolic link(s)' in warnings[0]
  assert source.captions is None  # The outside caption was not read.
  # The folder named through a link of its own is the same folder.
  (tmp_path / 'alias').symlink_to(root)
  assert len(sources.folder_source(tmp_path / 'alias')) == 2


# --- undecodable files ---------------------------------------------------------------------------

def _folder_with_bad_files(root):
  _png(root / 'cat' / 'a.png', 1)
  _png(root / 'cat' / 'b.png', 2)
  _png(root / 'dog' / 'c.png', 3)
  (root / 'cat' / 'bad.png').write_bytes(b'\x89PNG truncated')
  (root / 'dog' / 'zbad.jpg').write_bytes(b'\xff\xd8 not a jpeg')
  for stem, text in (('a', 'one'), ('bad', 'lost'), ('b', 'two'), ('c', 'three')):
    (root / 'cat' / f'{stem}.txt').write_text(text)
  (root / 'dog' / 'c.txt').write_text('three')
  return root


def test_bad_images_stop_before_training_or_are_skipped_once(tmp_path, caplog):
  root = _folder_with_bad_files(tmp_path / 'root')
  with pytest.raises(UserError) as e:
    sources.folder_source(root)
  message = str(e.value)
  assert '\n' not in message and str(root / 'cat' / 'bad.png') in message
  assert 'and 1 more' in message and 'data.skip_bad_images=True' in message
  cfg = data.default_data_config()
  assert cfg.skip_bad_images is False
  cfg.update(source='folder', folder=str(root), skip_bad_images=True)
  with caplog.at_level(logging.WARNING):
    source = sources.make_source(cfg, 'train')
  assert [f.name for f in source.files] == ['a.png', 'b.png', 'c.png']
  assert source.labels == [0, 0, 1] and source.captions == ['one', 'two', 'three']
  assert [int(source[i]['image'][0, 0, 0]) for i in range(3)] == [1, 2, 3]
  skipped = [r.getMessage() for r in caplog.records if 'undecodable' in r.getMessage()]
  assert len(skipped) == 1 and 'skipped 2 undecodable image(s) of 5' in skipped[0]
  assert str(root / 'cat' / 'bad.png') in skipped[0]
  assert str(root / 'dog' / 'zbad.jpg') in skipped[0]
  (root / 'dog' / 'c.png').write_bytes(b'broken too')
  with pytest.raises(UserError, match=r"class folder\(s\) \['dog'\] hold no decodable"):
    sources.folder_source(root, skip_bad_images=True)


def test_large_folder_checks_while_reading(tmp_path, monkeypatch, caplog):
  """Above the up-front bound a bad file is met while reading: an error, or (skip) the next
  image in its place, named once."""
  root = _folder_with_bad_files(tmp_path / 'root')
  monkeypatch.setattr(folder_lib, 'CHECK_MAX_FILES', 4)  # 5 files: too many to check.
  strict = sources.folder_source(root)
  assert not strict.checked and len(strict) == 5
  with pytest.raises(UserError, match=str(root / 'cat' / 'bad.png')):
    strict[2]  # cat/a, cat/b, cat/bad.png, dog/c, dog/zbad.jpg
  monkeypatch.setattr(folder_lib, 'CHECK_MAX_FILES', 100)
  monkeypatch.setattr(folder_lib, 'CHECK_MAX_BYTES', 10)  # 5 files of ~70 bytes: too big.
  source = sources.folder_source(root, skip_bad_images=True)
  assert not source.checked
  with caplog.at_level(logging.WARNING):
    for index in (2, 2, 3):  # bad.png -> the next image, dog/c.png (named once).
      example = source[index]
      assert int(example['image'][0, 0, 0]) == 3 and example['label'] == 1
      assert example['caption'] == 'three'
    last = source[4]  # dog/zbad.jpg wraps round to cat/a.png.
  assert int(last['image'][0, 0, 0]) == 1 and last['label'] == 0 and last['caption'] == 'one'
  assert source.skipped == [str(root / 'cat' / 'bad.png'), str(root / 'dog' / 'zbad.jpg')]
  named = [r.getMessage() for r in caplog.records if 'skipped' in r.getMessage()]
  assert len(named) == 2 and '1 skipped so far' in named[0] and '2 skipped so far' in named[1]
  assert all('\n' not in m for m in named)
  # Through the threaded batch stream: full batches, never an error.
  stream = data.BatchStream(source, global_batch=5, image_size=2, channels=1, seed=0,
                            num_threads=3)
  batch = next(stream.iterate(0))
  assert batch['image'].shape == (5, 2, 2, 1)


# --- data fingerprints ---------------------------------------------------------------------------

def test_folder_fingerprint_follows_the_file_list(tmp_path):
  root = tmp_path / 'root'
  _png(root / 'cat' / 'a.png')
  _png(root / 'dog' / 'b.png')
  first = sources.folder_source(root).fingerprint()
  assert first.startswith('folder: 2 images, sha256 ')
  shutil.copytree(root, tmp_path / 'moved')
  assert sources.folder_source(tmp_path / 'moved').fingerprint() == first
  _png(root / 'dog' / 'c.png', 5)  # Content changes are not fingerprinted; files are.
  added = sources.folder_source(root).fingerprint()
  assert added.startswith('folder: 3 images') and added != first
  (root / 'dog' / 'c.png').rename(root / 'cat' / 'c.png')  # Same count, other classes.
  moved = sources.folder_source(root).fingerprint()
  assert moved.startswith('folder: 3 images') and moved not in (first, added)


def test_compare_fingerprints():
  assert data.compare_fingerprints(None, 'folder: 2 images') is None  # Older checkpoint.
  assert data.compare_fingerprints('folder: 2 images', 'folder: 2 images') is None
  message = data.compare_fingerprints('folder: 2 images, sha256 aa', 'folder: 3 images, sha256 bb')
  assert 'folder: 2 images, sha256 aa' in message and 'folder: 3 images, sha256 bb' in message
  assert '\n' not in message


class _MeanTask:
  """The smallest task the loop can train: one scalar pulled towards the batch mean."""
  name = 'mean'
  tx = optax.sgd(0.1)  # One object: the state's static metadata must compare equal.

  def init_state(self, rng):
    del rng
    return TrainState.create({'w': jnp.zeros(())}, self.tx)

  def step_variant(self, step):
    return 0

  def make_train_step(self, variant):
    metrics = clu_metrics.Collection.create(loss=clu_metrics.Average.from_output('loss'))

    def step(state, batch, rng):
      loss, grads = jax.value_and_grad(
          lambda p: jnp.mean(jnp.square(batch['image'] - p['w'])))(state.params)
      return state.apply_gradients(grads), metrics.single_from_model_output(loss=loss)
    return step

  def step_constants(self):
    return ()

  def batch_keys(self):
    return {}


def test_resume_on_changed_data_warns_naming_both_fingerprints(tmp_path, caplog):
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  train = ml_collections.ConfigDict(dict(
      batch_size=8, num_steps=1, keep_checkpoints=2, checkpoint_every=1, async_checkpoint=False,
      progress_every_secs=1000.0, profile=False, log_every=1, eval_every=1000))

  def batches(start):
    while True:
      yield {'image': np.ones((8, 2, 2, 1), np.float32), 'label': np.zeros(8, np.int32)}

  def run(num_steps, fingerprint):
    train.num_steps = num_steps
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      loop.train_stage(_MeanTask(), train_cfg=train, seed=0, image_shape=(2, 1),
                       stage_dir=str(tmp_path), mesh=mesh, batches=batches,
                       meta={'data_fingerprint': fingerprint})
    return [r.getMessage() for r in caplog.records if 'data changed' in r.getMessage()]

  assert run(1, 'folder: 2 images, sha256 aa') == []
  assert run(2, 'folder: 2 images, sha256 aa') == []  # Same data: silent.
  warned = run(3, 'folder: 3 images, sha256 bb')
  assert len(warned) == 1
  assert 'folder: 2 images, sha256 aa' in warned[0] and 'folder: 3 images, sha256 bb' in warned[0]
  assert os.path.join('checkpoints', '2)') in warned[0]
