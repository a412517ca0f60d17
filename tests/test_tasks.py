"""Task/Mixture registry, mixing rates, the general task pipeline, and bad-input errors."""

import ast
import functools
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from t5lite.data import catalog  # registers the built-in tasks, as the jobs do
from t5lite.data import pipeline, preprocessors as P, tasks as T, vocab
from t5lite.data.sources import InMemorySource, JsonlSource


class TinyVocab:
  """Stand-in vocabulary: a word is its length + 10 (no SentencePiece needed)."""
  vocab_size, extra_ids, eos_id, path = 512, 100, 1, 'tiny'

  def encode(self, text):
    return [len(w) + 10 for w in text.split()]


FEATS = {'inputs': T.Feature(TinyVocab()), 'targets': T.Feature(TinyVocab())}


@pytest.fixture
def registry():
  made = []

  def add(name, source, steps, **kw):
    made.append(name)
    return T.add_task(name, source, steps, kw.pop('features', FEATS), overwrite=True, **kw)

  def mix(name, comps, **kw):
    made.append(name)
    return T.add_mixture(name, comps, overwrite=True, **kw)

  add.mix = mix
  yield add
  for name in made:
    T.remove(name)


def tagged(tag, n):
  """n examples whose inputs carry the tag and an index: [tag, 3 + i % 50]."""
  return InMemorySource({
      'train':
          [{'inputs': np.array([tag, 3 + i % 50]), 'targets': np.array([tag])} for i in range(n)]
  })


def it(name, batch=10, **kw):
  kw.setdefault('process_index', 0)
  kw.setdefault('process_count', 1)
  return pipeline.make_task_iterator(name, feature_lengths={'inputs': 8, 'targets': 4},
                                     global_batch_size=batch, seed=kw.pop('seed', 0), **kw)


def test_unknown_name_lists_closest():
  with pytest.raises(T.UnknownNameError, match='Did you mean: embedded_span_corruption'):
    T.get('embeded_span_corruption')
  with pytest.raises(T.UnknownNameError, match="no task or mixture named 'zzzz'"):
    T.get('zzzz')
  assert {'embedded_span_corruption', 'embedded_prefix_lm', 'embedded_ul2'} <= set(T.names())
  assert catalog.get is T.get and 'downstream_mix' in catalog.names()


def test_registry_never_loads_the_catalog():
  # The registry and the pipeline leave the catalog alone; an unknown name then says how to
  # register the built-in tasks (looked up in sys.modules, never imported).
  code = ('import sys\n'
          'from t5lite.data import converters, pipeline, preprocessors, sources, tasks, vocab\n'
          "assert 't5lite.data.catalog' not in sys.modules, sorted(sys.modules)\n"
          'try:\n'
          "  tasks.get('embedded_span_corruption')\n"
          'except tasks.UnknownNameError as e:\n'
          '  print(e)\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       check=True).stdout
  assert 'import t5lite.data.catalog to register the built-in tasks' in out
  with pytest.raises(T.UnknownNameError) as e:  # here the catalog is imported: no such hint
    T.get('zzzz')
  assert 't5lite.data.catalog' not in str(e.value)


def _data_imports() -> dict[str, set[str]]:
  """t5lite.data module -> the t5lite.data modules it imports, at any level (ast)."""
  root = pathlib.Path(T.__file__).parent
  modules = {}
  for path in root.rglob('*.py'):
    parts = path.relative_to(root.parent.parent).with_suffix('').parts
    modules['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  graph = {}
  for name, path in modules.items():
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          base = '.'.join(
              package.split('.')[:len(package.split('.')) - node.level + 1]
              + ([base] if base else []))
        targets = [base] + [f'{base}.{a.name}' for a in node.names]
      else:
        continue
      found |= {t for t in targets if t in modules and t != name}
    graph[name] = found
  return graph


def test_data_package_has_no_import_cycle_and_only_the_catalog_imports_it():
  graph = _data_imports()
  assert 't5lite.data.catalog.downstream' in graph and 't5lite.data.tasks' in graph
  for name, deps in graph.items():
    if not name.startswith('t5lite.data.catalog') and name not in (
        't5lite.data.inspect', 't5lite.data.train_vocab'):  # the data tools are entry points
      assert not {d for d in deps if d.startswith('t5lite.data.catalog')}, name
  state = {}

  def visit(name, path):
    state[name] = 'open'
    for dep in sorted(graph[name]):
      if state.get(dep) == 'open':
        raise AssertionError(f'import cycle: {" -> ".join(path + [dep])}')
      if dep not in state:
        visit(dep, path + [dep])
    state[name] = 'done'

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])


def test_rank_options_are_carried_by_the_task():
  assert T.get_task('docstring_kind').rank_options == ('reference', 'library')
  assert T.get_task('docstring_module').rank_options is None


def test_duplicate_registration_is_an_error(registry):
  registry('dup_task', tagged(5, 3), [])
  with pytest.raises(ValueError, match='already registered'):
    T.add_task('dup_task', tagged(5, 3), [], FEATS)


def test_rates_fixed_proportional_temperature_nested(registry):
  registry('t_a', tagged(5, 100), [])
  registry('t_b', tagged(6, 400), [])
  registry('t_c', tagged(7, 900), [])
  fixed = registry.mix('m_fixed', [('t_a', 1.0), ('t_b', 3.0)])
  assert [(t.name, round(w, 6)) for t, w in fixed.leaf_rates()] == [('t_a', 0.25), ('t_b', 0.75)]
  prop = registry.mix('m_prop', ['t_a', 't_b'], default_rate=T.rate_num_examples())
  assert [round(w, 6) for _, w in prop.leaf_rates()] == [0.2, 0.8]  # 100 : 400
  temp = registry.mix('m_temp', ['t_a', 't_c'], default_rate=T.rate_num_examples(temperature=2))
  assert [round(w, 6) for _, w in temp.leaf_rates()] == [0.25, 0.75]  # sqrt: 10 : 30
  capped = registry.mix('m_cap', ['t_a', 't_c'], default_rate=T.rate_num_examples(maximum=100))
  assert [round(w, 6) for _, w in capped.leaf_rates()] == [0.5, 0.5]
  nested = registry.mix('m_nested', [('m_fixed', 1.0), ('t_c', 1.0)])
  assert {t.name: round(w, 6) for t, w in nested.leaf_rates()
         } == {'t_a': 0.125, 't_b': 0.375, 't_c': 0.5}


def test_mixture_sampling_frequencies(registry):
  registry('f_a', tagged(5, 37), [])
  registry('f_b', tagged(6, 50), [])
  registry('f_c', tagged(7, 11), [])
  registry.mix('f_mix', [('f_a', 0.5), ('f_b', 0.3), ('f_c', 0.2)])
  counts = {5: 0, 6: 0, 7: 0}
  b_iter = it('f_mix', batch=100, pack=False)
  for _ in range(100):  # 10,000 examples
    tags = next(b_iter)['encoder_input_tokens'][:, 0]
    for t in tags:
      counts[int(t)] += 1
  total = sum(counts.values())
  assert total == 10_000
  for tag, rate in ((5, 0.5), (6, 0.3), (7, 0.2)):
    assert abs(counts[tag] / total - rate) < 0.02


def test_determinism_and_resume_for_a_mixture(registry):
  registry('r_a', tagged(5, 30), [])
  registry('r_b', tagged(6, 20), [])
  registry.mix('r_mix', [('r_a', 2.0), ('r_b', 1.0)])

  def take(i, n):
    return [next(i) for _ in range(n)]
  a, b, c = take(it('r_mix', batch=4), 6), take(it('r_mix', batch=4), 6), \
      take(it('r_mix', batch=4, seed=1), 6)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x['encoder_input_tokens'], y['encoder_input_tokens'])
             for x, y in zip(a, c))
  i1 = it('r_mix', batch=4)
  take(i1, 3)
  state = i1.get_state()
  want = take(i1, 4)
  i2 = it('r_mix', batch=4)
  i2.set_state(state)
  for x, y in zip(take(i2, 4), want):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_eval_pass_is_ordered_and_two_shards_partition(registry):
  registry(
      'e_task',
      InMemorySource({
          'train': [
              {'inputs': np.array([3 + i]), 'targets': np.array([3 + i, 3 + i])} for i in range(23)
          ]
      }), [])

  def collect(**kw):
    seen = []
    for b in it('e_task', batch=4, pack=True, shuffle=False, repeat=False, **kw):
      toks, seg = b['encoder_input_tokens'], b['encoder_segment_ids']
      seen += [int(t) for t, s in zip(toks.ravel(), seg.ravel()) if s]  # EOS excluded below
    return [t for t in seen if t != 1]

  full = collect()
  assert full == [3 + i for i in range(23)]  # one ordered pass, nothing lost or repeated
  p0 = collect(process_index=0, process_count=2)
  p1 = collect(process_index=1, process_count=2)
  assert not set(p0) & set(p1) and sorted(p0 + p1) == full


def test_embedded_fill_ratio_at_t5_shapes():
  i = pipeline.make_task_iterator('embedded_span_corruption',
                                  feature_lengths={'inputs': 512, 'targets': 114},
                                  global_batch_size=8, seed=0, process_index=0, process_count=1)
  for _ in range(5):
    next(i)
  fill = i.stats.fill_ratio()
  assert fill['encoder_input_tokens'] >= 0.9 and fill['decoder_target_tokens'] >= 0.9


def test_jsonl_custom_task_and_bad_examples(registry, tmp_path):
  (tmp_path / 'qa.jsonl').write_text('\n'.join(
      json.dumps(r) for r in [
          {'question': 'what is two', 'answer': 'four'},
          {'question': 'no answer here'},
          {'question': 'empty', 'answer': ''},
      ]) + '\n')
  steps = [
      functools.partial(P.rekey, key_map={'inputs': 'question', 'targets': 'answer'}), P.tokenize
  ]
  task = registry('qa', JsonlSource({'train': str(tmp_path / 'qa.jsonl')}), steps)
  ex = task.examples('train')
  ctx = task.context({'inputs': 8, 'targets': 4})
  out = task.process(ex[0], ctx)
  assert out['inputs'].tolist() == [14, 12, 13, 1] and out['targets'].tolist() == [14, 1]
  with pytest.raises(P.InvalidExampleError, match="task 'qa'.*no feature 'answer'"):
    task.process(ex[1], ctx)
  with pytest.raises(P.InvalidExampleError, match="task 'qa'.*'targets' is empty"):
    task.process(ex[2], ctx)
  dropping = registry('qa_drop', JsonlSource({'train': str(tmp_path / 'qa.jsonl')}), steps,
                      drop_invalid=True)
  before = T.dropped_counts().get('qa_drop', 0)
  batch = next(it('qa_drop', batch=4, pack=False, shuffle=False, repeat=False))
  assert (batch['encoder_input_tokens'][:, 0] != 0).sum() == 1  # only the valid example
  assert T.dropped_counts()['qa_drop'] - before == 2


def test_missing_vocabulary_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    vocab.SentencePieceVocabulary(str(tmp_path / 'missing.model'))


def test_converter_needs_lengths(registry):
  registry('l_task', tagged(5, 3), [])
  with pytest.raises(ValueError, match="needs feature lengths.*missing \\['targets'\\]"):
    pipeline.make_task_iterator('l_task', feature_lengths={'inputs': 8}, global_batch_size=2,
                                seed=0, process_index=0, process_count=1)
