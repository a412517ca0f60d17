"""An offline text corpus that ships with every CPython: no download, no network.

`corpus_documents()` returns the Python language reference topics that back
`help()` (`pydoc_data.topics`) followed by the docstrings of a fixed list of
pure-Python standard-library modules, their public classes and functions, and
the public methods of those classes. That is about 1.5 MB of English technical
prose: enough to train a small SentencePiece model and to pretrain a tiny T5
in the quickstart.

Determinism: the module list is fixed and sorted, names inside a module are
visited in sorted order, and nothing depends on the environment, so the corpus
is identical across runs of the same Python version on the same platform.
(Another Python version has other docstrings; `vocab.embedded_vocabulary`
hashes the corpus so each version gets its own tokenizer file.)
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import subprocess
import sys
import warnings

# Pure-Python stdlib modules that import without side effects: no GUI (tkinter,
# turtle), no easter eggs that print or open a browser (this, antigravity), no
# deprecation warnings, no network on import. Sorted so the order is obvious.
MODULES: tuple[str, ...] = (
    'abc',
    'argparse',
    'ast',
    'base64',
    'bisect',
    'calendar',
    'cmd',
    'codecs',
    'collections',
    'colorsys',
    'configparser',
    'contextlib',
    'copy',
    'csv',
    'dataclasses',
    'datetime',
    'decimal',
    'difflib',
    'email.message',
    'email.utils',
    'enum',
    'filecmp',
    'fileinput',
    'fnmatch',
    'fractions',
    'ftplib',
    'functools',
    'getopt',
    'gettext',
    'glob',
    'graphlib',
    'gzip',
    'hashlib',
    'heapq',
    'hmac',
    'html',
    'html.parser',
    'http.client',
    'http.cookies',
    'http.server',
    'imaplib',
    'inspect',
    'ipaddress',
    'json',
    'json.decoder',
    'json.encoder',
    'linecache',
    'locale',
    'logging',
    'logging.handlers',
    'lzma',
    'mailbox',
    'mimetypes',
    'numbers',
    'operator',
    'optparse',
    'os',
    'pathlib',
    'pickle',
    'pickletools',
    'pkgutil',
    'plistlib',
    'poplib',
    'posixpath',
    'pprint',
    'profile',
    'pstats',
    'queue',
    'quopri',
    'random',
    're',
    'reprlib',
    'runpy',
    'sched',
    'secrets',
    'selectors',
    'shelve',
    'shlex',
    'shutil',
    'smtplib',
    'socket',
    'socketserver',
    'statistics',
    'string',
    'struct',
    'subprocess',
    'tarfile',
    'tempfile',
    'textwrap',
    'threading',
    'timeit',
    'tokenize',
    'trace',
    'traceback',
    'types',
    'typing',
    'unittest.case',
    'unittest.mock',
    'urllib.parse',
    'urllib.request',
    'uuid',
    'warnings',
    'wave',
    'weakref',
    'xml.dom.minidom',
    'xml.etree.ElementTree',
    'zipfile',
    'zoneinfo',
)

# Shorter strings are mostly "Return self." style noise with no prose in them.
MIN_DOCUMENT_CHARS = 20


def normalize_whitespace(text: str) -> str:
  """Collapses every run of whitespace (newlines included) to one space.

    SentencePiece's default normaliser does the same to its input, so keeping
    newlines or indentation here would only suggest structure the tokenizer
    throws away.
    """
  return ' '.join(text.split())


def _public_names(obj) -> list[str]:
  return sorted(n for n in vars(obj) if not n.startswith('_'))


def _module_docstrings(module) -> list[str]:
  """The module's docstring, then its own public classes/functions (sorted)."""
  docs = [module.__doc__]
  for name in _public_names(module):
    obj = vars(module)[name]
    # Only objects defined here: re-exports (os.path in os, typing aliases)
    # would otherwise appear once per importing module.
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
      continue
    if getattr(obj, '__module__', None) != module.__name__:
      continue
    qualname = f'{module.__name__}.{name}'
    # `vars(obj)["__doc__"]` rather than `obj.__doc__`: a class without its
    # own docstring must not repeat its base class's.
    docs.append((qualname, vars(obj).get('__doc__')) if inspect.isclass(obj) else (qualname,
                                                                                   obj.__doc__))
    if inspect.isclass(obj):
      for attr in _public_names(obj):
        member = vars(obj)[attr]
        if inspect.isfunction(member):
          docs.append((f'{qualname}.{attr}', member.__doc__))
  out = []
  for item in docs:
    name, doc = item if isinstance(item, tuple) else (module.__name__, item)
    if isinstance(doc, str):
      # Prefix the qualified name so each snippet carries its own context.
      out.append(f'{name}: {inspect.cleandoc(doc)}')
  return out


def _collect() -> tuple[str, ...]:
  """Reads the docstrings in *this* interpreter: see `_corpus` for why that must be a fresh one."""
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel

  raw: list[str] = [topics[key] for key in sorted(topics)]
  for module_name in MODULES:
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        module = importlib.import_module(module_name)
    except ImportError:
      # Some builds leave out optional modules (e.g. lzma without liblzma).
      continue
    raw.extend(_module_docstrings(module))
  docs = (normalize_whitespace(text) for text in raw)
  return tuple(doc for doc in docs if len(doc) >= MIN_DOCUMENT_CHARS)


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
  """The corpus as a fresh interpreter sees it.

    Other libraries patch standard-library modules when they are imported (importing torch and
    transformers first changes some docstrings here, measured), so reading them in a process that
    has imported who-knows-what would make the corpus, the vocabulary and every batch depend on
    import order. This file is run as a script in an isolated interpreter (`python -I`: no
    PYTHONPATH, no user site) that imports only the standard library; about a second, once per
    process.
    """
  result = subprocess.run([sys.executable, '-I', os.path.abspath(__file__)], capture_output=True,
                          text=True, encoding='utf-8', check=False)
  if result.returncode != 0:
    raise RuntimeError(f'reading the embedded corpus in a fresh interpreter failed:\n'
                       f'{result.stderr[-2000:]}')
  return tuple(json.loads(result.stdout))


def corpus_documents() -> list[str]:
  """Returns the embedded corpus: a deterministic, ordered list of documents.

    Computed once per process (cached); a fresh list is returned each call so
    callers may mutate it freely.
    """
  return list(_corpus())


if __name__ == '__main__':
  # Run by `_corpus` in a fresh interpreter: write the documents as JSON to stdout.
  json.dump(list(_collect()), sys.stdout)
