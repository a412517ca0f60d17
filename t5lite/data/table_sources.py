"""Random-access sources over columnar and record files (t5lite.data.sources has the text ones).

  ParquetSource      Parquet files (pyarrow): rows found through the files' row-group sizes
  ArrayRecordSource  ArrayRecord files (array_record, grain's reader), one JSON object per record
  HfSource           a HuggingFace `datasets` dataset: a save_to_disk directory, or a folder of
                     Parquet / Arrow / JSON / CSV files laid out as `datasets.load_dataset` reads
                     a local folder (its split names come from the file names; `datasets`
                     converts such files once into its cache, HF_DATASETS_CACHE)

Each maps a split to a Sequence of example dicts, as the sources in t5lite.data.sources do, so
grain reads them by index: shardable and exactly resumable. File patterns are globs, local or
gs:// (through t5lite.files; ArrayRecord and HF datasets are local only, see below). What cannot
be read is a DataSourceError naming the file (and the record).

Parquet: reading row i reads its whole row group (decompressed, only the columns the rows have),
and the last few row groups read are kept per process, so an unshuffled pass reads each group once;
a shuffled one may read a group once per example: keep row groups small (pyarrow's
`row_group_size`, e.g. 1,000 rows) for large shuffled sets.
"""
from __future__ import annotations

import bisect
import collections
import json
import os
import threading
from typing import Any, Mapping, Sequence

from t5lite import files
from t5lite.data.sources import DataSourceError, Source, expand_patterns


class _LazySplits(Source):
  """A Source whose splits are opened on first use and rebuilt (not pickled) in grain workers."""

  def __init__(self, split_patterns: Mapping[str, Any], label: str = ''):
    self._patterns = dict(split_patterns)
    self._cache: dict[str, Sequence] = {}
    self.label = label

  @property
  def splits(self):
    return tuple(self._patterns)

  def __getstate__(self):
    return {**self.__dict__, '_cache': {}}

  def files(self, split: str) -> list[str]:
    self._check_split(split)
    return expand_patterns(self._patterns[split],
                           f'{self.label or type(self).__name__} split {split!r}: ')

  def get(self, split):
    if split not in self._cache:
      rows = self._open(split)
      if not len(rows):
        raise DataSourceError(f'{self.label or type(self).__name__} split {split!r}: no examples '
                              f'(the files {", ".join(self.files(split))} hold no rows).')
      self._cache[split] = rows
    return self._cache[split]

  def _open(self, split: str) -> Sequence:
    raise NotImplementedError


class _Rows(Sequence):
  """Shared by the readers below: slices and negative indices as a list has them."""

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      raise IndexError(f'row {i} of {len(self)}')
    return self._row(i % len(self))

  def _row(self, i: int) -> dict:
    raise NotImplementedError


class _ParquetRows(_Rows):
  """Rows of several Parquet files, in path order, by (file, row group, offset)."""
  KEEP_GROUPS = 4  # row groups kept decoded per process

  def __init__(self, paths: Sequence[str]):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    self._paths = list(paths)
    self._groups: list[tuple[int, int]] = []  # (file number, row group)
    self._starts: list[int] = []  # the first row of each entry of _groups
    total = 0
    for f, path in enumerate(self._paths):
      try:
        with files.open_bytes(path) as fh:
          meta = pq.ParquetFile(fh).metadata
      except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataSourceError(f'{path}: not a readable Parquet file ({e}).') from None
      for g in range(meta.num_row_groups):
        self._groups.append((f, g))
        self._starts.append(total)
        total += meta.row_group(g).num_rows
    self._len = total
    self._decoded: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self):
    return {**self.__dict__, '_decoded': collections.OrderedDict(), '_lock': None}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self):
    return self._len

  def _group(self, k: int) -> list[dict]:
    with self._lock:
      if k in self._decoded:
        self._decoded.move_to_end(k)
        return self._decoded[k]
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    f, g = self._groups[k]
    path = self._paths[f]
    try:
      with files.open_bytes(path) as fh:
        rows = pq.ParquetFile(fh).read_row_group(g).to_pylist()
    except (OSError, ValueError) as e:
      raise DataSourceError(f'{path}: row group {g} cannot be read ({e}).') from None
    with self._lock:
      self._decoded[k] = rows
      while len(self._decoded) > self.KEEP_GROUPS:
        self._decoded.popitem(last=False)
    return rows

  def _row(self, i):
    k = bisect.bisect_right(self._starts, i) - 1
    return self._group(k)[i - self._starts[k]]


class ParquetSource(_LazySplits):
  """Parquet files per split (globs, local or gs://): one example dict per row."""

  def _open(self, split):
    return _ParquetRows(self.files(split))


class _ArrayRecordRows(_Rows):
  """Records of several ArrayRecord files, each a UTF-8 JSON object."""

  def __init__(self, paths: Sequence[str]):
    from array_record.python import array_record_data_source  # pylint: disable=import-outside-toplevel
    self._paths = list(paths)
    self._make = array_record_data_source.ArrayRecordDataSource
    try:
      self._records = self._make(self._paths)
    except (OSError, RuntimeError, ValueError) as e:  # not an ArrayRecord file
      raise DataSourceError(
          f'{", ".join(self._paths)}: not readable as ArrayRecord ({e}).') from None
    self._len = len(self._records)
    # Record i's file, for the messages: files in order, as the data source reads them.
    self._ends = list(_cumulative(self._records))

  def __getstate__(self):  # the readers hold open files: reopened in each worker process
    return {**self.__dict__, '_records': None}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._records = self._make(self._paths)

  def __len__(self):
    return self._len

  def _row(self, i):
    raw = self._records[i]
    try:
      obj = json.loads(raw.decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError):
      obj = None
    if not isinstance(obj, dict):
      f = bisect.bisect_right(self._ends, i)
      first = self._ends[f - 1] if f else 0
      raise DataSourceError(f'{self._paths[f]}: record {i - first} is not a UTF-8 JSON object '
                            f'(starts {bytes(raw[:20])!r}); t5lite reads ArrayRecord records '
                            'written as json.dumps(example).encode().')
    return obj


def _cumulative(records) -> list[int]:
  """The end (exclusive) of each file's records in the data source's numbering."""
  ends, total = [], 0
  for instruction in records._read_instructions:  # pylint: disable=protected-access
    total += instruction.num_records
    ends.append(total)
  return ends


class ArrayRecordSource(_LazySplits):
  """ArrayRecord files per split (local globs: the reader opens files itself, with no gs://),
  each record a JSON object (`json.dumps(example).encode()`)."""

  def files(self, split):
    found = super().files(split)
    urls = [p for p in found if files.is_url(p)]
    if urls:
      raise DataSourceError(f'{self.label or "ArrayRecordSource"}: {urls[0]}: ArrayRecord files '
                            'are read from a local disk only; copy them to one (gsutil cp), or '
                            'write the data as jsonl or Parquet, which are read from gs:// too.')
    return found

  def _open(self, split):
    return _ArrayRecordRows(self.files(split))


# --- HuggingFace datasets


def _require_datasets():
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataSourceError("hf: sources need HuggingFace's `datasets`: pip install "
                          "'t5lite[hf]' (or pip install datasets).") from None
  return datasets


def _is_saved_dataset(folder: str) -> bool:
  """A `save_to_disk` folder: a DatasetDict's dataset_dict.json or a Dataset's state.json."""
  return any(os.path.isfile(os.path.join(folder, n)) for n in ('dataset_dict.json', 'state.json'))


def load_hf(folder: str, label: str = ''):
  """The Dataset or DatasetDict in a local folder (see the module docstring)."""
  where = label or f'hf:{folder}'
  if files.is_url(folder):
    raise DataSourceError(f'{where}: HF datasets are read from a local folder only; copy it to a '
                          'local disk, or point data.source at its Parquet files '
                          '(parquet:gs://...), which are read from gs:// too.')
  if not os.path.isdir(folder):
    raise DataSourceError(f'{where}: no such folder {folder!r}; expected a `datasets` '
                          'save_to_disk folder, or a folder of Parquet/Arrow files.')
  datasets = _require_datasets()
  try:
    if _is_saved_dataset(folder):
      return datasets.load_from_disk(folder)
    return datasets.load_dataset(folder)
  except Exception as e:  # pylint: disable=broad-except  (datasets' own errors: one line)
    raise DataSourceError(f'{where}: cannot be read by `datasets` ({type(e).__name__}: '
                          f'{" ".join(str(e).split())[:300]}).') from None


class _HfRows(_Rows):
  """A `datasets.Dataset` as plain dicts (Arrow memory-mapped: random access, nothing copied)."""

  def __init__(self, dataset):
    self._dataset = dataset

  def __len__(self):
    return len(self._dataset)

  def _row(self, i):
    return dict(self._dataset[i])


class HfSource(Source):
  """HuggingFace `datasets` data in a local folder. `folder` may hold '{split}': one folder per
  split (each a saved Dataset or a folder of files); else its splits are the DatasetDict's (a
  lone Dataset is the split 'train')."""

  def __init__(self, folder: str, label: str = ''):
    self.folder = folder
    self.label = label or f'hf:{folder}'
    self._cache: dict[str, Any] = {}

  def __getstate__(self):
    return {**self.__dict__, '_cache': {}}

  def _whole(self):
    if '_whole' not in self._cache:
      data = load_hf(self.folder, self.label)
      self._cache['_whole'] = data if hasattr(data, 'keys') else {'train': data}
    return self._cache['_whole']

  @property
  def splits(self):
    if '{split}' in self.folder:
      return ('train', 'validation', 'test')
    return tuple(self._whole().keys())

  def get(self, split):
    if split in self._cache:
      return self._cache[split]
    if '{split}' in self.folder:
      self._check_split(split)
      data = load_hf(self.folder.replace('{split}', split), self.label)
      if hasattr(data, 'keys'):
        if len(data) != 1:
          raise DataSourceError(f'{self.label} split {split!r}: the folder holds the splits '
                                f'{list(data)}, expected one dataset.')
        data = next(iter(data.values()))
    else:
      whole = self._whole()
      if split not in whole:
        raise ValueError(f'{self.label} has no split {split!r}; it has {list(whole)}.')
      data = whole[split]
    rows = _HfRows(data)
    if not len(rows):
      raise DataSourceError(f'{self.label} split {split!r}: no examples.')
    self._cache[split] = rows
    return rows
