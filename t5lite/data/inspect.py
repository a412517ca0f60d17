"""Look at a task's data before a long job: decoded examples and packed-batch statistics.

    python -m t5lite.data.inspect --task embedded_span_corruption --n 3 \
        --lengths inputs=512,targets=114 [--split train] [--converter encdec] [--batches 20]
    python -m t5lite.data.inspect --module_import my.tasks --task my_task      # a task of yours
    python -m t5lite.data.inspect --source jsonl:data/{split}.jsonl \
        --source_fields inputs=question,targets=answer [--objective supervised] [--vocabulary byte]

Prints n examples as text (sentinels as <extra_id_N>, UL2 mode tokens as [NLU]/[NLG]/[S2S]),
then packs `--batches` batches of `--batch_size` rows and prints the fill ratio per
feature, examples per row, and the tokens trimmed to fit and examples dropped.
Runs offline on the embedded tasks. Info lines on stdout say what is slow while it happens
(building the pipeline, which may train the embedded vocabulary on first use; packing batches,
with a rate and an ETA).
"""

from __future__ import annotations

import argparse
import logging
import sys
import types

import numpy as np

from t5lite import logs
from t5lite.data import catalog  # noqa: F401  pylint: disable=unused-import  (registers tasks)
from t5lite.data import file_tasks, pipeline, sources, tasks
from t5lite.data import vocab as vocab_lib
from t5lite.fields import ConfigError
from t5lite.data import preprocessors as P

log = logging.getLogger('t5lite.data.inspect')  # not __name__: '__main__' under python -m


def parse_lengths(text: str) -> dict[str, int]:
  out = {}
  for part in filter(None, text.split(',')):
    key, _, value = part.partition('=')
    if not value.strip().isdigit():
      raise argparse.ArgumentTypeError(f'--lengths: expected name=int pairs, got {part!r}.')
    out[key.strip()] = int(value)
  return out


def render(ids, vocabulary) -> str:
  """Decoded text with UL2 mode tokens shown by name (they are the lowest sentinels)."""
  ids = [int(i) for i in np.asarray(ids)]
  modes = {
      P.mode_token_id(vocabulary.vocab_size, m, vocabulary.extra_ids): m for m in P.MODE_TOKENS
  }
  prefix = ''
  if ids and ids[0] in modes:
    prefix, ids = modes[ids[0]] + ' ', ids[1:]
  return prefix + vocabulary.decode(ids)


def _first_task(obj):
  return obj.tasks[0] if isinstance(obj, tasks.Mixture) else obj


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--task', help='registered task or mixture name')
  p.add_argument('--module_import', action='append', default=[],
                 help='a module to import first, registering tasks (repeatable)')
  p.add_argument('--source', help="data.source's FORMAT:PATTERN or hf:FOLDER instead of --task")
  p.add_argument('--source_fields', default='inputs=inputs,targets=targets')
  p.add_argument('--objective', default='supervised', choices=file_tasks.OBJECTIVES)
  p.add_argument('--vocabulary', default='embedded', help='--source: as data.vocabulary')
  p.add_argument('--split', default='train')
  p.add_argument('--n', type=int, default=5, help='examples to print')
  p.add_argument('--lengths', type=parse_lengths, default=parse_lengths('inputs=512,targets=114'))
  p.add_argument('--converter', default='encdec', choices=('encdec', 'decoder', 'prefix_lm'))
  p.add_argument('--batch_size', type=int, default=8)
  p.add_argument('--batches', type=int, default=10)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  if bool(args.task) == bool(args.source):
    p.error('give --task or --source (one of them)')
  try:
    tasks.import_modules(args.module_import)
    if args.source:
      data = types.SimpleNamespace(source=args.source, source_fields=args.source_fields,
                                   objective=args.objective, vocabulary=args.vocabulary,
                                   sp_vocab_size=vocab_lib.DEFAULT_SP_VOCAB_SIZE,
                                   converter=args.converter)
      file_tasks.check_config(types.SimpleNamespace(data=data))  # as the jobs' validation does
      args.task = file_tasks.register(data).name
    obj = tasks.get(args.task)
  except (tasks.UnknownNameError, ConfigError, sources.DataSourceError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2

  print(f'== {obj!r}, split {args.split!r}, lengths {args.lengths}')
  if isinstance(obj, tasks.Mixture):
    for t, w in obj.leaf_rates():
      print(f'   {t.name}: rate {w:.3f}')
  # Examples one by one (unpacked, batch 1) so each row is one example.
  log.info('inspect: building the pipeline (the first use of a vocabulary may train it) ...')
  vocab = _first_task(obj).output_features['targets'].vocabulary
  it = pipeline.make_task_iterator(obj, feature_lengths=args.lengths, global_batch_size=1,
                                   seed=args.seed, pack=False, split=args.split,
                                   converter=args.converter, process_index=0, process_count=1)
  for i in range(args.n):
    try:
      b = next(it)
    except StopIteration:
      break
    print(f'-- example {i}')
    if 'encoder_input_tokens' in b:
      n_in = int((b['encoder_input_tokens'][0] != 0).sum())
      print(f'inputs  ({n_in} tokens): {render(b["encoder_input_tokens"][0], vocab)}')
    tg = b['decoder_target_tokens'][0]
    if 'decoder_causal_attention' in b:
      n_prefix = int(b['decoder_causal_attention'][0].sum()) - 1
      print(f'inputs  ({n_prefix} tokens): {render(tg[:n_prefix], vocab)}')
      tg = tg[n_prefix:]
    print(f'targets ({int((tg != 0).sum())} tokens): {render(tg, vocab)}')

  it = pipeline.make_task_iterator(obj, feature_lengths=args.lengths,
                                   global_batch_size=args.batch_size, seed=args.seed, pack=True,
                                   split=args.split, converter=args.converter, process_index=0,
                                   process_count=1)
  before = tasks.trimmed_token_counts()
  dropped_before = tasks.dropped_counts()
  progress = logs.Progress('inspect: packing', args.batches, 'batches', logger=log)
  for _ in range(args.batches):
    try:
      next(it)
    except StopIteration:
      break
    progress.update()
  progress.finish()
  s = it.stats
  print(f'== packed: {s.batches} batches of {args.batch_size} rows, {s.examples} examples')
  for name, ratio in s.fill_ratio().items():
    print(f'fill ratio {name}: {ratio:.3f}')
  print(f'examples per row: {s.examples_per_row():.2f}')
  trimmed = {k: v - before.get(k, 0) for k, v in tasks.trimmed_token_counts().items()}
  dropped = {k: v - dropped_before.get(k, 0) for k, v in tasks.dropped_counts().items()}
  print(f'tokens trimmed to fit: {sum(trimmed.values())} {trimmed or ""}'.rstrip())
  print(f'examples dropped: {sum(dropped.values())} {dropped or ""}'.rstrip())
  return 0


if __name__ == '__main__':
  sys.exit(main())
