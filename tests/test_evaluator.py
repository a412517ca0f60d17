"""The metric evaluator against per-example loops that call decode() / scoring directly.

Tiny float32 encoder-decoder, random init, the embedded vocabulary; two in-memory tasks whose
validation splits (13 and 11 examples) are not multiples of the batch size (8), evaluated on a
2x2x2 (data, fsdp, tensor) mesh of the 8 simulated CPU devices.
"""
import json
import os

import jax
import numpy as np
import flax.linen as nn
import pytest

from t5lite import config as config_lib
from t5lite import config_files
from t5lite import metrics, partitioning, trainer
from t5lite.data import tasks, vocab as vocab_lib
from t5lite.data import preprocessors as P
from t5lite.data.catalog import downstream
from t5lite.data.sources import InMemorySource
from t5lite.evaluation import evaluator as evaluator_lib
from t5lite.evaluation import scoring
from t5lite.models import decoding
from t5lite.models.presets import ModelConfig
from t5lite.models.t5 import make_model

INPUTS, TARGETS, BATCH = 24, 8, 8
WORDS = ('the value of the key', 'return a new list', 'raise an error', 'open the file for reading',
         'a class definition', 'the default encoding', 'parse the string')


def mean_log_likelihood(targets, scores):
  """A score metric without rank options: gets each example's target log-likelihood."""
  return {'mean_log_likelihood': float(np.mean(scores))}


def lower(text, example=None, is_target=False):
  del example, is_target
  return text.strip().lower()


def _register():
  rng = np.random.default_rng(0)
  gen = [{'inputs': f'copy: {WORDS[i % 7]} {i}', 'targets': WORDS[(i * 3) % 7].title()}
         for i in range(13)]
  cls = [{'inputs': f'is it long: {WORDS[i % 7]}', 'targets': ['yes', 'no'][rng.integers(2)]}
         for i in range(11)]
  f = tasks.Feature(vocab_lib.embedded_vocabulary)
  features = {'inputs': f, 'targets': f}
  tasks.add_task('evtest_gen', InMemorySource({'train': gen, 'validation': gen}), [P.tokenize],
                 features, postprocess_fn=lower,
                 metric_fns=['accuracy', metrics.sequence_accuracy,
                             mean_log_likelihood], overwrite=True)
  task = tasks.add_task('evtest_cls', InMemorySource({'train': cls,
                                                      'validation': cls}), [P.tokenize], features,
                        metric_fns=['accuracy', downstream.rank_accuracy], overwrite=True)
  task.rank_options = ('yes', 'no')


@pytest.fixture(scope='module')
def setup():
  _register()
  c = config_lib.base_config()
  c.model.vocab_size = 2048
  c.model.dtype = 'float32'
  c.data.update(inputs_length=INPUTS, targets_length=TARGETS)
  c.train.batch_size = BATCH
  c.eval.update(tasks=('evtest_gen', 'evtest_cls'), batch_size=BATCH, num_examples_to_save=3)
  c.decode.max_decode_length = 6
  c.mesh.update(data=2, fsdp=2, tensor=2)
  shape = config_lib.validate(c, 8)
  mesh = partitioning.make_mesh(shape)
  model = make_model(ModelConfig.from_config(c.model))
  example = {
      'encoder_input_tokens': np.ones((BATCH, INPUTS), np.int32), 'decoder_input_tokens': np.ones(
          (BATCH, TARGETS), np.int32)
  }
  params = nn.meta.unbox(jax.jit(lambda k: model.init(k, **example))(jax.random.PRNGKey(3)))
  params = params['params']
  with partitioning.activate(mesh, c.partitioning.rules):
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **example))['params']
    shardings = partitioning.logical_shardings(boxed, mesh, c.partitioning.rules)
  sharded = jax.device_put(params, shardings)  # on the mesh, as the train state's are
  return c, mesh, model, params, sharded


def split_examples(name, lengths=None):
  """Token ids of each validation example as the task makes them (EOS appended; trimmed to
  `lengths` when given)."""
  task = tasks.get_task(name)
  return [
      task.process(ex, task.context(lengths, np.random.default_rng(0)))
      for ex in task.examples('validation')
  ]


def test_each_example_once_and_metrics_equal_a_per_example_loop(setup, tmp_path):
  c, mesh, model, params, sharded = setup
  ev = evaluator_lib.Evaluator(c, model, mesh, c.partitioning.rules, workdir=str(tmp_path),
                               verbose=False)
  results = ev.evaluate(sharded, step=7)
  ev.close()
  vocab = vocab_lib.embedded_vocabulary()
  cfg = evaluator_lib.decode_config(c, TARGETS)

  # Generation: every example decoded alone (row 0 of a zero batch, no mesh) with decode(),
  # whole: the evaluator reads the task at its own lengths, not data.*_length.
  gen = results['evtest_gen']
  examples = split_examples('evtest_gen')
  assert gen.num_examples == len(examples) == 13
  assert max(len(ex['targets']) for ex in examples) > TARGETS  # longer than training's
  inputs_length, targets_length = gen.lengths['inputs'], gen.lengths['targets']
  predictions, targets, log_likelihoods = [], [], []
  for ex in examples:
    rows = np.zeros((BATCH, inputs_length), np.int32)
    rows[0, :len(ex['inputs'])] = ex['inputs']
    tokens = np.asarray(
        decoding.decode(model, params, {'encoder_input_tokens': rows}, cfg,
                        jax.random.PRNGKey(0)).tokens)[0]
    predictions.append(lower(vocab.decode(tokens)))
    targets.append(lower(vocab.decode(ex['targets'])))
    batch = {
        'encoder_input_tokens': rows[:1], 'decoder_target_tokens': np.zeros((1, targets_length),
                                                                            np.int32)
    }
    batch['decoder_target_tokens'][0, :len(ex['targets'])] = ex['targets']
    batch['decoder_input_tokens'] = np.roll(batch['decoder_target_tokens'], 1, axis=1)
    batch['decoder_input_tokens'][:, 0] = 0
    batch['decoder_loss_weights'] = (batch['decoder_target_tokens'] > 0).astype(np.int32)
    log_likelihoods.append(float(scoring.score_batch(model, params, batch)[0]))
  assert gen.targets == targets
  assert gen.predictions == predictions
  np.testing.assert_allclose(gen.scores, log_likelihoods, rtol=1e-4)
  expected = {
      **metrics.accuracy(targets, predictions), **metrics.sequence_accuracy(targets, predictions),
      'mean_log_likelihood': float(np.mean(log_likelihoods))
  }
  assert gen.metrics.keys() == expected.keys()
  for k in expected:
    np.testing.assert_allclose(gen.metrics[k], expected[k], rtol=1e-4)

  # Rank classification: the same scores as scoring.rank_classification on the whole split.
  cls = results['evtest_cls']
  examples = split_examples('evtest_cls')
  assert cls.num_examples == 11
  ranked = scoring.rank_classification(model, params, [ex['inputs'][:-1] for ex in examples],
                                       [('yes', 'no')] * 11, vocab, inputs_length=INPUTS,
                                       targets_length=TARGETS, batch_size=BATCH)
  np.testing.assert_allclose(np.asarray(cls.scores), np.stack(ranked.scores), rtol=1e-4)
  labels = [['yes', 'no'].index(vocab.decode(ex['targets'])) for ex in examples]
  assert cls.metrics['rank_accuracy'] == metrics.rank_accuracy(labels, ranked.scores)['accuracy']
  assert cls.metrics['accuracy'] == metrics.accuracy(cls.targets, cls.predictions)['accuracy']

  # step_7.json per task, with the metrics and the first examples; TensorBoard events.
  record = json.load(open(tmp_path / 'eval' / 'evtest_gen' / 'step_7.json'))
  assert record['metrics'] == gen.metrics and record['num_examples'] == 13
  assert [e['prediction'] for e in record['examples']] == predictions[:3]
  assert record['examples'][0]['input'] == vocab.decode(split_examples('evtest_gen')[0]['inputs'])
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(tmp_path / 'eval'))


def test_max_batches_and_the_training_hook(setup, tmp_path):
  """eval.max_batches=1 reads one batch (8 examples); the hook flattens to eval/<task>/<metric>
  and writes the same files."""
  c, mesh, model, _, sharded = setup
  c = c.copy_and_resolve_references()
  c.eval.update(max_batches=1, tasks=('evtest_gen',))
  c.reporting.tensorboard = False
  hook = evaluator_lib.build_metric_evaluation(c, model, mesh, c.partitioning.rules, str(tmp_path))
  values = hook(sharded, 3)
  hook.close()
  record = json.load(open(tmp_path / 'eval' / 'evtest_gen' / 'step_3.json'))
  assert record['num_examples'] == 8
  assert values == {f'eval/evtest_gen/{k}': v for k, v in record['metrics'].items()}
  c.eval.tasks = ()
  assert evaluator_lib.build_metric_evaluation(c, model, mesh, c.partitioning.rules, '') is None


def test_each_task_at_its_own_lengths_with_caps_and_a_truncation_count(setup, tmp_path):
  """A task is evaluated at its split's longest example (EOS included, rounded up to 8) whatever
  data.inputs_length is; eval.max_*_length caps it and the examples over a cap are counted."""
  c, mesh, model, _, sharded = setup
  vocab = vocab_lib.embedded_vocabulary()
  gen = tasks.get_task('evtest_gen').source.get('validation')
  in_sizes = [len(vocab.encode(e['inputs'])) + 1 for e in gen]  # + EOS
  out_sizes = [len(vocab.encode(e['targets'])) + 1 for e in gen]
  round8 = lambda n: (n + 7) // 8 * 8
  found = evaluator_lib.task_lengths(tasks.get_task('evtest_gen'), 'validation', (1024, 512))
  assert (found.inputs, found.targets) == (round8(max(in_sizes)), round8(max(out_sizes)))
  assert found.truncated == 0 and found.longest_inputs == max(in_sizes)
  first = evaluator_lib.task_lengths(tasks.get_task('evtest_gen'), 'validation', (1024, 512),
                                     limit=5)  # eval.max_batches: only what is evaluated
  assert (first.longest_inputs, first.longest_targets) == (max(in_sizes[:5]), max(out_sizes[:5]))

  # A task whose steps cut examples to the lengths (span corruption over chunks) has none of its
  # own: it is evaluated at the training lengths given, capped.
  span = tasks.get_task('embedded_span_corruption')
  with pytest.raises(P.NeedsLengthsError):
    evaluator_lib.task_lengths(span, 'validation', (1024, 512))
  assert evaluator_lib.task_lengths(span, 'validation', (1024, 16), sized_by=(24, 24)) == \
      evaluator_lib.TaskLengths(24, 16, 24, 16, 0)

  cap_in, cap_out = sorted(in_sizes)[len(in_sizes) // 2], min(out_sizes)
  over = sum(i > cap_in or t > cap_out for i, t in zip(in_sizes, out_sizes))
  assert 0 < over < len(gen)  # the caps cut some examples, not all
  capped = c.copy_and_resolve_references()
  capped.data.update(inputs_length=64, targets_length=64)  # the training lengths play no part
  capped.eval.update(tasks=('evtest_gen',), max_inputs_length=cap_in, max_targets_length=cap_out)
  capped.reporting.tensorboard = False
  ev = evaluator_lib.Evaluator(capped, model, mesh, c.partitioning.rules, workdir=str(tmp_path),
                               verbose=False)
  result = ev.evaluate(sharded, step=1)['evtest_gen']
  assert result.lengths == {'inputs': cap_in, 'targets': cap_out}
  assert result.truncated_examples == over and result.num_examples == len(gen)
  record = json.load(open(tmp_path / 'eval' / 'evtest_gen' / 'step_1.json'))
  assert record['truncated_examples'] == over and record['lengths'] == result.lengths
  assert f'{over} truncated' in evaluator_lib.format_table(1, {'evtest_gen': result})
  # Truncated targets keep their EOS: the scored target is the capped one.
  assert all(len(vocab.encode(t)) + 1 <= cap_out for t in result.targets)


def test_length_normalized_rank_classification(setup, tmp_path):
  """eval.length_normalize ranks by the mean log-likelihood per option token: the scores of
  scoring.rank_classification(length_normalize=True)."""
  c, mesh, model, params, sharded = setup
  c = c.copy_and_resolve_references()
  c.eval.update(tasks=('evtest_cls',), length_normalize=True)
  c.reporting.tensorboard = False
  ev = evaluator_lib.Evaluator(c, model, mesh, c.partitioning.rules, verbose=False)
  cls = ev.evaluate(sharded, step=2)['evtest_cls']
  examples = split_examples('evtest_cls')
  ranked = scoring.rank_classification(model, params,
                                       [ex['inputs'][:-1] for ex in examples], [('yes', 'no')] * 11,
                                       vocab_lib.embedded_vocabulary(), inputs_length=INPUTS,
                                       targets_length=TARGETS, batch_size=BATCH,
                                       length_normalize=True)
  np.testing.assert_allclose(np.asarray(cls.scores), np.stack(ranked.scores), rtol=1e-4)
  assert not np.allclose(ranked.scores, np.stack(ranked.log_likelihoods))  # a real division


def test_config_checks():
  c = config_lib.base_config()
  for key, value, message in [('eval.tasks', "('fill_wrd',)", "config.eval.tasks='fill_wrd'"),
                              ('decode.method', 'beams', "did you mean 'beam'"),
                              ('infer.on_too_long', 'cut', 'infer.on_too_long')]:
    bad = c.copy_and_resolve_references()
    config_files.set_override(bad, key, value)
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(bad, 8)


def majority_accuracies(train_targets, validation_targets):
  """100 x the share of validation targets equal to the most frequent training target, for each
  target tied for most frequent (numpy, not the Counter that `baselines` uses)."""
  labels, counts = np.unique(np.asarray(train_targets), return_counts=True)
  validation = np.asarray(validation_targets)
  return [100.0 * float(np.mean(validation == label)) for label in labels[counts == counts.max()]]


def test_downstream_tasks_and_baselines():
  """The tasks register with train/validation splits, postprocess and metrics; validation never
  repeats a training input; the trivial baselines are those recomputed here from the tasks'
  examples (the corpus is the running Python's docstrings, so no count is pinned); the blank of
  fill_word is the sentinel id."""
  kind = downstream.docstring_kind_examples('validation')
  assert {e['targets'] for e in kind} == set(downstream.LABELS)
  references = sum(e['targets'] == 'reference' for e in kind)
  # Balanced, at most KIND_MAX_VALIDATION_PER_CLASS of each, and enough to mean something.
  assert references * 2 == len(kind) and 100 <= len(kind) <= 2 * 250
  splits = {}
  for name, make in (('docstring_kind', downstream.docstring_kind_examples),
                     ('docstring_module', downstream.docstring_module_examples),
                     ('fill_word', downstream.fill_word_examples)):
    splits[name] = {split: make(split) for split in ('train', 'validation')}
    train = {e['inputs'] for e in splits[name]['train']}
    assert not any(e['inputs'] in train for e in splits[name]['validation']), name
    task = tasks.get_task(name)
    assert task.splits == ('train', 'validation') and task.postprocess_fn and task.metric_fns
  b = downstream.baselines()
  assert b['docstring_kind/majority'] == {'accuracy': 50.0, 'macro_f1': pytest.approx(100 / 3)}
  targets = lambda name, split: [e['targets'] for e in splits[name][split]]
  for name, key in (('docstring_module', 'docstring_module/majority'),
                    ('fill_word', 'fill_word/most_frequent_word')):
    expected = majority_accuracies(targets(name, 'train'), targets(name, 'validation'))
    assert any(b[key]['accuracy'] == pytest.approx(x, abs=1e-9) for x in expected), name
    assert 0 < b[key]['accuracy'] < 50, name  # a real baseline: neither zero nor the answer
  copies = [e['inputs'] for e in splits['fill_word']['validation']]
  assert b['fill_word/copy_input']['accuracy'] == pytest.approx(
      100.0 * float(np.mean(np.asarray(copies) == np.asarray(targets('fill_word', 'validation')))),
      abs=1e-9)
  vocab = vocab_lib.embedded_vocabulary()
  ids = downstream.encode_with_sentinels(vocab, 'a <extra_id_0> b<extra_id_1>')
  assert ids.count(vocab.sentinel_id(0)) == 1 and ids[-1] == vocab.sentinel_id(1)
  assert downstream.first_span('<extra_id_0> the<extra_id_1> of') == 'the'
  # An invalid answer is wrong but adds no class to docstring_kind's macro F1: F1 1 for
  # 'reference', 0 for 'library' -> 50 (with 'junk' as a third class it would be 33.3).
  macro = tasks.get_task('docstring_kind').metric_fns[1]
  assert macro(['reference', 'library'], ['reference', 'junk'])['macro_f1'] == 50.0
