"""Stage-wise mixtures (data.stages, t5lite/data/stages.py): per-stage rates, the exact switch
step, bitwise resume within and across boundaries, edits to future stages accepted and to started
ones refused, the config checks, and kill -9 of a real training run around a boundary."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from t5lite import checkpoints, config as config_lib, config_files
from t5lite.data import catalog  # pylint: disable=unused-import  (the subprocess's tasks)
from t5lite.data import pipeline, stages, tasks as T
from t5lite.data.sources import InMemorySource

from test_checkpoints import ENV, REPO, assert_trees_equal, run_train, train_command

TAGS = {'st_a': 200, 'st_b': 201, 'st_c': 202}  # each task's examples carry its tag as target


class TinyVocab:
  vocab_size, extra_ids, eos_id, path = 512, 100, 1, 'tiny'

  def encode(self, text):
    return [len(w) + 10 for w in text.split()]


@pytest.fixture(scope='module', autouse=True)
def tiny_tasks():
  feats = {'inputs': T.Feature(TinyVocab()), 'targets': T.Feature(TinyVocab())}
  for name, tag in TAGS.items():
    examples = [{'inputs': np.array([tag, 3 + i]), 'targets': np.array([tag])} for i in range(40)]
    T.add_task(name, InMemorySource({'train': examples}), [], feats, overwrite=True)
  T.add_mixture('st_mix', [('st_a', 1.0), ('st_b', 3.0)], overwrite=True)
  yield
  for name in list(TAGS) + ['st_mix']:
    T.remove(name)


SETTINGS = dict(feature_lengths={'inputs': 8, 'targets': 4}, global_batch_size=10, seed=7,
                process_index=0, process_count=1)
THREE = ('0:st_a', '4:st_mix', '8:st_a=0.5,data.task=0.5')  # data.task = st_c below


def staged(spec=THREE, **kw):
  return stages.make_staged_iterator(stages.resolve(spec, 'st_c'), **{**SETTINGS, **kw})


def counts(batch) -> dict[str, int]:
  """Examples per task in a batch: one tag token per example in the targets."""
  return {n: int((batch['decoder_target_tokens'] == tag).sum()) for n, tag in TAGS.items()}


def read(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for i, (x, y) in enumerate(zip(a, b)):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=f'batch {i} {k}')


# --- (a) rates and (b) the switch step ---------------------------------------------------------


def test_per_stage_task_counts_match_the_rates():
  """Each stage's examples come from its tasks at its rates: within 4 binomial sigmas."""
  spec = ('0:st_a', '20:st_mix', '40:st_a=0.2,data.task=0.8')
  expected = [{'st_a': 1.0}, {'st_a': 0.25, 'st_b': 0.75}, {'st_a': 0.2, 'st_c': 0.8}]
  it = staged(spec)
  for stage, rates in enumerate(expected):
    total = dict.fromkeys(TAGS, 0)
    for _ in range(20):
      for name, n in counts(next(it)).items():
        total[name] += n
    n = sum(total.values())
    assert n >= 200, total  # packing: about 2 examples a row
    for name in TAGS:
      p = rates.get(name, 0.0)
      bound = 4 * math.sqrt(n * p * (1 - p))
      assert abs(total[name] - n * p) <= bound, (stage, name, total, rates)


def test_the_switch_is_exactly_at_the_start_and_each_stage_is_its_own_pipeline():
  """Batches 0..3 are st_a's pipeline with train.seed itself (what data.task=st_a reads), batches
  4..7 st_mix's with stage 1's seed, from its start: the staged iterator adds nothing else."""
  got = read(staged(), 10)
  plain = pipeline.make_task_iterator('st_a', **SETTINGS)
  assert_batches_equal(got[:4], read(plain, 4))
  mix = iter(pipeline.make_task_dataset('st_mix', **{**SETTINGS, 'seed': stages.stage_seed(7, 1)}))
  assert_batches_equal(got[4:8], read(mix, 4))
  assert all(counts(b)['st_b'] == 0 for b in got[:4])
  assert all(counts(b)['st_b'] > 0 for b in got[4:8])
  assert all(counts(b)['st_c'] > 0 and counts(b)['st_b'] == 0 for b in got[8:])


def test_each_process_switches_at_the_same_step_with_its_slice():
  """Two processes: each reads its own slice of each stage's pipeline and switches at the same
  step (the batch count is the step on every process)."""
  for p in (0, 1):
    where = dict(process_index=p, process_count=2)
    got = read(staged(**where), 6)
    assert_batches_equal(got[:4],
                         read(pipeline.make_task_iterator('st_a', **{**SETTINGS, **where}), 4))
    mix = iter(
        pipeline.make_task_dataset('st_mix',
                                   **{**SETTINGS, **where, 'seed': stages.stage_seed(7, 1)}))
    assert_batches_equal(got[4:], read(mix, 2))


# --- (c) resume, (d) edits on resume ------------------------------------------------------------


def resumed_at(cut, spec=THREE, new_spec=None, n=12):
  """Batches cut..n-1 read after a JSON round trip of the state at `cut` (as a checkpoint has
  it) into a new iterator that, as train.py's does, has already read its first batch."""
  first = staged(spec)
  read(first, cut)
  state = json.loads(json.dumps(first.get_state()))
  second = staged(new_spec or spec)
  next(second)
  second.set_state(state)
  return read(second, n - cut), state


@pytest.mark.parametrize('cut', [3, 4, 5, 8, 9])
def test_resume_around_and_across_boundaries_is_bitwise(cut):
  reference = read(staged(), 12)
  after, state = resumed_at(cut)
  assert_batches_equal(after, reference[cut:])
  assert state['batches'] == cut
  # The started stages (start < cut) each with a position: a stage starting at the cut is not.
  assert [r['start'] for r in state['stages']] == [s for s in (0, 4, 8) if s < cut]


def test_future_stages_may_change_and_take_effect():
  edited = ('0:st_a', '4:st_mix', '9:st_b')  # stage 2 moved and changed: it had not started
  after, _ = resumed_at(6, new_spec=edited)
  reference = read(staged(edited), 12)
  assert_batches_equal(after, reference[6:])
  assert all(c['st_b'] > 0 and c['st_a'] == 0 for c in map(counts, after[3:]))
  # A stage starting exactly at the checkpoint's step has not started either.
  after, _ = resumed_at(8, new_spec=('0:st_a', '4:st_mix', '8:st_b'))
  assert all(counts(b)['st_b'] > 0 and counts(b)['st_a'] == 0 for b in after)


@pytest.mark.parametrize('new_spec, cut, says', [
    (('0:st_a', '4:st_a=1,st_b=1', '8:st_a'), 6, 'stage 1 (4:st_mix) has started'),
    (('0:st_a', '3:st_mix', '8:st_a'), 6, 'this config starts it at 3'),
    (('0:st_a', '4:st_mix', '5:st_b'), 6, 'stage 2 (5:st_b) starts before'),
    (('0:st_a', '4:st_mix'), 9, 'stage 2 (8:st_a=0.5,data.task=0.5) was read'),
    (('0:st_b', '4:st_mix', '8:st_a'), 2, 'stage 0 (0:st_a) has started'),
])
def test_changing_a_started_stage_is_refused_naming_it(new_spec, cut, says):
  with pytest.raises(pipeline.DataStateMismatchError, match='^data.stages: ') as e:
    resumed_at(cut, new_spec=new_spec)
  assert says in str(e.value) and 'data.reset_position' in str(e.value), str(e.value)


def test_a_run_without_stages_goes_on_with_stages_from_its_step():
  """A state written without data.stages is stage 0's at the checkpoint's step (train.py passes
  it): data.task=st_a for 3 steps, then ('0:st_a', '4:st_mix', ...) reads on as data.task did
  and switches at 4. A stage starting before that step, or another stage 0, is refused."""
  plain = pipeline.make_task_iterator('st_a', **SETTINGS)
  read(plain, 3)
  state = json.loads(json.dumps(plain.get_state()))
  it = staged()
  it.set_state(state, 3)
  assert_batches_equal([next(it)], [next(plain)])
  mix = iter(pipeline.make_task_dataset('st_mix', **{**SETTINGS, 'seed': stages.stage_seed(7, 1)}))
  assert_batches_equal(read(it, 2), read(mix, 2))
  with pytest.raises(pipeline.DataStateMismatchError, match='stage 1 .4:st_mix. starts before'):
    staged().set_state(state, 5)
  with pytest.raises(
      pipeline.DataStateMismatchError,
      match=r'stage 0 \(0:st_a \(data.task, written without data.stages\)\) has '
      'started .* changed since: its data: the checkpoint was written reading '
      "task 'st_a'; this config reads task 'st_b'"):
    staged(('0:st_b', '4:st_mix')).set_state(state, 3)
  with pytest.raises(pipeline.DataStateMismatchError, match='written without data.stages'):
    staged().set_state(state)  # no step: no clock for it


def test_staged_states_do_not_fit_an_unstaged_pipeline():
  it = staged()
  next(it)
  with pytest.raises(pipeline.DataStateMismatchError, match='not an iterator state'):
    pipeline.make_task_iterator('st_a', **SETTINGS).set_state(it.get_state())


def test_reset_position_starts_the_stage_of_the_step_afresh():
  it = staged()
  it.start_at(6)  # what train.resume_data does with data.reset_position=True
  mix = iter(pipeline.make_task_dataset('st_mix', **{**SETTINGS, 'seed': stages.stage_seed(7, 1)}))
  assert_batches_equal(read(it, 2), read(mix, 2))  # steps 7, 8: stage 1 from its start
  assert counts(next(it))['st_c'] > 0  # step 9: stage 2
  assert [r['position'] is None for r in it.get_state()['stages']] == [True, False, False]


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize('value, says', [
    (('5:st_a',), 'the first stage must start at 0'),
    (('0:st_a', '4:st_b', '4:st_c'), 'strictly increase'),
    (('0:st_a', 'x:st_b'), 'START (a step number >= 0)'),
    (('0:st_a', '4:st_a,st_b'), 'several names need rates'),
    (('0:st_a', '4:st_a=0.5,st_b=-1'), "'st_b=-1' is not name=rate"),
    (('0:st_a', '4:st_a=1,st_a=2'), 'named twice'),
    (('0:st_a', '4:st_mxi'), "no task or mixture named 'st_mxi'. Did you mean: st_mix"),
    (('0:st_a', '4:st_a=1,st_bb=1'), "config.data.stages[1]='4:st_a=1,st_bb=1'"),
])
def test_bad_stages_are_config_errors_before_any_compute(value, says):
  c = config_lib.base_config()
  c.data.stages = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, num_devices=1)
  assert says in str(e.value), str(e.value)


def test_stages_from_the_command_line():
  c = config_lib.base_config()
  config_files.set_override(c, 'data.stages', "('0:st_a','4:data.task=0.3,st_b=0.7')")
  assert c.data.stages == ('0:st_a', '4:data.task=0.3,st_b=0.7')
  config_lib.validate(c, num_devices=1)
  with pytest.raises(config_lib.ConfigError, match='expected tuple'):
    config_files.set_override(c, 'data.stages', '0:st_a')  # a bare string: not a tuple
  resolved = stages.resolve(c.data.stages, c.data.task)
  assert [(t.name, w) for t, w in resolved[1].target.leaf_rates()] == [(c.data.task,
                                                                        pytest.approx(0.3)),
                                                                       ('st_b', pytest.approx(0.7))]


# --- (e) kill -9 of a training run around a boundary -------------------------------------------

# Quickstart shortened further: one layer each side, no validation (test_checkpoints' FAST too).
RUN = ("--config.data.stages=('0:embedded_span_corruption',"
       "'3:embedded_span_corruption=0.5,embedded_prefix_lm=0.5')", '--config.eval.every_steps=0',
       '--config.model.num_encoder_layers=1', '--config.model.num_decoder_layers=1')


def kill_9_after(workdir, steps, every, step, *extra):
  """Starts training and kills it (SIGKILL) once it has logged `step` and saved checkpoint
  `step - 1` (test_checkpoints' idiom, with overrides)."""
  proc = subprocess.Popen(train_command(workdir, steps, every, *extra), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=ENV)
  deadline, lines = time.time() + 240, []
  for line in proc.stdout:
    lines.append(line)
    match = re.search(r'(?:^|\s)step (\d+) \|', line)
    if (match and int(match.group(1)) >= step
        and os.path.isdir(workdir / 'checkpoints' / str(step - 1))) or time.time() > deadline:
      break
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL, ''.join(lines)[-2000:]


def test_kill_9_around_a_boundary_resumes_bitwise(tmp_path):
  """Killed after step 3 (the last step of stage 0), resumed from checkpoint 2 or 3 (across the
  boundary): the same params, bit for bit, as a run never killed; both stages in the data
  position."""
  reference = tmp_path / 'reference'
  result = run_train(reference, 8, 8, *RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  workdir = tmp_path / 'w'
  keep_all = '--config.checkpoint.keep=0'
  kill_9_after(workdir, 8, 1, 3, *RUN, keep_all)  # 5 steps before its end
  # The killed run may have saved a step or two past the boundary before the signal landed:
  # those are removed, so the resume starts at the boundary (3) or before it (2) and crosses it.
  for step in checkpoints.complete_steps(str(workdir / 'checkpoints')):
    if step > 3:
      shutil.rmtree(workdir / 'checkpoints' / str(step))
  result = run_train(workdir, 8, 1, *RUN, keep_all)
  assert result.returncode == 0, result.stderr[-3000:]
  restart = int(re.search(r'resumed from the checkpoint of step (\d+)', result.stdout).group(1))
  assert restart in (2, 3), restart
  step_ref, params_ref = checkpoints.restore_as_numpy(str(reference))
  step_new, params_new = checkpoints.restore_as_numpy(str(workdir))
  assert step_ref == step_new == 8
  assert_trees_equal(params_new, params_ref)  # params, optimizer state and step
  data = json.loads((workdir / 'checkpoints' / '8' / 'data' / 'process_0-of-1.json').read_text())
  assert data['batches'] == 8 and [r['start'] for r in data['stages']] == [0, 3]


def run_config(**data):
  """A resolved config whose data is the tiny tasks (byte vocabulary: nothing to train)."""
  c = config_lib.base_config()
  c.data.update(vocabulary='byte', inputs_length=8, targets_length=4, task='st_c', **data)
  c.model.vocab_size = 384
  c.train.batch_size = 10
  c.train.seed = 7
  c.eval.every_steps = 0
  from t5lite.data import file_tasks  # pylint: disable=import-outside-toplevel
  c = file_tasks.apply(c)
  config_lib.validate(c, num_devices=1)
  return config_lib.resolve(c)


def test_train_resume_data_gives_the_step_and_resets_on_purpose():
  """train.resume_data: a state written without stages resumes with the checkpoint's step as the
  clock; with data.reset_position a refused resume reads the stage of that step afresh."""
  from t5lite import train  # pylint: disable=import-outside-toplevel  (the job's data wiring)
  plain_cfg = run_config()
  plain = train.build_data(plain_cfg, 0, 1)[0]
  read(plain, 3)
  state = json.loads(json.dumps(plain.get_state()))
  cfg = run_config(stages=('0:data.task', '4:st_a'))
  resumed = train.resume_data(train.build_data(cfg, 0, 1)[0], state, cfg, 3)
  assert_batches_equal([next(resumed)], [next(plain)])
  assert counts(next(resumed))['st_a'] > 0  # step 5: stage 1
  changed = run_config(stages=('0:data.task', '2:st_a'))
  with pytest.raises(pipeline.DataStateMismatchError, match='stage 1 .2:st_a. starts before'):
    train.resume_data(train.build_data(changed, 0, 1)[0], state, changed, 3)
  reset = run_config(stages=('0:data.task', '2:st_a'), reset_position=True)
  fresh = train.resume_data(train.build_data(reset, 0, 1)[0], state, reset, 3)
  stage_1 = iter(
      pipeline.make_task_dataset('st_a', **{**SETTINGS, 'seed': stages.stage_seed(7, 1)},
                                 vocabulary=train.build_data(reset, 0, 1)[1]))
  assert fresh.batches == 3 and fresh.stage.index == 1
  assert_batches_equal(read(fresh, 2), read(stage_1, 2))


def test_stages_with_data_source_read_its_task_as_data_task(tmp_path):
  """data.source registers its task and points data.task at it: `data.task` in a stage is that
  task, read exactly as the unstaged run reads it until the next stage starts."""
  from t5lite import train  # pylint: disable=import-outside-toplevel  (the job's data builder)
  from t5lite.data import file_tasks  # pylint: disable=import-outside-toplevel
  rows = [{'q': f'question {i} ' + 'x' * (i % 7), 'a': f'answer {i}'} for i in range(30)]
  (tmp_path / 'train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))

  def built(stages_value):
    c = config_lib.base_config()
    c.data.update(source=f'jsonl:{tmp_path}/train.jsonl', source_fields='inputs=q,targets=a',
                  vocabulary='byte', inputs_length=32, targets_length=16, stages=stages_value)
    c.model.vocab_size = 384
    c.train.batch_size = 4
    c.eval.every_steps = 0
    c = file_tasks.apply(c)
    config_lib.validate(c, num_devices=1)
    return train.build_data(config_lib.resolve(c), 0, 1)[0]

  plain = read(built(()), 3)
  got = read(built(('0:data.task', '2:st_a')), 3)
  assert_batches_equal(got[:2], plain[:2])
  assert counts(got[2])['st_a'] > 0 and counts(plain[2])['st_a'] == 0
