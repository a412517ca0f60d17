"""Data sources: where a task's raw examples come from, with random access by index.

A source maps a split name to a random-access sequence of example dicts (`len` and
`[i]`), which is what grain's `MapDataset.source` needs for exact, shardable,
resumable reading. Sources here:

  InMemorySource   {split: list of dicts}; for notebooks and tests
  FunctionSource   split -> list of dicts, called once per split (lazily)
  TextLineSource   text files, one example {'text': line} per non-blank line
  JsonlSource      JSON-lines files, one dict per non-blank line
  TsvSource        tab-separated files, one dict per line with the given field names (or,
                   with none given, the names in each file's first line, its header)
  TfdsSource       TFDS through `tfds.data_source` (array_record: random access, no TensorFlow);
                   tfrecord-only datasets go through tf.data when TensorFlow is installed
                   (`pip install t5lite[tf]`), and fail with that hint when it is not.

File sources take, per split, a glob pattern or a list of them (several shards are
read in sorted path order) and index line offsets once, so a 10 GB file is not
held in memory. Files and patterns may be gs:// URLs (`pip install 't5lite[gcp]'`; read
through t5lite.files / etils.epath); a URL pattern's wildcards (*, ?, [...]) may sit in
any path component, but `**` is not supported there (epath refuses it on gs://). Bad input is a DataSourceError (a ValueError) in one line naming the
file, and the line for malformed content: a pattern that matches nothing
(DataFileNotFoundError, also a FileNotFoundError), an unreadable file or a split with
no non-blank line (found when the split is opened, i.e. when a pipeline is built),
and a line that does not parse (found when it is read; grain re-raises it unchanged
from its reader threads and worker processes).
"""

from __future__ import annotations

import csv
import glob as glob_lib
import io
import json
import os
import threading
from typing import Any, Callable, Mapping, Sequence

from t5lite import files

_GLOB_CHARACTERS = frozenset('*?[')


class DataSourceError(ValueError):
  """Bad input data: a missing, unreadable or empty file, or a malformed line.

    The message is one line naming the file (and the line) and what was expected, so a
    job can print it as is. A plain one-argument exception: it pickles, so it crosses
    from grain worker processes as itself.
    """


class DataFileNotFoundError(DataSourceError, FileNotFoundError):
  """A file pattern matched nothing (also a FileNotFoundError, as it was before)."""


class Source:
  """Base: `splits`, `get(split)` (random-access sequence), `num_examples(split)`."""

  @property
  def splits(self) -> tuple[str, ...]:
    raise NotImplementedError

  def get(self, split: str) -> Sequence[Mapping[str, Any]]:
    raise NotImplementedError

  def num_examples(self, split: str) -> int:
    return len(self.get(split))

  def _check_split(self, split: str) -> None:
    if split not in self.splits:
      raise ValueError(f'{type(self).__name__} has no split {split!r}; it has {list(self.splits)}.')


class InMemorySource(Source):
  """Examples held in memory: {split: [dict, ...]}."""

  def __init__(self, examples: Mapping[str, Sequence[Mapping[str, Any]]]):
    self._examples = {k: list(v) for k, v in examples.items()}

  @property
  def splits(self):
    return tuple(self._examples)

  def get(self, split):
    self._check_split(split)
    return self._examples[split]


class FunctionSource(Source):
  """`fn(split) -> list of dicts`, called once per split and cached."""

  def __init__(self, fn: Callable[[str], Sequence[Mapping[str, Any]]], splits: Sequence[str]):
    self._fn = fn
    self._splits = tuple(splits)
    self._cache: dict[str, list] = {}

  @property
  def splits(self):
    return self._splits

  def get(self, split):
    self._check_split(split)
    if split not in self._cache:
      self._cache[split] = list(self._fn(split))
    return self._cache[split]

  def __getstate__(self):  # grain workers rebuild the cache rather than pickle it
    return {**self.__dict__, '_cache': {}}


def _glob_url(pattern: str) -> list[str]:
  """Files matching a URL pattern: epath's glob from the last folder before the first
  component with a wildcard (gs:// has no folders to list beyond prefixes)."""
  scheme, rest = pattern.split('://', 1)
  parts = rest.split('/')
  first = next((i for i, p in enumerate(parts) if _GLOB_CHARACTERS & set(p)), None)
  if first is None:  # a plain URL: the file itself, if it is there
    return [pattern] if files.to_path(pattern).is_file() else []
  if first == 0:
    raise DataSourceError(f'{pattern!r}: a wildcard in the bucket name is not supported.')
  if '**' in parts[first:]:
    raise DataSourceError(f'{pattern!r}: ** is not supported in a URL pattern (etils.epath '
                          'refuses it on gs://); list the folders, or use one * per level.')
  base = files.to_path(f'{scheme}://' + '/'.join(parts[:first]))
  return [os.fspath(p) for p in base.glob('/'.join(parts[first:])) if p.is_file()]


def expand_patterns(patterns: str | Sequence[str], what: str = '') -> list[str]:
  """Sorted files matching one or more glob patterns (local, or gs:// URLs); FileNotFoundError
  if none match."""
  patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
  result: list[str] = []
  for pattern in patterns:
    text = os.fspath(pattern)
    matched = sorted(_glob_url(text) if files.is_url(text) else glob_lib.glob(text))
    if not matched:
      raise DataFileNotFoundError(f'{what}no file matches {text!r}.')
    result.extend(matched)
  return result


class _LineIndex(Sequence):
  """Random access to the non-blank lines of several files through byte offsets (after each
  file's first non-blank line when `skip_first`: a header, kept in `first_lines`).

  A local file is opened for each read. A URL's file is opened once per process and kept open:
  one HTTP request per example would be slow, and gcsfs's file object reads ahead in blocks, so
  neighbouring lines come from memory. Those handles are shared by grain's reader threads (a
  lock keeps seek + readline together) and are not pickled to grain's worker processes."""

  def __init__(self, files_: Sequence[str], parse: Callable[[str, str, int], Mapping[str, Any]],
               skip_first: bool = False):
    self._files = list(files_)
    self._parse = parse
    self._index: list[tuple[int, int, int]] = []  # (file number, offset, line number)
    self.first_lines: dict[str, bytes] = {}  # path -> its first non-blank line (skip_first)
    self._handles: dict[int, Any] = {}
    self._lock = threading.Lock()
    for f, path in enumerate(self._files):
      offset = 0
      try:
        with files.open_bytes(path) as fh:
          for lineno, line in enumerate(fh, 1):
            if line.strip():
              if skip_first and path not in self.first_lines:
                self.first_lines[path] = line
              else:
                self._index.append((f, offset, lineno))
            offset += len(line)
      except OSError as e:  # a directory, no permission...: named here, not deep in grain
        raise DataSourceError(f'{path}: cannot be read ({e.strerror or e}).') from None

  def __getstate__(self):
    return {**self.__dict__, '_handles': {}, '_lock': None}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _read_line(self, f: int, offset: int) -> bytes:
    path = self._files[f]
    if not files.is_url(path):
      with open(path, 'rb') as fh:
        fh.seek(offset)
        return fh.readline()
    with self._lock:
      if f not in self._handles:
        self._handles[f] = files.open_bytes(path)
      fh = self._handles[f]
      fh.seek(offset)
      return fh.readline()

  def __len__(self):
    return len(self._index)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    f, offset, lineno = self._index[i]
    path = self._files[f]
    try:
      raw = self._read_line(f, offset)
    except OSError as e:  # removed or made unreadable after it was indexed
      raise DataSourceError(f'{path}: cannot be read ({e.strerror or e}).') from None
    try:
      line = raw.decode('utf-8').rstrip('\r\n')
    except UnicodeDecodeError as e:
      raise DataSourceError(f'{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at '
                            f'column {e.start + 1}); expected UTF-8 lines.') from None
    return self._parse(line, path, lineno)


class _FileSource(Source):
  EXPECTED = 'lines'  # what a line should be, for the error messages
  SKIP_FIRST = False  # the first non-blank line of each file is a header, not an example

  def __init__(self, split_patterns: Mapping[str, str | Sequence[str]], label: str = ''):
    self._patterns = dict(split_patterns)
    self._cache: dict[str, _LineIndex] = {}
    self.label = label  # where the patterns came from (e.g. 'data.source=...'), for messages

  @property
  def splits(self):
    return tuple(self._patterns)

  def _parse(self, line: str, path: str, lineno: int) -> Mapping[str, Any]:
    raise NotImplementedError

  def files(self, split: str) -> list[str]:
    self._check_split(split)
    return expand_patterns(self._patterns[split],
                           f'{self.label or type(self).__name__} split {split!r}: ')

  def get(self, split):
    if split not in self._cache:
      files = self.files(split)
      index = _LineIndex(files, self._parse, self.SKIP_FIRST)
      self._read_headers(index)
      if not len(index):
        # Said here, when the pipeline is built, rather than as grain's "no examples" or a
        # mixture that never yields. One empty shard among others is allowed.
        where = files[0] if len(
            files) == 1 else f'all {len(files)} files of split {split!r} ({", ".join(files)})'
        raise DataSourceError(f'{where}: no examples (empty, or only blank lines); expected '
                              f'{self.EXPECTED}.')
      self._cache[split] = index
    return self._cache[split]

  def _read_headers(self, index: _LineIndex) -> None:
    """Takes what it needs from the files' first lines (SKIP_FIRST sources)."""


class TextLineSource(_FileSource):
  """One example {key: line} per non-blank line (trailing newline removed)."""
  EXPECTED = 'one example per non-blank line of UTF-8 text'

  def __init__(self, split_patterns, key: str = 'text', label: str = ''):
    super().__init__(split_patterns, label)
    self.key = key

  def _parse(self, line, path, lineno):
    return {self.key: line}


class JsonlSource(_FileSource):
  """One JSON object per non-blank line."""
  EXPECTED = 'one JSON object per line'

  def _parse(self, line, path, lineno):
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataSourceError(f'{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); '
                            f'expected {self.EXPECTED}.') from None
    if not isinstance(obj, dict):
      raise DataSourceError(f'{path}:{lineno}: expected a JSON object, got '
                            f'{type(obj).__name__}; expected {self.EXPECTED}.')
    return obj


def _split_tsv(line: str) -> list[str]:
  return next(csv.reader(io.StringIO(line), delimiter='\t', quoting=csv.QUOTE_NONE))


class TsvSource(_FileSource):
  """Tab-separated lines -> {field_names[i]: column i}; a wrong column count is an error.
  field_names None: each file's first non-blank line is its header, naming its columns."""

  def __init__(self, split_patterns, field_names: Sequence[str] | None = None, label: str = ''):
    super().__init__(split_patterns, label)
    self.SKIP_FIRST = field_names is None
    self.field_names = None if field_names is None else tuple(field_names)
    self._headers: dict[str, tuple[str, ...]] = {}
    self.EXPECTED = ('a header line naming the tab-separated columns, then one example per line'
                     if field_names is None else f'{len(self.field_names)} tab-separated columns '
                     f'per line ({", ".join(self.field_names)})')

  def _read_headers(self, index):
    for path, raw in index.first_lines.items():
      self._headers[path] = tuple(_split_tsv(raw.decode('utf-8', 'replace').rstrip('\r\n')))

  def _parse(self, line, path, lineno):
    names = self.field_names or self._headers[path]
    cols = _split_tsv(line)
    if len(cols) != len(names):
      raise DataSourceError(f'{path}:{lineno}: {len(cols)} tab-separated columns, expected '
                            f'{len(names)} ({", ".join(names)}).')
    return dict(zip(names, cols))


TF_EXTRA_HINT = ('this TFDS dataset is only available as tfrecord, which needs TensorFlow: '
                 'install the optional extra with `pip install t5lite[tf]`, or build/convert the '
                 "dataset with file_format='array_record'.")


def _has_tensorflow() -> bool:
  try:
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


class _DecodedTfdsRecords(Sequence):
  """tfds.data_source records as plain python: bytes text features -> str."""

  def __init__(self, records):
    self._records = records

  def __len__(self):
    return len(self._records)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      # array_record raises ValueError here; IndexError is what ends iteration over a Sequence.
      raise IndexError(f'record {i} of {len(self)}')
    ex = self._records[i % len(self)]
    return {k: (v.decode('utf-8') if isinstance(v, bytes) else v) for k, v in ex.items()}


class TfdsSource(Source):
  """A TFDS dataset, e.g. TfdsSource('c4/en:3.1.0', splits=('train', 'validation')).

  array_record datasets are read with `tfds.data_source` (random access, no TensorFlow).
  A tfrecord-only dataset needs TensorFlow: with it installed the split is read once
  through tf.data into memory (fine for fine-tuning sets, not for C4); without it
  the error names the `tf` extra.
  """

  def __init__(self, name: str, splits: Sequence[str] = ('train', 'validation'),
               data_dir: str | None = None, decode_bytes: bool = True):
    self.name = name
    self._splits = tuple(splits)
    self.data_dir = data_dir
    self.decode_bytes = decode_bytes
    self._cache: dict[str, Sequence] = {}

  @property
  def splits(self):
    return self._splits

  def __getstate__(self):
    return {**self.__dict__, '_cache': {}}

  def get(self, split):
    self._check_split(split)
    if split not in self._cache:
      self._cache[split] = self._open(split)
    return self._cache[split]

  def _data_dir(self) -> str | None:
    # TFDS_DATA_DIR read when the split is opened (TFDS reads it once, at import), so a
    # notebook or test can point a registered task at its own copy.
    return self.data_dir or os.environ.get('TFDS_DATA_DIR') or None

  def _open(self, split):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    try:
      records = tfds.data_source(self.name, split=split, data_dir=self._data_dir())
    except Exception as e:  # pylint: disable=broad-except
      message = str(e)
      if 'array_record' not in message.lower() and 'file format' not in message.lower() \
         and 'file_format' not in message.lower() and 'tensorflow' not in message.lower():
        raise
      if not _has_tensorflow():
        raise RuntimeError(f'TFDS {self.name!r} split {split!r}: {TF_EXTRA_HINT}') from e
      ds = tfds.load(self.name, split=split, data_dir=self._data_dir())
      records = list(tfds.as_numpy(ds))
    return _DecodedTfdsRecords(records) if self.decode_bytes else records
