"""Random-access image sources: Fashion-MNIST (local TFDS builder), any TFDS dataset, a folder.

Every source is a sequence of examples: `len(source)`, `source[i] -> {'image': uint8 [H, W, C],
'label': int}`, plus `num_classes` (0 when unlabeled), `class_names` and `name`. Decoding happens
in `__getitem__`, so a source is cheap to build and can be read from several threads. A source
with per-image captions (a folder with caption files) also has `captions` (one str per record)
and adds `'caption': str` to each example; other sources have `captions = None`.
`fingerprint()` names what a source holds in one line (stored with every checkpoint;
`compare_fingerprints` words the warning when a resumed run finds other data).
"""
import operator
import os
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from ldm_jax.data import fashion_mnist
from ldm_jax.data.folder import FolderSource
from ldm_jax.errors import UserError

SOURCES = ('fashion_mnist', 'tfds', 'folder')


def _as_hwc_uint8(image: Any, where: str) -> np.ndarray:
  """Checks a decoded image and gives it a channel axis."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.dtype != np.uint8:
    raise UserError(f'{where}: expected a uint8 image [H, W, C], got {image.dtype} '
                    f'{image.shape}')
  return image


class TfdsSource:
  """A split of a prepared TFDS dataset, read through `builder.as_data_source(split)`."""

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str, *, image_key: str = 'image',
               label_key: str = 'label'):
    """Wraps `builder`'s `split`; `label_key=''` means unlabeled (label 0, num_classes 0)."""
    self.name = builder.name
    self.full_name = builder.info.full_name
    self.split = split
    self.captions = None
    self.image_key = image_key
    self.label_key = label_key
    where = f'dataset {builder.name} in data_dir {builder.data_dir_root}'
    features = builder.info.features
    available = sorted(features.keys())
    for config_key, key in (('data.image_key', image_key), ('data.label_key', label_key)):
      if key and key not in features:
        raise UserError(f'{config_key}={key!r} is not a feature of {where}; available: '
                        f'{available}')
    if label_key:
      label = features[label_key]
      if not isinstance(label, tfds.features.ClassLabel):
        raise UserError(f"data.label_key={label_key!r} of {where} is a {type(label).__name__}, "
                        "not a ClassLabel; set data.label_key='' for unlabeled training")
      self.num_classes = label.num_classes
      self.class_names = list(label.names)
    else:
      self.num_classes = 0
      self.class_names = []
    try:
      self._data = builder.as_data_source(split)
    except NotImplementedError as e:  # Prepared only in a format without random access.
      raise UserError(f'{where} has no array_record files for random access; prepare it with '
                      f'`tfds build {builder.name} --file_format=array_record` '
                      f'(or another data_dir)') from e
    except (KeyError, ValueError) as e:
      raise UserError(f'Bad split {split!r} for {where} (splits: '
                      f'{sorted(builder.info.splits.keys())}): {e}') from e

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = operator.index(index)
    if not 0 <= index < len(self._data):
      raise IndexError(f'index {index} out of range for {len(self._data)} records')
    return self._convert(index, self._data[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Examples at `indices`; array_record reads them in one (multi-threaded) call."""
    indices = [operator.index(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < len(self._data)]
    if bad:
      raise IndexError(f'indices {bad[:5]} out of range for {len(self._data)} records')
    return [self._convert(i, ex) for i, ex in zip(indices, self._data.__getitems__(indices))]

  def _convert(self, index: int, example: dict[str, Any]) -> dict[str, Any]:
    image = _as_hwc_uint8(example[self.image_key], f'{self.name}[{self.split}][{index}]')
    label = int(example[self.label_key]) if self.label_key else 0
    return {'image': image, 'label': label}

  def fingerprint(self) -> str:
    """The dataset's name, config and version, the split and its number of records."""
    return f'tfds {self.full_name} [{self.split}]: {len(self)} records'

  def __repr__(self) -> str:
    return f'TfdsSource({self.name}, split={self.split!r}, records={len(self)})'


def fashion_mnist_source(split: str = 'train', data_dir: str | os.PathLike | None = None,
                         download: bool = False,
                         local_dir: str | os.PathLike = fashion_mnist.DEFAULT_LOCAL_DIR
                         ) -> TfdsSource:
  """Fashion-MNIST `split`, prepared into `data_dir` from `local_dir` on first use."""
  builder = fashion_mnist.prepare(data_dir, download=download, local_dir=local_dir)
  return TfdsSource(builder, split)


def tfds_source(name: str, split: str = 'train', data_dir: str | os.PathLike | None = None,
                image_key: str = 'image', label_key: str = 'label',
                download: bool = False) -> TfdsSource:
  """Any TFDS image dataset by name (`cifar10`, `celeb_a`, `imagenet2012`, ...).

  This is `tfds.data_source(name, split=..., data_dir=..., download=...)` spelled out, so that a
  missing dataset is a clear error rather than a download (when `download` is False) and so that
  a download always writes `array_record` files (`tfds.data_source` only asks for them when no
  data_dir is given).

  Raises:
    UserError: unknown name, dataset not prepared in data_dir and `download` False, a missing
      image/label key, a bad split or no random-access files.
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UserError(f'Unknown TFDS dataset data.name={name!r} (data_dir '
                    f'{data_dir or "TFDS default"}): {str(e).splitlines()[0]}') from e
  if not builder.is_prepared():
    if not download:
      raise UserError(f'TFDS dataset {name} is not prepared in data_dir {builder.data_dir_root}: '
                      f'enable data.download or set data.data_dir to where it is prepared')
    try:
      # No GCS lookup: TFDS only hosts TFRecord copies there, and we need array_record files.
      builder.download_and_prepare(
          file_format='array_record',
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except ModuleNotFoundError as e:
      if e.name != 'importlib_resources':
        raise
      raise UserError(f'Preparing TFDS dataset {name} needs `pip install importlib_resources` '
                      '(a TFDS 4.9 dependency it does not declare: tensorflow/datasets#11212)'
                      ) from e
  return TfdsSource(builder, split, image_key=image_key, label_key=label_key)


def folder_source(path: str | os.PathLike, skip_bad_images: bool = False) -> FolderSource:
  """Images under `path` (see `FolderSource`)."""
  return FolderSource(path, skip_bad_images=skip_bad_images)


def compare_fingerprints(saved: Optional[str], current: Optional[str]) -> Optional[str]:
  """One line saying that the data changed since a checkpoint, or None when it did not (or
  when either side has no fingerprint: a checkpoint written before they were stored)."""
  if not saved or not current or saved == current:
    return None
  return (f'the training data changed since the checkpoint (then: {saved}; now: {current}); '
          'resuming at the same step on different data')


def make_source(data_cfg: Any, split: str) -> TfdsSource | FolderSource:
  """Builds the source that `data_cfg.source` names for `split` (a folder has no splits)."""
  source = data_cfg.source
  if source == 'fashion_mnist':
    return fashion_mnist_source(split, data_cfg.data_dir, data_cfg.download, data_cfg.local_dir)
  if source == 'tfds':
    if not data_cfg.name:
      raise UserError("data.source='tfds' needs data.name (e.g. 'cifar10')")
    return tfds_source(data_cfg.name, split, data_cfg.data_dir, data_cfg.image_key,
                       data_cfg.label_key, data_cfg.download)
  if source == 'folder':
    if not data_cfg.folder:
      raise UserError("data.source='folder' needs data.folder (a directory of images)")
    return folder_source(data_cfg.folder, data_cfg.get('skip_bad_images', False))
  raise UserError(f'data.source={source!r} is not one of {list(SOURCES)}')
