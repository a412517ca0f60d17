"""Progress lines of the long jobs: eval per task, infer, data inspection; the compiling lines
around the first decode; timestamps and levels; process 0 only; rate-limited.

Runs test_eval_cli's tiny model in-process (10 examples, batches of 8) and reads stdout, where
t5lite's log handler writes."""
import json
import logging
import re

from test_eval_cli import INPUTS, env, save  # pylint: disable=unused-import  (env: a fixture)

from t5lite import eval as eval_lib
from t5lite import infer, logs
from t5lite.data import inspect

STAMP = r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO '
RATE = r'[0-9.e+]+'


def lines_matching(out: str, pattern: str) -> list[str]:
  return [l for l in out.splitlines() if re.fullmatch(STAMP + pattern, l)]


def test_eval_prints_progress_per_task_and_the_first_compile(env, tmp_path, capsys):
  save(env, tmp_path, 2, 4)
  assert eval_lib.main(
      ['--config', env['config'], '--workdir',
       str(tmp_path), '--checkpoint', 'all']) == 0
  out = capsys.readouterr().out
  # One progress line after the first batch (8 of the 10 examples, with a rate and an ETA) and
  # one at the end, for each of the two checkpoints.
  first = lines_matching(out, rf'eval cli_echo: 8/10 examples \(80%\), {RATE} examples/s, ETA \S+')
  last = lines_matching(out, r'eval cli_echo: 10 examples in \S+')
  assert len(first) == len(last) == 2, out
  # The decode step compiles once, around the first batch: before the first progress line.
  compiling = lines_matching(out, r'compiling the decode step \.\.\.')
  compiled = lines_matching(out, r'compiled the decode step in [0-9.]+s')
  assert len(compiling) == len(compiled) == 1, out
  lines = out.splitlines()
  assert lines.index(compiling[0]) < lines.index(compiled[0]) < lines.index(first[0])
  assert len(json.load(open(tmp_path / 'eval' / 'cli_echo' / 'step_4.json'))['examples']) > 0


def test_infer_prints_lines_done_rate_and_eta(env, tmp_path, capsys):
  save(env, tmp_path, 4)
  (tmp_path / 'in.jsonl').write_text(''.join(l + '\n' for l in INPUTS))
  argv = [
      '--config', env['config'], '--workdir',
      str(tmp_path), '--input',
      str(tmp_path / 'in.jsonl'), '--output',
      str(tmp_path / 'out.jsonl'), '--config.infer.batch_size=8'
  ]
  assert infer.main(argv) == 0
  out = capsys.readouterr().out
  assert len(lines_matching(out, rf'infer: 8/10 lines \(80%\), {RATE} lines/s, ETA \S+')) == 1, out
  assert len(lines_matching(out, r'infer: 10 lines in \S+')) == 1, out
  assert len(lines_matching(out, r'compiling the decode step \.\.\.')) == 1, out
  assert len(lines_matching(out, r'compiled the decode step in [0-9.]+s')) == 1, out
  # Resumed after 8 lines: the progress counts the 2 lines left to do.
  kept = (tmp_path / 'out.jsonl').read_text().splitlines(True)[:8]
  (tmp_path / 'out.jsonl').write_text(''.join(kept))
  assert infer.main(argv) == 0
  out = capsys.readouterr().out
  assert len(lines_matching(out, rf'infer: 2/2 lines \(100%\), {RATE} lines/s')) == 1, out
  assert len(lines_matching(out, r'infer: 2 lines in \S+')) == 1, out


def test_inspect_prints_packing_progress(env, capsys):
  del env  # registers the cli_echo task
  assert inspect.main([
      '--task', 'cli_echo', '--split', 'validation', '--n', '1', '--lengths', 'inputs=16,targets=8',
      '--batches', '3', '--batch_size', '2'
  ]) == 0
  out = capsys.readouterr().out
  assert lines_matching(out, r'inspect: building the pipeline .*'), out
  assert len(
      lines_matching(out, rf'inspect: packing: 1/3 batches \(33%\), {RATE} batches/s, '
                     r'ETA \S+')) == 1, out
  assert len(lines_matching(out, r'inspect: packing: 3 batches in \S+')) == 1, out


def test_progress_is_rate_limited_and_on_process_0_only(capsys, monkeypatch):
  log = logging.getLogger('t5lite.test_progress')
  progress = logs.Progress('work', 1000, 'items', every_s=3600, logger=log)
  for _ in range(1000):
    progress.update()
  progress.finish()
  out = capsys.readouterr().out
  assert len(out.splitlines()) == 2, out  # the first update and the end, nothing between
  assert lines_matching(out, rf'work: 1/1000 items \(0%\), {RATE} items/s, ETA \S+')
  assert lines_matching(out, r'work: 1000 items in \S+')
  # Another process of a multi-process run prints no progress (its warnings still show).
  monkeypatch.setattr(logs, 'process_index', lambda: 1)
  progress = logs.Progress('work', 10, 'items', logger=log)
  progress.update(10)
  progress.finish()
  log.warning('still shown')
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 1 and re.fullmatch(r'\S+ \S+ WARNING still shown', out[0]), out
