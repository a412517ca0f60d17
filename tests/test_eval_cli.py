"""`python -m t5lite.eval` and `python -m t5lite.infer`, run in-process through their main().

A tiny float32 model, a 10-example in-memory task registered by the config file itself, and
checkpoints written directly with the Checkpointer (no training), so the tests time the jobs,
not training.
"""
import json
import os
import re
import textwrap
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite import checkpoints, eval as eval_lib, infer, trainer
from t5lite import config_files
from t5lite.models import decoding
from t5lite.models.presets import ModelConfig
from t5lite.models.t5 import make_model


def echo_config(task: str, words: str, steps: int) -> str:
  """A config file whose task `task` maps 'say W' to W for each of `words`, in memory, on the
  embedded vocabulary: small enough for a job to train, evaluate and decode in seconds."""
  return textwrap.dedent(f'''
      from t5lite.config import base_config
      from t5lite.data import preprocessors, sources, tasks, vocab

      def get_config(arg=None):
        if {task!r} not in tasks.names():
          examples = [{{'inputs': f'say {{w}}', 'targets': w}} for w in {words!r}.split()]
          f = tasks.Feature(vocab.embedded_vocabulary)
          tasks.add_task({task!r}, sources.InMemorySource({{'train': examples,
                                                             'validation': examples}}),
                         [preprocessors.tokenize], {{'inputs': f, 'targets': f}},
                         metric_fns=['accuracy'])
        c = base_config()
        c.model.vocab_size = 2048
        c.model.dtype = 'float32'
        c.data.update(task={task!r}, inputs_length=16, targets_length=8)
        c.train.update(steps={steps}, batch_size=8)
        c.eval.update(tasks=({task!r},), batch_size=8)
        c.decode.max_decode_length = 4
        c.reporting.tensorboard = False
        return c
      ''')


CONFIG = echo_config('cli_echo', 'alpha beta gamma delta epsilon zeta eta theta iota kappa', 4)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp('cli')
  path = root / 'cli_config.py'
  path.write_text(CONFIG)
  config = config_files.load_config_file(str(path))
  model = make_model(ModelConfig.from_config(config.model))
  example = {
      'encoder_input_tokens': np.ones((1, 16), np.int32), 'decoder_input_tokens': np.ones((1, 8),
                                                                                          np.int32)
  }
  params = nn.meta.unbox(jax.jit(lambda k: model.init(k, **example))(jax.random.PRNGKey(1)))
  # The jobs read only the params: no optimizer state needed in these checkpoints.
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params['params'], opt_state={})
  return {'config': str(path), 'state': state, 'config_dict': config.to_dict(), 'root': root}


def save(env, workdir, *steps):
  ckpt = checkpoints.Checkpointer(str(workdir), async_save=False)
  for step in steps:
    ckpt.save(step, env['state'], {}, json.loads(json.dumps(env['config_dict'], default=str)))
  ckpt.close()


def run_eval(env, workdir, *flags):
  return eval_lib.main(['--config', env['config'], '--workdir', str(workdir), *flags])


def test_all_skips_steps_already_evaluated(env, tmp_path, capsys):
  save(env, tmp_path, 2, 4)
  assert run_eval(env, tmp_path, '--checkpoint', '2') == 0
  first = tmp_path / 'eval' / 'cli_echo' / 'step_2.json'
  stamp = first.stat().st_mtime_ns
  assert json.load(open(first))['num_examples'] == 10
  capsys.readouterr()
  assert run_eval(env, tmp_path, '--checkpoint', 'all') == 0
  out = capsys.readouterr().out
  assert 'step 2: already evaluated' in out and 'evaluating step 4' in out
  assert 'evaluating step 2' not in out
  assert first.stat().st_mtime_ns == stamp
  assert json.load(open(tmp_path / 'eval' / 'cli_echo' / 'step_4.json'))['step'] == 4


def test_watch_picks_up_a_checkpoint_written_after_it_started(env, tmp_path, capsys):
  save(env, tmp_path, 2)
  writer = threading.Timer(4.0, save, (env, tmp_path, 4))  # 4 = train.steps: the final one
  writer.start()
  start = time.monotonic()
  code = run_eval(env, tmp_path, '--watch', '--poll_seconds', '0.5', '--timeout', '120')
  writer.join()
  assert code == 0 and time.monotonic() - start < 120
  out = capsys.readouterr().out
  assert 'evaluating step 2' in out and 'evaluating step 4' in out
  assert 'evaluated the final checkpoint (step 4)' in out
  assert (tmp_path / 'eval' / 'cli_echo' / 'step_4.json').exists()


def test_watch_times_out_without_new_checkpoints(env, tmp_path, capsys):
  save(env, tmp_path, 2)
  os.makedirs(tmp_path / 'eval' / 'cli_echo')
  (tmp_path / 'eval' / 'cli_echo' / 'step_2.json').write_text('{}')  # already evaluated
  assert run_eval(env, tmp_path, '--watch', '--poll_seconds', '0.2', '--timeout', '1') == 0
  assert 'no new checkpoint for 1s; stopping' in capsys.readouterr().out


@pytest.mark.parametrize('flags, message', [
    (['--checkpoint', 'latest'], 'eval: no complete checkpoint in '),
    (['--checkpoint', '7'], 'eval: no complete checkpoint of step 7 in '),
    (['--checkpoint', '/nonexistent/run'], 'eval: --checkpoint /nonexistent/run: no complete'),
])
def test_missing_checkpoint_is_one_line_and_exit_2(env, tmp_path, capsys, flags, message):
  assert run_eval(env, tmp_path, *flags) == 2
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count('\n') == 1, err
  assert infer.main([
      '--config', env['config'], '--workdir',
      str(tmp_path), '--input', 'x', '--output',
      str(tmp_path / 'o.jsonl'), *flags
  ]) == 2


def write_inputs(path, lines):
  path.write_text(''.join(l + '\n' for l in lines))


INPUTS = [
    json.dumps({'inputs': f'say word number {i}', **({'targets': f'w{i}'} if i % 2 else {})})
    for i in range(10)
]
LONG = json.dumps({'inputs': ' '.join(['many'] * 40)})


def run_infer(env, workdir, inputs, output, *flags):
  return infer.main([
      '--config', env['config'], '--workdir',
      str(workdir), '--checkpoint', 'latest', '--input',
      str(inputs), '--output',
      str(output), '--config.infer.batch_size=8', *flags
  ])


def test_infer_order_resume_and_counted_warnings(env, tmp_path, capsys, monkeypatch):
  save(env, tmp_path, 4)
  lines = INPUTS[:3] + ['{"inputs": "cut off', ''] + INPUTS[3:7] + [LONG] + INPUTS[7:] + [LONG]
  write_inputs(tmp_path / 'in.jsonl', lines)
  full = tmp_path / 'full.jsonl'
  assert run_infer(env, tmp_path, tmp_path / 'in.jsonl', full,
                   '--config.infer.on_bad_line=skip') == 0
  out = capsys.readouterr().out
  assert 'line 4: not valid JSON' in out
  assert re.search(r'line 10: \d+ tokens, truncated to data.inputs_length=16 \(1 truncated', out)
  assert '2 input(s) truncated to 16 tokens, 1 bad line(s) skipped' in out
  records = [json.loads(l) for l in open(full)]
  # One object per good input, in input order; targets copied where present.
  expected = [(n + 1, json.loads(l)) for n, l in enumerate(lines)
              if l.startswith('{"inputs": "') and l.endswith('}')]
  assert [r['index'] for r in records] == list(range(12))
  assert [(r['line'], r['input'], r.get('target')) for r in records
         ] == [(n, e['inputs'], e.get('targets')) for n, e in expected]
  # Each prediction is the model's greedy decode of that input alone.
  config = config_files.load_config_file(env['config'])
  vocab = eval_lib.evaluator_lib.config_vocabulary(config)
  model = make_model(ModelConfig.from_config(config.model))
  params = jax.device_get(env['state'].params)
  rows = np.zeros((8, 16), np.int32)
  ids = vocab.encode(expected[5][1]['inputs']) + [1]
  rows[0, :len(ids)] = ids
  tokens = decoding.decode(model, params, {'encoder_input_tokens': rows},
                           eval_lib.evaluator_lib.decode_config(config, 8)).tokens
  assert records[5]['prediction'] == vocab.decode(np.asarray(tokens)[0])

  # Interrupted after the first batch (8 lines written), plus a cut-off half line: the rerun
  # gives the uninterrupted file byte for byte.
  partial = tmp_path / 'partial.jsonl'
  real_decode, calls = decoding.decode, []

  def decode_then_die(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real_decode(*args, **kwargs)

  monkeypatch.setattr(decoding, 'decode', decode_then_die)
  with pytest.raises(KeyboardInterrupt):
    run_infer(env, tmp_path, tmp_path / 'in.jsonl', partial, '--config.infer.on_bad_line=skip')
  monkeypatch.undo()
  assert len(open(partial).readlines()) == 8
  with open(partial, 'a') as f:
    f.write(open(full).readlines()[8][:25])  # a line cut short by a crash
  capsys.readouterr()
  assert run_infer(env, tmp_path, tmp_path / 'in.jsonl', partial,
                   '--config.infer.on_bad_line=skip') == 0
  assert 'resuming: 8 of 12' in capsys.readouterr().out
  assert partial.read_bytes() == full.read_bytes()
  # A third run has nothing to do; another input file is refused rather than mixed in.
  assert run_infer(env, tmp_path, tmp_path / 'in.jsonl', partial,
                   '--config.infer.on_bad_line=skip') == 0
  write_inputs(tmp_path / 'other.jsonl', INPUTS[::-1])
  assert run_infer(env, tmp_path, tmp_path / 'other.jsonl', partial) == 2
  assert 'was written for another input' in capsys.readouterr().err


@pytest.mark.parametrize('lines, flags, message', [
    (INPUTS[:2] + ['not json'], [], 'in.jsonl: line 3: not valid JSON'),
    (INPUTS[:1] + ['{"text": "x"}'], [], "line 2: no 'inputs' string"),
    (INPUTS[:4] + [LONG], ['--config.infer.on_too_long=error'],
     'line 5: the input has 81 tokens (EOS included), more than data.inputs_length=16'),
])
def test_infer_bad_input_errors_name_the_line(env, tmp_path, capsys, lines, flags, message):
  save(env, tmp_path, 4)
  write_inputs(tmp_path / 'in.jsonl', lines)
  assert run_infer(env, tmp_path, tmp_path / 'in.jsonl', tmp_path / 'o.jsonl', *flags) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / 'o.jsonl').exists()


def test_infer_score_mode_gives_each_targets_log_likelihood(env, tmp_path, capsys):
  """--mode score: per line, the summed log-likelihood of the given target (EOS included) under
  the checkpoint's model, computed here by hand for each example alone; length_normalize divides
  by the target's token count. A line without a target is an error naming it."""
  from t5lite.evaluation import scoring  # pylint: disable=import-outside-toplevel
  save(env, tmp_path, 4)
  pairs = [(f'say word number {i}', ('yes', 'no', 'the file')[i % 3]) for i in range(10)]
  write_inputs(tmp_path / 'in.jsonl', [json.dumps({'inputs': a, 'targets': b}) for a, b in pairs])
  out = tmp_path / 'scores.jsonl'
  assert run_infer(env, tmp_path, tmp_path / 'in.jsonl', out, '--mode', 'score',
                   '--config.infer.length_normalize=True') == 0
  records = [json.loads(l) for l in open(out)]
  assert [(r['input'], r['target']) for r in records] == pairs
  config = config_files.load_config_file(env['config'])
  vocab = eval_lib.evaluator_lib.config_vocabulary(config)
  model = make_model(ModelConfig.from_config(config.model))
  params = jax.device_get(env['state'].params)
  for record, (source, target) in zip(records, pairs):
    ids, target_ids = vocab.encode(source) + [1], vocab.encode(target) + [1]
    assert len(ids) <= 16 and len(target_ids) <= 8  # nothing truncated
    batch = {
        'encoder_input_tokens': np.zeros((1, 16), np.int32), 'decoder_target_tokens': np.zeros(
            (1, 8), np.int32)
    }
    batch['encoder_input_tokens'][0, :len(ids)] = ids
    batch['decoder_target_tokens'][0, :len(target_ids)] = target_ids
    batch['decoder_input_tokens'] = np.roll(batch['decoder_target_tokens'], 1, axis=1)
    batch['decoder_input_tokens'][:, 0] = 0
    batch['decoder_loss_weights'] = (batch['decoder_target_tokens'] > 0).astype(np.int32)
    expected = float(scoring.score_batch(model, params, batch)[0])
    assert record['num_tokens'] == len(target_ids)
    np.testing.assert_allclose(record['log_likelihood'], expected, rtol=1e-5)
    np.testing.assert_allclose(record['score'], expected / len(target_ids), rtol=1e-5)
    assert record['log_likelihood'] < 0
  write_inputs(tmp_path / 'bad.jsonl',
               [json.dumps({'inputs': 'say a', 'targets': 'a'}),
                json.dumps({'inputs': 'say b'})])
  capsys.readouterr()
  assert run_infer(env, tmp_path, tmp_path / 'bad.jsonl', tmp_path / 'b.jsonl', '--mode',
                   'score') == 2
  assert "line 2: no 'targets' string to score" in capsys.readouterr().err
  # A target longer than data.targets_length is never cut (its score would be another string's),
  # whatever infer.on_too_long says for inputs.
  write_inputs(tmp_path / 'long.jsonl', [
      json.dumps({'inputs': 'say a', 'targets': 'a'}),
      json.dumps({'inputs': 'say b', 'targets': 'b ' * 20})
  ])
  assert run_infer(env, tmp_path, tmp_path / 'long.jsonl', tmp_path / 'l.jsonl', '--mode', 'score',
                   '--config.infer.on_too_long=truncate') == 2
  assert 'long.jsonl: line 2: the target has' in capsys.readouterr().err
  assert not (tmp_path / 'l.jsonl').exists()
