"""Tests for ldm_jax.data: Fashion-MNIST builder, sources, preprocessing, sampling, batching."""
import contextlib
import gzip
import itertools
import time

import numpy as np
from PIL import Image
import pytest

from conftest import FASHION_MNIST_DIR
from ldm_jax import data
from ldm_jax.data import fashion_mnist
from ldm_jax.data import sources
from ldm_jax.errors import UserError

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / 'train-images-idx3-ubyte.gz').exists(),
    reason=f'{FASHION_MNIST_DIR} missing (apt-get install dataset-fashion-mnist)')


@pytest.fixture(scope='session')
def fashion_train(tfds_dir):
  """Fashion-MNIST train split, prepared once into the session's TFDS dir."""
  start = time.perf_counter()
  source = sources.fashion_mnist_source('train', tfds_dir, download=False,
                                        local_dir=FASHION_MNIST_DIR)
  print(f'fashion_mnist_local prepared/loaded in {time.perf_counter() - start:.1f}s')
  return source


class FakeSource:
  """In-memory source: example i has label i and an image derived from i."""

  def __init__(self, n, shape=(12, 10, 3), fail_at=None):
    rng = np.random.default_rng(0)
    self.images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    self.fail_at = fail_at
    self.num_classes, self.class_names, self.name = 0, [], 'fake'

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    if i == self.fail_at:
      raise RuntimeError(f'broken record {i}')
    return {'image': self.images[i], 'label': i}


def _idx_first(path, header_bytes, size):
  with gzip.open(path, 'rb') as f:
    return np.frombuffer(f.read(header_bytes + size), np.uint8, offset=header_bytes)


# --- Fashion-MNIST -------------------------------------------------------------------------------

@needs_fashion_mnist
def test_fashion_mnist_builder_matches_idx_files(fashion_train, tfds_dir):
  assert len(fashion_train) == 60000
  test = sources.fashion_mnist_source('test', tfds_dir, local_dir=FASHION_MNIST_DIR)
  assert len(test) == 10000
  assert fashion_train.num_classes == 10
  assert fashion_train.class_names == data.CLASS_NAMES
  assert data.CLASS_NAMES[0] == 'T-shirt/top' and data.CLASS_NAMES[9] == 'Ankle boot'
  first = fashion_train[0]
  assert first['image'].shape == (28, 28, 1) and first['image'].dtype == np.uint8
  pixels = _idx_first(FASHION_MNIST_DIR / 'train-images-idx3-ubyte.gz', 16, 784)
  label = _idx_first(FASHION_MNIST_DIR / 'train-labels-idx1-ubyte.gz', 8, 1)[0]
  assert int(first['image'].sum()) == int(pixels.astype(np.int64).sum())
  np.testing.assert_array_equal(first['image'][..., 0], pixels.reshape(28, 28))
  assert first['label'] == label == 9  # Record order is the IDX order: an ankle boot.
  labels = [fashion_train[i]['label'] for i in range(0, 60000, 997)]
  assert set(labels) <= set(range(10)) and len(set(labels)) == 10
  files = sorted(p.name for p in (tfds_dir / 'fashion_mnist_local' / '1.0.0').iterdir())
  assert any('train.array_record' in f for f in files), files


@needs_fashion_mnist
def test_fashion_mnist_prepared_once(fashion_train, tfds_dir, tmp_path):
  start = time.perf_counter()
  # Already prepared: the local files are not needed any more.
  builder = fashion_mnist.prepare(tfds_dir, local_dir=tmp_path / 'gone')
  assert builder.is_prepared()
  assert time.perf_counter() - start < 5


@needs_fashion_mnist
def test_fashion_mnist_falls_back_to_upstream_urls(tmp_path):
  """Without local files the builder asks its download manager for the upstream URLs."""

  class FakeDownloadManager:
    urls = None

    def download(self, urls):
      FakeDownloadManager.urls = urls
      return {name: FASHION_MNIST_DIR / name for name in urls}  # Stand-ins for the downloads.

  builder = fashion_mnist.FashionMnistLocal(data_dir=tmp_path, local_dir=tmp_path / 'none')
  generators = builder._split_generators(FakeDownloadManager())  # pylint: disable=protected-access
  assert sorted(generators) == ['test', 'train']
  assert FakeDownloadManager.urls['t10k-images-idx3-ubyte.gz'] == (
      'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz')
  key, example = next(generators['test'])
  assert key == 0 and example['label'] == 9 and example['image'].startswith(b'\x89PNG')


def test_fashion_mnist_missing_files_without_download(tmp_path):
  local, data_dir = tmp_path / 'no_such_dir', tmp_path / 'tfds'
  with pytest.raises(UserError) as e:
    sources.fashion_mnist_source('train', data_dir, download=False, local_dir=local)
  message = str(e.value)
  for part in (str(local), 'fashion_mnist_local', str(data_dir), 'apt-get install '
               'dataset-fashion-mnist', 'data.download'):
    assert part in message


# --- TFDS sources --------------------------------------------------------------------------------

def test_tfds_source_not_prepared_no_download(tmp_path):
  with pytest.raises(UserError, match='mnist') as e:
    sources.tfds_source('mnist', 'train', tmp_path, download=False)
  assert str(tmp_path) in str(e.value)
  assert not list(tmp_path.iterdir())  # Nothing downloaded or written.
  with pytest.raises(UserError, match='no_such_dataset_xyz'):
    sources.tfds_source('no_such_dataset_xyz', 'train', tmp_path)


@needs_fashion_mnist
def test_tfds_source_keys(fashion_train, tfds_dir):
  with pytest.raises(UserError, match="data.label_key='lbl'.*'image', 'label'"):
    sources.tfds_source('fashion_mnist_local', 'train', tfds_dir, label_key='lbl')
  with pytest.raises(UserError, match="data.image_key='img'"):
    sources.tfds_source('fashion_mnist_local', 'train', tfds_dir, image_key='img')
  with pytest.raises(UserError, match="'valid'"):
    sources.tfds_source('fashion_mnist_local', 'valid', tfds_dir)
  unlabeled = sources.tfds_source('fashion_mnist_local', 'test[:100]', tfds_dir, label_key='')
  assert len(unlabeled) == 100 and unlabeled.num_classes == 0 and unlabeled[3]['label'] == 0
  # The fingerprint stored with checkpoints: dataset, config, version, split and size.
  assert unlabeled.fingerprint() == (
      f'tfds {unlabeled.full_name} [test[:100]]: 100 records')
  assert unlabeled.full_name.startswith('fashion_mnist_local/')
  assert fashion_train.fingerprint() != unlabeled.fingerprint()


# --- Folder source -------------------------------------------------------------------------------

def _write_folder(root):
  rng = np.random.default_rng(1)
  (root / 'dog').mkdir(parents=True)
  (root / 'cat').mkdir()
  Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(root / 'dog' / 'b.JPG')
  Image.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8)).save(root / 'dog' / 'a.png')
  Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / 'cat' / 'x.jpeg')
  (root / 'cat' / 'notes.txt').write_text('not an image')


def test_folder_source_labels_from_subfolders(tmp_path):
  _write_folder(tmp_path)
  source = sources.folder_source(tmp_path)
  assert source.class_names == ['cat', 'dog'] and source.num_classes == 2
  assert [p.name for p in source.files] == ['x.jpeg', 'a.png', 'b.JPG']
  assert [source[i]['label'] for i in range(len(source))] == [0, 1, 1]
  assert source[0]['image'].shape == (8, 8, 3) and source[0]['image'].dtype == np.uint8
  assert source[1]['image'].shape == (5, 6, 1)  # Grayscale PNG keeps one channel.
  with pytest.raises(IndexError):
    source[3]


def test_folder_source_root_images_and_errors(tmp_path):
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'only.png')
  flat = sources.folder_source(tmp_path)
  assert len(flat) == 1 and flat[0]['label'] == 0 and flat.num_classes == 0
  corrupt = tmp_path / 'broken.png'
  corrupt.write_bytes(b'\x89PNG definitely not a png')
  with pytest.raises(UserError, match=str(corrupt)):
    sources.folder_source(tmp_path)[0]  # Sorted: broken.png comes first.
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match=str(tmp_path / 'empty')):
    sources.folder_source(tmp_path / 'empty')
  with pytest.raises(UserError, match='missing_dir'):
    sources.folder_source(tmp_path / 'missing_dir')


def test_folder_source_reads_caption_files(tmp_path):
  _write_folder(tmp_path)
  assert sources.folder_source(tmp_path).captions is None  # cat/notes.txt captions no image
  assert 'caption' not in sources.folder_source(tmp_path)[0]
  (tmp_path / 'dog' / 'b.txt').write_text('  a brown dog on grass\n', encoding='utf-8')
  (tmp_path / 'cat' / 'x.txt').write_text('eine Katze \u00fcber dem Sofa', encoding='utf-8')
  source = sources.folder_source(tmp_path)
  # Sorted files x.jpeg, a.png, b.JPG; a.png has no caption file: '' (unconditional).
  assert source.captions == ['eine Katze \u00fcber dem Sofa', '', 'a brown dog on grass']
  assert source[2]['caption'] == 'a brown dog on grass' and source[2]['label'] == 1
  stream = data.BatchStream(source, global_batch=3, image_size=4, channels=1, seed=0,
                            captions=True)
  batch = stream.get(0)
  order = data.global_indices(0, 3, 3, 0)
  assert batch['caption'].tolist() == [source.captions[i] for i in order]
  assert next(stream.iterate(0))['caption'].tolist() == batch['caption'].tolist()
  assert 'caption' not in data.BatchStream(source, global_batch=3, image_size=4, channels=1,
                                           seed=0).get(0)
  (tmp_path / 'dog' / 'a.txt').write_bytes(b'\xff\xfe\xfa not utf-8')
  with pytest.raises(UserError, match=str(tmp_path / 'dog' / 'a.txt')):
    sources.folder_source(tmp_path)
  flat = tmp_path / 'flat'
  flat.mkdir()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(flat / 'only.png')
  with pytest.raises(UserError, match='no captions'):
    data.BatchStream(sources.folder_source(flat), global_batch=1, image_size=4, channels=1,
                     seed=0, captions=True)


def test_make_source(tmp_path):
  cfg = data.default_data_config()
  cfg.source = 'csv'
  with pytest.raises(UserError, match="data.source='csv'.*fashion_mnist"):
    sources.make_source(cfg, 'train')
  _write_folder(tmp_path)
  cfg.source, cfg.folder = 'folder', str(tmp_path)
  assert len(sources.make_source(cfg, 'train')) == 3
  cfg.source, cfg.name = 'tfds', ''
  with pytest.raises(UserError, match='data.name'):
    sources.make_source(cfg, 'train')


# --- preprocess ----------------------------------------------------------------------------------

def test_preprocess_resize_range_and_channels():
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
  x = data.preprocess(gray, 32, 1)
  assert x.shape == (32, 32, 1) and x.dtype == np.float32
  assert -1.0 <= x.min() and x.max() <= 1.0
  assert data.preprocess(gray, 32, 3).shape == (32, 32, 3)
  assert data.preprocess(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8), 16, 3).shape == (
      16, 16, 3)
  red = np.zeros((8, 8, 3), np.uint8)
  red[..., 0] = 255
  np.testing.assert_allclose(data.preprocess(red, 8, 1), 0.299 * 255 / 127.5 - 1, atol=1e-5)
  np.testing.assert_array_equal(data.preprocess(np.full((8, 8, 1), 255, np.uint8), 8, 1), 1.0)
  np.testing.assert_array_equal(data.preprocess(np.zeros((8, 8, 3), np.uint8), 8, 3), -1.0)
  with pytest.raises(UserError, match='data.channels=2'):
    data.preprocess(gray, 32, 2)


def test_preprocess_crops_and_flips():
  columns = np.tile(np.arange(8, dtype=np.uint8) * 30, (4, 1))[..., None]  # [4, 8, 1]
  center = data.preprocess(columns, 4, 1)  # Short side already 4: no resize, center crop.
  np.testing.assert_allclose(center[0, :, 0], np.arange(2, 6) * 30 / 127.5 - 1, atol=1e-6)
  for seed in range(5):
    out = data.preprocess(columns, 4, 1, random_crop=True, random_flip=True,
                          rng=np.random.default_rng(seed))
    again = data.preprocess(columns, 4, 1, random_crop=True, random_flip=True,
                            rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(out, again)
    row = np.round((out[0, :, 0] + 1) * 127.5 / 30).astype(int)
    start = row.min()
    assert sorted(row) == list(range(start, start + 4))  # A contiguous window, maybe flipped.
  starts = {int(np.round((data.preprocess(columns, 4, 1, True, False, np.random.default_rng(s))
                          [0, 0, 0] + 1) * 127.5 / 30)) for s in range(30)}
  assert len(starts) > 1 and starts <= set(range(5))


# --- global_indices ------------------------------------------------------------------------------

def test_global_indices_epochs_are_permutations():
  n, b = 10, 4
  stream = np.concatenate([data.global_indices(k, b, n, seed=3) for k in range(5)])  # 2 epochs.
  assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n:]) == list(range(n))
  assert not np.array_equal(stream[:n], stream[n:])  # A new permutation per epoch.
  np.testing.assert_array_equal(stream, np.concatenate(
      [data.global_indices(k, b, n, seed=3) for k in range(5)]))
  other = np.concatenate([data.global_indices(k, b, n, seed=4) for k in range(5)])
  assert not np.array_equal(stream, other)
  np.testing.assert_array_equal(data.global_indices(2, 4, n, 3, shuffle=False), [8, 9, 0, 1])
  big = data.global_indices(1, 25, n, seed=0)  # Positions 25..49: epochs 2 (half), 3, 4.
  assert sorted(big[5:15]) == list(range(n)) and sorted(big[15:]) == list(range(n))
  with pytest.raises(UserError, match='train.batch_size'):
    data.global_indices(0, 0, n, seed=0)


# --- BatchStream ---------------------------------------------------------------------------------

def _stream(source, **kwargs):
  defaults = dict(global_batch=8, image_size=8, channels=3, seed=7, random_crop=True,
                  random_flip=True, num_threads=3, prefetch=2)
  return data.BatchStream(source, **{**defaults, **kwargs})


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_batch_stream_iterate_equals_get_and_resumes():
  stream = _stream(FakeSource(21))
  batches = list(itertools.islice(stream.iterate(0), 8))
  assert batches[0]['image'].shape == (8, 8, 8, 3) and batches[0]['label'].dtype == np.int32
  for k, batch in enumerate(batches):
    _assert_batches_equal(batch, stream.get(k))
  for a, b in zip(itertools.islice(stream.iterate(5), 3), batches[5:]):
    _assert_batches_equal(a, b)
  seen = np.concatenate([b['label'] for b in batches])[:21]  # First epoch: each record once.
  assert sorted(seen) == list(range(21))


def test_batch_stream_processes_split_the_global_batch():
  source = FakeSource(13)
  single = _stream(source, global_batch=6)
  parts = [_stream(source, global_batch=6, process_index=p, process_count=2) for p in range(2)]
  for step in (0, 1, 4):
    got = [p.get(step) for p in parts]
    assert got[0]['image'].shape[0] == 3
    _assert_batches_equal({k: np.concatenate([g[k] for g in got]) for k in got[0]},
                          single.get(step))
  with pytest.raises(UserError, match='train.batch_size=7'):
    _stream(source, global_batch=7, process_count=2)


def test_batch_stream_propagates_worker_errors():
  stream = _stream(FakeSource(10, fail_at=4), global_batch=5, random_crop=False)
  with pytest.raises(RuntimeError, match='broken record 4'):
    for _ in itertools.islice(stream.iterate(0), 10):
      pass


def test_batch_stream_worker_processes_give_the_batches_of_get(tmp_path):
  """grain worker processes (spawned; the folder source pickled into them) make the same
  batches as `get`, in order, from any start step; a broken file surfaces as its one-line
  error in the training process."""
  _write_folder(tmp_path)
  source = sources.folder_source(tmp_path)
  stream = _stream(source, global_batch=4, num_threads=2, num_workers=2)
  with contextlib.closing(stream.iterate(5)) as batches:
    got = list(itertools.islice(batches, 4))
  for k, batch in enumerate(got, 5):
    _assert_batches_equal(batch, stream.get(k))
  (tmp_path / 'cat' / 'x.jpeg').write_bytes(b'\xff\xd8 damaged after the source was built')
  with pytest.raises(UserError, match='x.jpeg'):
    with contextlib.closing(_stream(source, global_batch=3, num_workers=1).iterate(0)) as it:
      for _ in itertools.islice(it, 3):
        pass


@needs_fashion_mnist
def test_batch_stream_on_fashion_mnist(fashion_train):
  stream = data.BatchStream(fashion_train, global_batch=16, image_size=32, channels=1, seed=0)
  batch = next(stream.iterate(3))
  assert batch['image'].shape == (16, 32, 32, 1) and batch['image'].dtype == np.float32
  assert -1 <= batch['image'].min() < batch['image'].max() <= 1
  _assert_batches_equal(batch, stream.get(3))
  workers = data.BatchStream(fashion_train, global_batch=16, image_size=32, channels=1, seed=0,
                             num_workers=1)  # the TFDS array_record source pickles
  with contextlib.closing(workers.iterate(3)) as batches:
    _assert_batches_equal(next(batches), batch)


# --- eval_batches --------------------------------------------------------------------------------

@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_cover_split_once(process_count):
  source = FakeSource(10)
  per_process = [list(data.eval_batches(source, global_batch=4, image_size=8, channels=1,
                                        process_index=p, process_count=process_count))
                 for p in range(process_count)]
  labels = []
  for batches in per_process:
    assert len(batches) == 3
    for b in batches:
      assert b['image'].shape == (4 // process_count, 8, 8, 1) and b['mask'].dtype == np.float32
      labels += list(b['label'][b['mask'] == 1])
      assert np.all(b['image'][b['mask'] == 0] == 0)
  assert sorted(labels) == list(range(10))
  assert sum(b['mask'].sum() for batches in per_process for b in batches) == 10
  limited = list(data.eval_batches(source, global_batch=4, image_size=8, channels=1,
                                   max_examples=5))
  assert [b['mask'].tolist() for b in limited] == [[1, 1, 1, 1], [1, 0, 0, 0]]
  first = limited[0]['label'].tolist()
  assert first == [0, 1, 2, 3]  # In order.


def test_eval_batches_in_worker_processes_equal_threads(tmp_path):
  """The evaluation / latent-cache encode pass with data.num_workers: the same batches, in
  order, as without workers (the last one padded and masked)."""
  _write_folder(tmp_path)
  source = sources.folder_source(tmp_path)
  kwargs = dict(global_batch=2, image_size=8, channels=3)  # 3 images: 2 batches
  threads = list(data.eval_batches(source, **kwargs))
  with contextlib.closing(data.eval_batches(source, num_workers=2, **kwargs)) as batches:
    workers = list(batches)
  assert len(workers) == len(threads) == 2 and threads[1]["mask"].tolist() == [1, 0]
  for got, want in zip(workers, threads):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
