"""Random-access image sources: Fashion-MNIST (local TFDS builder), any TFDS dataset, a folder.

Every source is a sequence of examples: `len(source)`, `source[i] -> {'image': uint8 [H, W, C],
'label': int}`, plus `num_classes` (0 when unlabeled), `class_names` and `name`. Decoding happens
in `__getitem__`, so a source is cheap to build and can be read from several threads. A source
with per-image captions (a folder with caption files) also has `captions` (one str per record)
and adds `'caption': str` to each example; other sources have `captions = None`.
"""
import operator
import os
import pathlib
from typing import Any, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from ldm_jax.data import fashion_mnist
from ldm_jax.errors import UserError

SOURCES = ('fashion_mnist', 'tfds', 'folder')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
_GRAY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'F')


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


class FolderSource:
  """Images under a folder; each sub-folder is a class (sorted names -> ids 0, 1, ...).

  A folder without sub-folders is one unlabeled set (label 0, num_classes 0). Files are found
  recursively inside each class folder; hidden files and folders are ignored; the order is
  sorted, so it is the same on every host.

  Captions: a text file beside an image with the same stem (`cat/001.jpg` -> `cat/001.txt`,
  UTF-8, surrounding whitespace stripped) is that image's caption. When any image has one,
  `captions` lists them all, '' for images without a file (those train the unconditional model,
  like condition dropout); otherwise `captions` is None.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.name = f'folder:{self.path}'
    if not self.path.is_dir():
      raise UserError(f'data.folder={os.fspath(path)!r} is not a directory')
    subdirs = sorted(p for p in self.path.iterdir() if p.is_dir() and not _hidden(p.name))
    root_files = _images_in(self.path, recursive=False)
    per_class = [(d.name, _images_in(d, recursive=True)) for d in subdirs]
    per_class = [(cls, files) for cls, files in per_class if files]
    if per_class and root_files:
      raise UserError(f'data.folder {self.path} mixes images in its root ({root_files[0]}, ...) '
                      f'with class sub-folders; move them into a sub-folder')
    if per_class:
      self.class_names = [cls for cls, _ in per_class]
      self.files = [f for _, files in per_class for f in files]
      self.labels = [i for i, (_, files) in enumerate(per_class) for _ in files]
    else:
      self.class_names = []
      self.files = root_files
      self.labels = [0] * len(root_files)
    self.num_classes = len(self.class_names)
    if not self.files:
      raise UserError(f'data.folder {self.path} holds no {"/".join(IMAGE_EXTENSIONS)} images')
    caption_files = [f.with_suffix('.txt') for f in self.files]
    present = [c.is_file() for c in caption_files]
    self.captions = None
    if any(present):
      self.captions = [read_caption(c) if ok else '' for c, ok in zip(caption_files, present)]

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = operator.index(index)
    if not 0 <= index < len(self.files):
      raise IndexError(f'index {index} out of range for {len(self.files)} files')
    example = {'image': load_image(self.files[index]), 'label': self.labels[index]}
    if self.captions is not None:
      example['caption'] = self.captions[index]
    return example

  def __repr__(self) -> str:
    return f'FolderSource({self.path}, files={len(self)}, classes={self.num_classes})'


def _hidden(name: str) -> bool:
  return name.startswith('.')


def _images_in(folder: pathlib.Path, recursive: bool) -> list[pathlib.Path]:
  files = folder.rglob('*') if recursive else folder.iterdir()
  return sorted(
      f for f in files
      if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
      and not any(_hidden(part) for part in f.relative_to(folder).parts))


def load_image(path: str | os.PathLike) -> np.ndarray:
  """Decodes an image file to uint8 [H, W, 1] (grayscale modes) or [H, W, 3] (others)."""
  try:
    with Image.open(path) as image:
      image = image.convert('L' if image.mode in _GRAY_MODES else 'RGB')
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise UserError(f'Cannot decode image {path}: {e}') from e
  return _as_hwc_uint8(image, os.fspath(path))


def read_caption(path: pathlib.Path) -> str:
  """The stripped UTF-8 text of a caption file."""
  try:
    return path.read_text(encoding='utf-8').strip()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'Cannot read caption file {path}: {e}') from e


def folder_source(path: str | os.PathLike) -> FolderSource:
  """Images under `path` (see `FolderSource`)."""
  return FolderSource(path)


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
    return folder_source(data_cfg.folder)
  raise UserError(f'data.source={source!r} is not one of {list(SOURCES)}')
