"""Train a SentencePiece vocabulary from a task's text, in one command.

    python -m t5lite.data.train_vocab --task my_task --vocab_size 32000 --out my_vocab.model \
        [--split train] [--features text] [--max_examples 1000000]

Reads the raw examples of the task's source (or of every task of a mixture), takes the string
fields named by --features (default: every string field), and trains a unigram model with T5's
special ids (pad 0, eos 1, unk 2, no bos) through `vocab.train_sentencepiece`, which is
deterministic. --out may be a gs:// URL (`pip install 't5lite[gcp]'`), and so may the files of a
file-backed task. Progress lines say how many texts have been read, then when training starts and
how long it took. Use it with `--config.data.vocabulary=my_vocab.model` (100 sentinels are added on
top, as in T5, so set model.vocab_size >= vocab_size + 100).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Iterator, Sequence

from t5lite import logs
from t5lite.data import catalog  # noqa: F401  pylint: disable=unused-import  (registers tasks)
from t5lite.data import tasks, vocab

log = logging.getLogger('t5lite.data.train_vocab')  # not __name__: '__main__' under python -m


def task_texts(name: str, split: str, features: Sequence[str] = (),
               max_examples: int = 0) -> Iterator[str]:
  """The raw text of a task's (or mixture's) split, before any preprocessing."""
  obj = tasks.get(name)
  task_list = obj.tasks() if isinstance(obj, tasks.Mixture) else [obj]
  count = 0
  for task in task_list:
    examples = task.source.get(split)
    for i in range(len(examples)):
      example = examples[i]
      fields = features or [k for k, v in example.items() if isinstance(v, (str, bytes))]
      for field in fields:
        if field not in example:
          raise KeyError(f'task {task.name!r} split {split!r}: example {i} has no field '
                         f'{field!r} (it has {sorted(example)}); pick --features among those')
        value = example[field]
        yield value.decode('utf-8') if isinstance(value, bytes) else str(value)
      count += 1
      if max_examples and count >= max_examples:
        return


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--task', required=True, help='a registered task or mixture')
  p.add_argument('--out', required=True, help='where to write the .model file')
  p.add_argument('--vocab_size', type=int, default=32000,
                 help='SentencePiece pieces (T5 used 32000; the 100 sentinels come on top)')
  p.add_argument('--split', default='train')
  p.add_argument('--features', default='', help='comma-separated string fields (default: all)')
  p.add_argument('--max_examples', type=int, default=0, help='0: the whole split')
  args = p.parse_args(argv)
  features = [f for f in args.features.split(',') if f]
  try:
    # No total: an example gives one text per string field.
    progress = logs.Progress(f'train_vocab: reading {args.task}/{args.split}', None, 'texts',
                             logger=log)
    texts = []
    for text in task_texts(args.task, args.split, features, args.max_examples):
      texts.append(text)
      progress.update()
    progress.finish()
    if not texts:
      raise ValueError(f'task {args.task!r} split {args.split!r} has no text')
    log.info(f'train_vocab: training a {args.vocab_size}-piece SentencePiece model on '
             f'{len(texts)} texts ({sum(map(len, texts))} characters) ...')
    start = time.monotonic()
    vocab.train_sentencepiece(texts, args.out, args.vocab_size)
    log.info(f'train_vocab: trained in {time.monotonic() - start:.1f}s; wrote {args.out}')
  except (tasks.UnknownNameError, KeyError, ValueError, RuntimeError) as e:
    print(f'train_vocab: {e}', file=sys.stderr)
    return 2
  trained = vocab.SentencePieceVocabulary(args.out)
  print(f'wrote {args.out}: {trained.sp_vocab_size} pieces + {trained.extra_ids} sentinels = '
        f'{trained.vocab_size} ids, from {len(texts)} texts of {args.task}/{args.split}; use '
        f'--config.data.vocabulary={args.out} --config.model.vocab_size>={trained.vocab_size}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
