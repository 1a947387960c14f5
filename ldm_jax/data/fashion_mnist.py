"""Fashion-MNIST as a TFDS builder that reads local IDX files (Debian `dataset-fashion-mnist`).

`FashionMnistLocal` (TFDS name `fashion_mnist_local`) writes the same features and splits as the
upstream `fashion_mnist` builder, but takes its raw files from `local_dir` (by default the path
the Debian package installs to), so a machine without internet access can prepare it. When the
local files are absent, it downloads the original files from the URLs upstream TFDS uses (whose
checksums TFDS already registers) through the builder's own download manager; `prepare` only
lets that happen when downloads are allowed.

The dataset is always written in the `array_record` file format, so `as_data_source` gives
random access. TFDS skips preparation when `<data_dir>/fashion_mnist_local/1.0.0` is complete.
"""
import gzip
import io
import logging
import os
import pathlib

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from ldm_jax import console
from ldm_jax.errors import UserError

DEFAULT_LOCAL_DIR = '/usr/share/datasets/fashion-mnist'
DATASET_NAME = 'fashion_mnist_local'
CLASS_NAMES = [
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
    'Bag', 'Ankle boot',
]
# Same mirror as tensorflow_datasets/image_classification/mnist.py (FashionMNIST.URL).
URL = 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'
# split -> (images file, labels file, number of examples)
FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 60000),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz', 10000),
}
_FILE_NAMES = [name for images, labels, _ in FILES.values() for name in (images, labels)]
_IMAGE_SIZE = 28
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions.
_IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension.


def missing_local_files(local_dir: str | os.PathLike) -> list[str]:
  """Returns the Fashion-MNIST file names that are not in `local_dir` (empty when complete)."""
  local_dir = pathlib.Path(local_dir)
  return [name for name in _FILE_NAMES if not (local_dir / name).is_file()]


def _read_idx(path: str | os.PathLike, magic: int, shape: tuple[int, ...]) -> np.ndarray:
  """Reads a gzipped IDX file into a uint8 array, checking its header against `shape`."""
  try:
    with gzip.open(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise UserError(f'Cannot read IDX file {path}: {e}') from e
  ndim = len(shape)
  header = np.frombuffer(data[:4 + 4 * ndim], dtype='>u4')
  if header.size != 1 + ndim or header[0] != magic or tuple(header[1:]) != shape:
    raise UserError(f'IDX file {path} has header {header.tolist()}, expected magic {magic} '
                    f'and shape {shape}')
  array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise UserError(f'IDX file {path} is truncated: {array.size} bytes of data, '
                    f'expected {int(np.prod(shape))}')
  return array.reshape(shape)


def read_images(path: str | os.PathLike, num_examples: int) -> np.ndarray:
  """Reads a gzipped IDX image file into uint8 [num_examples, 28, 28, 1]."""
  images = _read_idx(path, _IDX_IMAGES_MAGIC, (num_examples, _IMAGE_SIZE, _IMAGE_SIZE))
  return images[..., None]


def read_labels(path: str | os.PathLike, num_examples: int) -> np.ndarray:
  """Reads a gzipped IDX label file into int64 [num_examples]."""
  return _read_idx(path, _IDX_LABELS_MAGIC, (num_examples,)).astype(np.int64)


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (Xiao et al. 2017) from local IDX files, falling back to a download."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: local Debian files or the upstream mirror.'}

  def __init__(self, *, local_dir: str | os.PathLike = DEFAULT_LOCAL_DIR, **kwargs):
    """Creates the builder.

    Args:
      local_dir: folder holding the four gzipped IDX files. Not part of the prepared
        dataset's identity: whichever folder it came from, it lands in the same data_dir path.
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder` (data_dir, file_format, ...).
    """
    self.local_dir = pathlib.Path(local_dir)
    super().__init__(**kwargs)
    # DatasetBuilder pickles as `__init__(**_original_state)`; keep local_dir across pickling.
    self._original_state['local_dir'] = os.fspath(local_dir)

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file, found without TFDS's package lookup.

    TFDS 4.9.x computes `code_path` with `importlib_resources`, which it only declares as a
    dependency for Python < 3.9 (tensorflow/datasets#11212).
    """
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=('Fashion-MNIST: 28x28 grayscale images of Zalando articles in 10 classes, '
                     '60,000 for training and 10,000 for testing.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(_IMAGE_SIZE, _IMAGE_SIZE, 1)),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        # Keep the IDX order (record i is example i of the original file) instead of TFDS's
        # hash order: it makes records checkable against the source files; training shuffles.
        disable_shuffling=True,
        homepage='https://github.com/zalandoresearch/fashion-mnist',
        citation=('@article{xiao2017fashion, title={Fashion-MNIST: a Novel Image Dataset for '
                  'Benchmarking Machine Learning Algorithms}, author={Xiao, Han and Rasul, Kashif '
                  'and Vollgraf, Roland}, journal={arXiv:1708.07747}, year={2017}}'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    if missing_local_files(self.local_dir):
      # `download` (not `download_and_extract`): the files stay gzipped like the local ones.
      paths = dl_manager.download({name: URL + name for name in _FILE_NAMES})
    else:
      paths = {name: self.local_dir / name for name in _FILE_NAMES}
    return {
        split: self._generate_examples(paths[images], paths[labels], num_examples)
        for split, (images, labels, num_examples) in FILES.items()
    }

  def _generate_examples(self, images_path, labels_path, num_examples):
    images = read_images(images_path, num_examples)
    labels = read_labels(labels_path, num_examples)
    for index in range(num_examples):
      yield index, {'image': _png(images[index]), 'label': labels[index]}


def _png(image: np.ndarray) -> bytes:
  """uint8 [28, 28, 1] -> PNG bytes.

  TFDS would encode arrays with one eager TensorFlow op per image, which makes preparation about
  twice as slow; PIL's PNG is just as lossless.
  """
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0]).save(buffer, format='PNG')
  return buffer.getvalue()


def prepare(data_dir: str | os.PathLike | None = None, *, download: bool = False,
            local_dir: str | os.PathLike = DEFAULT_LOCAL_DIR) -> FashionMnistLocal:
  """Returns the `fashion_mnist_local` builder for `data_dir`, preparing it on first use.

  Args:
    data_dir: TFDS data dir; None or '' means TFDS's default (`$TFDS_DATA_DIR` or
      `~/tensorflow_datasets`).
    download: whether the upstream files may be downloaded when `local_dir` lacks them.
    local_dir: folder with the gzipped IDX files.

  Raises:
    UserError: the dataset is not prepared, the local files are missing and `download` is
      False; or a local file is corrupt.
  """
  builder = FashionMnistLocal(data_dir=data_dir or None, local_dir=local_dir)
  if builder.is_prepared():
    return builder
  missing = missing_local_files(local_dir)
  if missing and not download:
    raise UserError(
        f'Fashion-MNIST files {missing} not found in {local_dir} and dataset {DATASET_NAME} is '
        f'not prepared in data_dir {builder.data_dir_root}: run `apt-get install '
        f'dataset-fashion-mnist`, set data.local_dir, or enable data.download')
  console.say(f'preparing {DATASET_NAME} in {builder.data_dir} (once, about a minute)')
  # try_download_gcs=False: TFDS would otherwise ask GCS (over the network) for a prepared copy.
  # TFDS's progress bars only at --verbosity >= 1 (they flood piped logs).
  verbose = logging.getLogger('absl').isEnabledFor(logging.INFO)
  tfds.display_progress_bar(verbose)
  try:
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  finally:
    tfds.display_progress_bar(True)
  return builder
