"""An image folder as a random-access source: a safe walk, captions, bad files, a fingerprint.

The walk never leaves the folder: a symbolic link is followed only when its real target lies
inside the folder's real path, each real file and directory is visited once (so `loop -> .` or
a second link to the same image add nothing), and links that lead outside (`loop -> ..`, a link
to a shared store) are skipped with one warning that counts them.

Undecodable files: a folder that is small enough (at most `CHECK_MAX_FILES` images and
`CHECK_MAX_BYTES` bytes, a few seconds of decoding) is decoded in full when the source is built,
so a bad file stops the run before anything compiles. `skip_bad_images=False` (the default)
raises one `UserError` naming the first bad file; `True` drops the bad files and names them in
one warning. A larger folder is not checked up front: a bad file met while training raises, or
with `skip_bad_images` is replaced by the next decodable image and named in a warning, once.
"""
import concurrent.futures
import hashlib
import json
import logging
import operator
import os
import pathlib
import threading
from typing import Any, Optional

from ldm_jax.data.images import load_image
from ldm_jax.errors import UserError

# torchvision's ImageFolder list and GIF: the formats whose modes `images.py` reads.
IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.pgm', '.png', '.ppm', '.tif', '.tiff',
                    '.webp')
# The up-front check's bound: decoding runs at about 20 MiB/s per busy core (512x512 JPEGs),
# so at most a few seconds on the threads of a training host (~7 s on 2 shared cores).
CHECK_MAX_FILES = 10_000
CHECK_MAX_BYTES = 128 * 2 ** 20
_NAMED = 10  # Bad files named in one message; the rest are counted.
METADATA_FILE = 'metadata.jsonl'  # Hugging Face ImageFolder captions: file_name, text


class FolderSource:
  """Images under a folder; each sub-folder is a class (sorted names -> ids 0, 1, ...).

  A folder without sub-folders is one unlabeled set (label 0, num_classes 0). Files are found
  recursively inside each class folder; hidden files and folders are ignored; the order is
  sorted, so it is the same on every host.

  Captions: a text file beside an image with the same stem (`cat/001.jpg` -> `cat/001.txt`,
  UTF-8, surrounding whitespace stripped) is that image's caption. When any image has one,
  `captions` lists them all, '' for images without a file (those train the unconditional model,
  like condition dropout); otherwise `captions` is None. Or a `metadata.jsonl` in the folder
  (Hugging Face ImageFolder: one {"file_name": ..., "text": ...} per line) gives them.
  """

  def __init__(self, path: str | os.PathLike, skip_bad_images: bool = False):
    self.path = pathlib.Path(path)
    self.name = f'folder:{self.path}'
    self.skip_bad_images = bool(skip_bad_images)
    if not self.path.is_dir():
      raise UserError(f'data.folder={os.fspath(path)!r} is not a directory')
    walk = _Walk(self.path)
    root_files, subdirs = walk.entries(self.path, walk.root)
    per_class = [(d.name, walk.images(d, real)) for d, real in subdirs]
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
      walk.warn_outside()
      raise UserError(f'data.folder {self.path} holds no {"/".join(IMAGE_EXTENSIONS)} images')
    self.checked = _small_enough(self.files)
    if self.checked:
      self._drop_undecodable()
    caption_files = [f.with_suffix('.txt') for f in self.files]
    present = [walk.is_file(c) for c in caption_files]
    walk.warn_outside()
    self.captions = None
    metadata = self.path / METADATA_FILE
    if metadata.is_file():
      if any(present):
        raise UserError(f'data.folder {self.path} has both {METADATA_FILE} and caption .txt '
                        f'files ({caption_files[present.index(True)]}, ...): keep one of them')
      self.captions = metadata_captions(metadata, self.path, self.files)
    elif any(present):
      self.captions = [read_caption(c) if ok else '' for c, ok in zip(caption_files, present)]
    self._lock = threading.Lock()
    self._bad: dict[int, str] = {}  # Index -> reason, for files found bad while reading.

  def _drop_undecodable(self) -> None:
    """Decodes every file; raises naming the first bad one, or drops them all (skip)."""
    with concurrent.futures.ThreadPoolExecutor(thread_name_prefix='ldm_check') as pool:
      errors = list(pool.map(_decode_error, self.files))
    bad = [(i, e) for i, e in enumerate(errors) if e is not None]
    if not bad:
      return
    if not self.skip_bad_images:
      more = (f' (and {len(bad) - 1} more undecodable image(s) in data.folder {self.path})'
              if len(bad) > 1 else '')
      raise UserError(f'{bad[0][1]}{more}; data.skip_bad_images=True skips such files')
    if len(bad) == len(self.files):
      raise UserError(f'data.folder {self.path}: none of its {len(bad)} images decodes '
                      f'({bad[0][1]})')
    drop = {i for i, _ in bad}
    named = ', '.join(os.fspath(self.files[i]) for i, _ in bad[:_NAMED])
    rest = f' and {len(bad) - _NAMED} more' if len(bad) > _NAMED else ''
    logging.warning('data.folder %s: skipped %d undecodable image(s) of %d '
                    '(data.skip_bad_images=True): %s%s', self.path, len(bad), len(self.files),
                    named, rest)
    self.files = [f for i, f in enumerate(self.files) if i not in drop]
    self.labels = [y for i, y in enumerate(self.labels) if i not in drop]
    used = sorted(set(self.labels))
    if self.class_names and len(used) < len(self.class_names):
      # Dropping a whole class would renumber the classes after it: refuse instead.
      lost = [self.class_names[y] for y in range(len(self.class_names)) if y not in used]
      raise UserError(f'data.folder {self.path}: class folder(s) {lost} hold no decodable '
                      'image')

  def __getstate__(self) -> dict[str, Any]:
    """Pickled into grain's worker processes: everything but the (per-process) lock."""
    state = dict(self.__dict__)
    del state['_lock']
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self.files)
    index = operator.index(index)
    if not 0 <= index < n:
      raise IndexError(f'index {index} out of range for {n} files')
    for offset in range(n):
      i = (index + offset) % n
      if i in self._bad:
        continue
      try:
        image = load_image(self.files[i])
      except UserError as e:
        if not self.skip_bad_images:
          raise
        self._skip(i, str(e))
        continue
      example = {'image': image, 'label': self.labels[i]}
      if self.captions is not None:
        example['caption'] = self.captions[i]
      return example
    raise UserError(f'data.folder {self.path}: none of its {n} images decodes')

  def _skip(self, index: int, reason: str) -> None:
    with self._lock:
      if index in self._bad:
        return
      self._bad[index] = reason
      count = len(self._bad)
    logging.warning('%s; skipped (data.skip_bad_images=True, %d skipped so far in %s): the '
                    'next image is read in its place', reason, count, self.path)

  @property
  def skipped(self) -> list[str]:
    """Files found undecodable while reading (and replaced), in the order met."""
    with self._lock:
      return [os.fspath(self.files[i]) for i in self._bad]

  def fingerprint(self) -> str:
    """The number of images and a hash of their sorted paths relative to the folder (so a
    moved folder keeps its fingerprint; a file added, removed or renamed changes it)."""
    digest = hashlib.sha256()
    for f in self.files:
      digest.update(f.relative_to(self.path).as_posix().encode('utf-8', 'surrogateescape'))
      digest.update(b'\0')
    return f'folder: {len(self.files)} images, sha256 {digest.hexdigest()[:16]}'

  def __repr__(self) -> str:
    return f'FolderSource({self.path}, files={len(self)}, classes={self.num_classes})'


class _Walk:
  """Directory listing that stays inside `root` and visits each real path once."""

  def __init__(self, root: pathlib.Path):
    self.root = root.resolve()
    self.display = root
    self.seen = {self.root}
    self.outside: list[pathlib.Path] = []  # Links skipped because they lead outside.

  def _real(self, path: pathlib.Path, entry: os.DirEntry, parent_real: pathlib.Path
            ) -> Optional[pathlib.Path]:
    """The real path of an entry, or None when it is a link that leads outside the root
    (recorded when the walk would have used it: an image name or a directory)."""
    if not entry.is_symlink():
      return parent_real / entry.name
    # os.path.realpath, not Path.resolve: a loop of links gives a path here instead of raising.
    real = pathlib.Path(os.path.realpath(path))
    if self._contains(real):
      return real
    if path.suffix.lower() in IMAGE_EXTENSIONS or real.is_dir():
      self.outside.append(path)
    return None

  def _contains(self, real: pathlib.Path) -> bool:
    return real == self.root or self.root in real.parents

  def is_file(self, path: pathlib.Path) -> bool:
    """Whether `path`, beside a walked image (a caption), is a file inside the root."""
    if path.is_symlink() and not self._contains(pathlib.Path(os.path.realpath(path))):
      self.outside.append(path)
      return False
    return path.is_file()

  def entries(self, folder: pathlib.Path, real: pathlib.Path
              ) -> tuple[list[pathlib.Path], list[tuple[pathlib.Path, pathlib.Path]]]:
    """(image files, sub-directories with their real paths) of one directory, sorted by name,
    hidden names, outside links and already visited real paths left out."""
    files, dirs = [], []
    try:
      listing = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
      raise UserError(f'Cannot list {folder} in data.folder {self.display}: {e}') from e
    for entry in listing:
      if entry.name.startswith('.'):
        continue
      path = folder / entry.name
      target = self._real(path, entry, real)
      if target is None or target in self.seen:
        continue
      # A link is asked about its resolved target: Path.is_dir() says False for a loop of links
      # where DirEntry.is_dir() raises ELOOP. Plain entries answer from the listing.
      kind = target if entry.is_symlink() else entry
      if kind.is_dir():
        self.seen.add(target)
        dirs.append((path, target))
      elif kind.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        self.seen.add(target)
        files.append(path)
    return files, dirs

  def images(self, folder: pathlib.Path, real: pathlib.Path) -> list[pathlib.Path]:
    """Image files under `folder`, recursively, in sorted path order."""
    files, dirs = self.entries(folder, real)
    # Files and sub-directories merged by name: the order of sorted paths ('a/b.png' before
    # 'a.png', as paths compare part by part), which the folder source always had.
    items = sorted([(f.name, f, None) for f in files] + [(d.name, d, r) for d, r in dirs],
                   key=lambda item: item[0])
    out = []
    for _, path, target in items:
      out.extend([path] if target is None else self.images(path, target))
    return out

  def warn_outside(self) -> None:
    if self.outside:
      link = self.outside[0]
      real = os.path.realpath(link)
      logging.warning('data.folder %s: skipped %d symbolic link(s) that lead outside it (%s -> '
                      '%s, ...); copy or mount such data inside the folder', self.display,
                      len(self.outside), link, real)


def _small_enough(files: list[pathlib.Path]) -> bool:
  """Whether decoding every file up front is quick (see the module docstring)."""
  if len(files) > CHECK_MAX_FILES:
    return False
  total = 0
  for f in files:
    try:
      total += f.stat().st_size
    except OSError:
      continue  # Reported by the decode check.
    if total > CHECK_MAX_BYTES:
      return False
  return True


def _decode_error(path: pathlib.Path) -> Optional[str]:
  try:
    load_image(path)
  except UserError as e:
    return str(e)
  return None


def metadata_captions(path: pathlib.Path, root: pathlib.Path, files) -> list[str]:
  """Captions from a Hugging Face ImageFolder `metadata.jsonl` (one JSON object per line with
  `file_name`, relative to the folder, and `text`); '' for images it does not list. One line
  naming the file and line for a bad line, a duplicate or a file that is not in the folder."""
  by_file, where = {}, {}
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        name, text = row['file_name'], row['text']
      except (ValueError, KeyError, TypeError) as e:
        raise UserError(f'{path} line {n}: not a JSON object with "file_name" and "text" '
                        f'({e})') from e
      if not isinstance(name, str) or not isinstance(text, str):
        raise UserError(f'{path} line {n}: "file_name" and "text" must be strings')
      key = os.path.normpath(name)
      if key in by_file:
        raise UserError(f'{path} line {n}: {name!r} is listed twice (first on line {where[key]})')
      by_file[key], where[key] = text.strip(), n
  names = [os.path.normpath(os.path.relpath(f, root)) for f in files]
  unknown = sorted(set(by_file) - set(names))
  if unknown:
    raise UserError(f'{path} line {where[unknown[0]]}: {unknown[0]!r} is not an image of '
                    f'data.folder {root}')
  return [by_file.get(n, '') for n in names]


def read_caption(path: pathlib.Path) -> str:
  """The stripped UTF-8 text of a caption file."""
  try:
    return path.read_text(encoding='utf-8').strip()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'Cannot read caption file {path}: {e}') from e
