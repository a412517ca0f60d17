"""Every file t5lite reads or writes: local paths and URLs (gs://bucket/...) alike.

All paths go through `etils.epath`, whose backend for gs:// is gcsfs (or tensorflow's gfile when
tensorflow is installed); `pip install 't5lite[gcp]'` installs gcsfs. A local path is made absolute
here, and a URL is kept as it is: never `os.path.abspath('gs://b/run')`, which is the local folder
`./gs:/b/run`.

Object stores differ from a disk in two ways that matter here: a write of one object is
all-or-nothing (so no temporary file and rename is needed, and none is possible: GCS has no
rename), and an object cannot be appended to (so an appended log is rewritten whole; see
`write_text`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from typing import Iterator, Union

import fsspec
from etils import epath

PathLike = Union[str, os.PathLike]

GCP_EXTRA = "pip install 't5lite[gcp]'"

# gcsfs caches each folder listing for the life of the process and refreshes it only after its
# own writes: `eval --watch` would never see the steps a trainer saves, nor a trainer the steps
# that tensorstore (under orbax) wrote. t5lite lists rarely and little, so it lists afresh.
fsspec.config.conf.setdefault('gcs', {}).setdefault('use_listings_cache', False)


class MissingFileSystemError(ImportError):
  """A URL whose file system needs a package that is not installed."""


def is_url(path: PathLike) -> bool:
  """gs://..., s3://... and the like; a local path otherwise."""
  return '://' in os.fspath(path)


def _check_backend(url: str) -> None:
  scheme = url.split('://', 1)[0]
  if scheme == 'gs' and not (importlib.util.find_spec('gcsfs')
                             or importlib.util.find_spec('tensorflow')):
    raise MissingFileSystemError(f'{url}: gs:// paths need gcsfs, which is not installed. '
                                 f'Install it with: {GCP_EXTRA}')


def to_path(path: PathLike) -> epath.Path:
  """`path` as an epath.Path: a URL as it is, a local path made absolute (~ expanded)."""
  text = os.fspath(path)
  if is_url(text):
    _check_backend(text)
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def join(path: PathLike, *parts: str) -> str:
  """`path`/`parts` as a string; a URL stays a URL."""
  return os.fspath(to_path(path).joinpath(*parts))


def open_bytes(path: PathLike):
  """`path` opened for reading bytes: a local file directly (the fastest for random reads), a
  URL through etils.epath."""
  return open(path, 'rb') if not is_url(path) else to_path(path).open('rb')


def read_text(path: PathLike) -> str:
  return to_path(path).read_text(encoding='utf-8')


def read_bytes(path: PathLike) -> bytes:
  return to_path(path).read_bytes()


def write_text(path: PathLike, text: str) -> None:
  """Writes `text` so that a reader never sees half of it: locally through a temporary file and a
  rename in the same folder; on an object store in one upload (all-or-nothing there)."""
  target = to_path(path)
  if is_url(target):
    target.write_text(text, encoding='utf-8')
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, temporary = tempfile.mkstemp(dir=os.fspath(target.parent), prefix=f'.{target.name}.')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(temporary, os.fspath(target))
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(temporary)
    raise


def write_bytes(path: PathLike, data: bytes) -> None:
  target = to_path(path)
  if not is_url(target):
    target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(data)


def copy_tree(source: PathLike, destination: PathLike) -> None:
  """Copies the folder `source` (every file under it) to `destination`; either may be a URL."""
  source, destination = to_path(source), to_path(destination)
  destination.mkdir(parents=True, exist_ok=True)
  for entry in source.iterdir():  # not walk(): gcsfs's walk drops the gs:// of what it yields
    if entry.is_dir():
      copy_tree(entry, destination / entry.name)
    else:
      entry.copy(destination / entry.name, overwrite=True)


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
  """A local path holding `path` (a file or a folder), for readers that take only local paths
  (transformers, some tokenizers). A local path is given as it is; a URL is downloaded to a
  temporary folder that is removed afterwards."""
  if not is_url(path):
    yield os.fspath(to_path(path))
    return
  source = to_path(path)
  with tempfile.TemporaryDirectory(prefix='t5lite-') as scratch:
    local = os.path.join(scratch, source.name or 'download')
    if source.is_dir():
      copy_tree(source, local)
    else:
      source.copy(epath.Path(local))
    yield local


@contextlib.contextmanager
def local_output(path: PathLike) -> Iterator[str]:
  """A local path to write an output folder into (for writers that take only local paths); on
  leaving without an error, a URL `path` receives a copy of everything written there."""
  if not is_url(path):
    yield os.fspath(to_path(path))
    return
  scratch = tempfile.mkdtemp(prefix='t5lite-')
  try:
    yield scratch
    copy_tree(scratch, path)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
