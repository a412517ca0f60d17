"""T5X checkpoints into t5lite (t5lite/t5x.py, init_from=t5x:, t5x-to-t5lite), against what T5X
itself wrote and computed: ../shared/testdata/t5x (its README describes the files; never edited).
Parity: logits within 1e-5 relative where the target is not padding (T5X's padded rows are
artifacts of its -1e10 mask), identical greedy tokens, and T5X's score_batch."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5lite import checkpoints, convert, files, hf, init_from, t5x, train
from t5lite.config import ConfigError, validate
from t5lite.evaluation import scoring
from t5lite.models import decoding, presets
from t5lite.models.t5 import make_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), 'shared', 'testdata', 't5x')
if not os.path.isdir(DATA):  # the shared checkout lives beside the repository
  DATA = '/work/shared/testdata/t5x'
T511 = os.path.join(DATA, 't511_tiny', 'checkpoint_3')
T510 = os.path.join(DATA, 't510_tiny', 'checkpoint_3')
LEGACY = os.path.join(DATA, 't511_tiny_legacy', 'checkpoint_3')
CASES = {
    't511_orbax': ('t511_tiny', T511), 't510_orbax': ('t510_tiny', T510),
    't511_legacy': ('t511_tiny', LEGACY)
}
SHAPE = dict(vocab_size=128, d_model=40, d_ff=56, num_heads=4, head_dim=6, attention_dim=24,
             num_encoder_layers=2, num_decoder_layers=3, relative_attention_num_buckets=32,
             relative_attention_max_distance=128)  # README: both tiny models


def model_of(fields, scan=False):
  cfg = presets.ModelConfig(**{**fields, 'dtype': 'float32', 'kernels': 'xla', 'scan_layers': scan})
  return make_model(cfg)


@pytest.fixture(scope='module', params=sorted(CASES))
def converted(request):
  reference, path = CASES[request.param]
  fields, flat = t5x.load(path)
  return reference, fields, hf.unflatten(flat)


def test_model_config_is_read_from_the_shapes(converted):
  reference, fields, _ = converted
  variant = 'v1_0' if reference == 't510_tiny' else 'v1_1'
  activation = 'relu' if reference == 't510_tiny' else 'gated-gelu'
  assert fields == {
      'variant': variant, 'mlp_activation': activation, 'relpos_per_layer': False, **SHAPE
  }


def test_logits_greedy_and_scores_match_t5x(converted):
  reference, fields, params = converted
  ref = os.path.join(DATA, reference)
  inputs = dict(np.load(os.path.join(ref, 'inputs.npz')))
  model = model_of(fields)
  logits = np.asarray(
      model.apply({'params': params}, inputs['encoder_input_tokens'],
                  inputs['decoder_input_tokens'], inputs['decoder_target_tokens']))
  expected = np.load(os.path.join(ref, 'logits.npy'))
  real = inputs['decoder_target_tokens'] > 0
  assert real.sum() == 7 + 5 + 3
  np.testing.assert_allclose(logits[real], expected[real], rtol=1e-5,
                             atol=1e-5 * np.abs(expected[real]).max())

  greedy = decoding.decode(model, params, {'encoder_input_tokens': inputs['encoder_input_tokens']},
                           decoding.DecodeConfig(method='greedy', max_decode_length=6, eos_id=1))
  np.testing.assert_array_equal(np.asarray(greedy.tokens), np.load(os.path.join(ref, 'greedy.npy')))

  batch = {**inputs, 'decoder_loss_weights': real.astype(np.float32)}
  np.testing.assert_allclose(scoring.score_batch(model, params, batch),
                             np.load(os.path.join(ref, 'score_batch.npy')), rtol=1e-5)


def test_legacy_and_orbax_formats_hold_the_same_arrays():
  orbax, legacy = t5x.Checkpoint(T511), t5x.Checkpoint(LEGACY)
  assert (orbax.format, legacy.format) == ('orbax', 'legacy')
  assert orbax.shapes == legacy.shapes and len(orbax.shapes) == 331  # config.json's tree
  a, b = orbax.read(orbax.shapes), legacy.read(legacy.shapes)
  for name in a:
    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
  assert int(a['state/step']) == 3


def test_layouts_against_the_raw_t5x_arrays():
  ckpt = t5x.Checkpoint(T511)
  raw = ckpt.read([
      'target/encoder/layers_1/attention/query/kernel',
      'target/decoder/layers_2/encoder_decoder_attention/out/kernel',
      'target/decoder/relpos_bias/rel_embedding', 'target/decoder/logits_dense/kernel'
  ])
  flat = t5x.load(T511)[1]
  q = flat['encoder/layers_1/attention/query/kernel']  # [emb, heads, head_dim]
  assert q.shape == (40, 4, 6)
  # head h, dim k is column h*head_dim + k of T5X's joined kernel (head-major)
  assert np.array_equal(q[:, 2, 5], raw['target/encoder/layers_1/attention/query/kernel'][:, 17])
  out = flat['decoder/layers_2/encoder_decoder_attention/out/kernel']
  assert np.array_equal(out[3, 1],
                        raw['target/decoder/layers_2/encoder_decoder_attention/out/kernel'][19])
  assert np.array_equal(flat['decoder/relpos_bias/rel_embedding'],
                        raw['target/decoder/relpos_bias/rel_embedding'].T)
  assert np.array_equal(flat['logits_dense/kernel'], raw['target/decoder/logits_dense/kernel'])
  stacked = t5x.load(T511, scan_layers=True)[1]
  assert np.array_equal(stacked['encoder/layers/attention/query/kernel'][1], q)


def test_activation_override_and_refusals(tmp_path):
  shapes = t5x.Checkpoint(T511).shapes
  assert t5x.model_fields(shapes, 'gated-silu')['mlp_activation'] == 'gated-silu'  # UL2
  with pytest.raises(t5x.T5XError, match='gated MLP'):
    t5x.model_fields(shapes, 'relu')
  with pytest.raises(t5x.T5XError, match='one-matrix MLP'):
    t5x.model_fields(t5x.Checkpoint(T510).shapes, 'gated-gelu')
  with pytest.raises(t5x.T5XError, match='no such directory'):
    t5x.Checkpoint(str(tmp_path / 'nope'))
  with pytest.raises(t5x.T5XError, match='not a T5X checkpoint'):
    t5x.Checkpoint(str(tmp_path))
  # The folder above checkpoint_N: its highest checkpoint.
  assert t5x.Checkpoint(os.path.dirname(T511)).path == T511
  # eval's and infer's --checkpoint take t5x: too (step 0, read by init_from.load_params).
  assert checkpoints.resolve_steps('t5x:' + T511, None) == [(0, 't5x:' + T511)]


def abstract_params(fields, scan=False):
  model = model_of(fields, scan)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(
      (1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32))['params'])
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
      jax.tree.map(lambda x: getattr(x, 'value', x), shapes, is_leaf=lambda x: hasattr(x, 'value')))


def test_init_from_t5x_loads_the_params_or_names_the_mismatch(tmp_path):
  fields = {'variant': 'v1_1', 'mlp_activation': 'gated-gelu', **SHAPE}
  target = abstract_params(fields, scan=True)
  loaded = init_from.load_params_for_init('t5x:' + T511, target)
  expected = hf.unflatten(t5x.load(T511, scan_layers=True)[1])
  for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(expected)):
    assert np.array_equal(np.asarray(x), y), p
  wider = abstract_params({**fields, 'd_ff': 64})
  with pytest.raises(
      checkpoints.CheckpointError,
      match=r'decoder/layers_0/mlp/wo/kernel: checkpoint \(56, 40\) vs model '
      r'\(64, 40\)'):
    init_from.load_params_for_init('t5x:' + T511, wider)
  with pytest.raises(checkpoints.CheckpointError, match='no such directory'):
    init_from.load_params_for_init('t5x:' + str(tmp_path / 'nope'), target)
  with pytest.raises(checkpoints.CheckpointError, match='not a T5X checkpoint'):
    init_from.load_params_for_init('t5x:' + str(tmp_path), target)
  tiny = presets.model_config('tiny').to_dict()
  assert t5x.config_mismatches(T511, {**tiny, **fields}) == []
  assert t5x.config_mismatches(T511, {**tiny, **fields, 'mlp_activation': ''}) == []
  # UL2: the config's gated activation is taken (T5X does not record it).
  assert t5x.config_mismatches(T511, {**tiny, **fields, 'mlp_activation': 'gated-silu'}) == []
  assert t5x.config_mismatches(T511, tiny)[0] == f'model.vocab_size=32128 but {T511} gives 128'
  assert t5x.config_mismatches(T510, {**tiny, **fields}) == [
      f"model.variant='v1_1' but {T510} gives 'v1_0'",
      f"model.mlp_activation='gated-gelu' but {T510} gives 'relu'"
  ]


@pytest.mark.parametrize('min_dim', [128, 32])
def test_adafactor_state_has_optax_structure_and_t5x_values(min_dim):
  fields = {'variant': 'v1_1', 'mlp_activation': 'gated-gelu', **SHAPE}
  params = abstract_params(fields)
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adafactor(lambda step: 0.01, min_dim_size_to_factor=min_dim, momentum=None))
  abstract = jax.eval_shape(tx.init, params)
  state, note = init_from.load_adafactor_for_init('t5x:' + T511, abstract, params)
  assert note == ''  # beta1=None: T5X's m is a placeholder
  assert jax.tree.structure(state) == jax.tree.structure(abstract)
  left = 0  # leaves left for the fresh state: the schedule's count only
  for (p, got), want in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(abstract)):
    assert got.shape == want.shape and got.dtype == want.dtype, p
    left += isinstance(got, jax.ShapeDtypeStruct)
  assert left == 1
  factored = next(
      s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.FactoredState))
      if isinstance(s, optax.FactoredState))
  assert int(factored.count) == 3  # T5X's step: Adafactor's decay continues from it
  schedule = [
      s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
      if isinstance(s, optax.ScaleByScheduleState)
  ]
  assert schedule and all(isinstance(s.count, jax.ShapeDtypeStruct) for s in schedule)  # fresh

  raw = t5x.Checkpoint(T511).read([
      f'state/param_states/{n}/{s}'
      for n in ('encoder/layers_0/mlp/wi_0/kernel', 'decoder/layers_1/self_attention/query/kernel',
                'encoder/relpos_bias/rel_embedding') for s in ('v', 'v_row', 'v_col')
  ])
  stat = lambda n, s: raw[f'state/param_states/{n}/{s}']
  # Unfactored in both: T5X's v in t5lite's layout.
  q = factored.v['decoder']['layers_1']['self_attention']['query']['kernel']
  np.testing.assert_array_equal(
      np.asarray(q),
      stat('decoder/layers_1/self_attention/query/kernel', 'v').reshape(40, 4, 6))
  np.testing.assert_array_equal(np.asarray(factored.v['encoder']['relpos_bias']['rel_embedding']),
                                stat('encoder/relpos_bias/rel_embedding', 'v').T)
  wi = 'encoder/layers_0/mlp/wi_0/kernel'  # [40, 56], factored by T5X (min_dim_size_to_factor 32)
  row, col = stat(wi, 'v_row'), stat(wi, 'v_col')
  assert row.shape == (40,) and col.shape == (56,)
  got = {
      s: np.asarray(getattr(factored, s)['encoder']['layers_0']['mlp']['wi_0']['kernel'])
      for s in ('v', 'v_row', 'v_col')
  }
  if min_dim == 32:  # optax factors it the same way: the statistics as they are
    np.testing.assert_array_equal(got['v_row'], row)
    np.testing.assert_array_equal(got['v_col'], col)
  else:  # optax keeps a full v: the factored estimate Adafactor divides by, v_row/mean * v_col
    np.testing.assert_allclose(got['v'], np.outer(row / row.mean(), col), rtol=1e-6)


def test_adamw_run_takes_no_adafactor_state():
  params = abstract_params({'variant': 'v1_1', 'mlp_activation': 'gated-gelu', **SHAPE})
  abstract = jax.eval_shape(optax.adamw(1e-3).init, params)
  assert init_from.load_adafactor_for_init('t5x:' + T511, abstract, params) == (None, '')


def test_t5x_to_t5lite_cli_writes_a_workdir_that_loads(tmp_path, capsys):
  out = tmp_path / 'converted'
  assert convert.main(['t5x-to-t5lite', '--checkpoint', LEGACY, '--out', str(out)]) == 0
  printed = capsys.readouterr().out
  assert '--config.model.vocab_size=128' in printed and f'init_from={out}' in printed
  assert '--config.model.mlp_activation=gated-gelu' in printed
  saved = json.loads((out / 'model_config.json').read_text())
  assert saved['model']['d_ff'] == 56 and saved['converted_from']['step'] == 3
  step, state = checkpoints.restore_as_numpy(str(out))
  assert step == 0
  expected = t5x.load(T511)[1]
  got = hf.flatten(state['params'])
  assert sorted(got) == sorted(expected)
  for name, x in expected.items():
    assert np.array_equal(got[name], x), name


def _tiny_sentencepiece(tmp_path) -> str:
  """A SentencePiece model of at most 28 pieces (+ 100 sentinels = the models' 128 ids)."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  words = [''.join(rng.choice(list('abcdefgh'), rng.randint(1, 6))) for _ in range(2000)]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([' '.join(words[i:i + 20]) for i in range(0, 2000, 20)]),
      model_prefix=str(tmp_path / 'sp'), vocab_size=28, model_type='unigram', pad_id=0, eos_id=1,
      unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
  return str(tmp_path / 'sp.model')


def quickstart_config():
  spec = importlib.util.spec_from_file_location('quickstart',
                                                os.path.join(REPO, 'configs', 'quickstart.py'))
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  return quickstart.get_config()


def test_config_validation_reads_the_t5x_shapes_before_any_compute(tmp_path):
  c = quickstart_config()
  c.checkpoint.init_from = 't5x:' + T511
  with pytest.raises(
      ConfigError, match=r'model.vocab_size=2048 but .*t511_tiny/checkpoint_3 gives '
      r'128; model.d_model=128 but .* gives 40'):
    validate(c, 1)
  c.model.update(variant='v1_1', size='custom', mlp_activation='gated-silu', **SHAPE)
  # T5X records no vocabulary, but its embedding rows do: the embedded 2048 ids cannot fit 128.
  with pytest.raises(ConfigError, match='has 128 embedding rows and no recorded tokenizer'):
    validate(c, 1)
  c.data.vocabulary = _tiny_sentencepiece(tmp_path)  # 28 pieces + 100 sentinels = 128 ids
  validate(c, 1)  # UL2-like: the config's gated activation is taken
  # T5X has no optimizer statistics for LoRA factors or a soft prompt: with them, carrying its
  # Adafactor state (and its step count) is refused before any compute.
  c.checkpoint.init_from_state = 'params_and_optimizer'
  validate(c, 1)
  c.model.lora_rank = 4
  with pytest.raises(
      ConfigError, match=r'model.lora_rank=4: the T5X checkpoint has no optimizer '
      r"statistics[\s\S]*init_from_state='params'"):
    validate(c, 1)
  c.model.lora_rank = 0
  c.checkpoint.init_from_state = 'params'
  c.checkpoint.init_from = 't5x:' + str(tmp_path)
  with pytest.raises(ConfigError, match='not a T5X checkpoint'):
    validate(c, 1)


def test_finetune_from_t5x_runs_and_starts_from_its_params(tmp_path, capsys):
  c = quickstart_config()
  c.model.update(variant='v1_1', size='custom', dtype='float32', **SHAPE)
  c.data.update(vocabulary=_tiny_sentencepiece(tmp_path), inputs_length=16)
  c.train.update(steps=1, batch_size=8, log_every=1)
  c.schedule.update(name='constant', warmup_steps=100)  # step 1's learning rate is 0
  c.eval.every_steps = 0
  c.reporting.update(tensorboard=False, peak_flops_per_device=1e11)
  # params_and_optimizer: T5X's Adafactor statistics too ('params', the default, takes params only)
  c.checkpoint.update(every_steps=0, async_save=False, init_from='t5x:' + T511,
                      init_from_state='params_and_optimizer')
  workdir = str(tmp_path / 'run')
  train.run(c, workdir)
  out = capsys.readouterr().out
  assert f'initialised params and Adafactor statistics from t5x:{T511}' in out
  step, state = checkpoints.restore_as_numpy(workdir)
  assert step == 1 and int(state['step']) == 1
  # lr 0 at the first step: its checkpoint holds T5X's params bit for bit.
  expected = t5x.load(T511)[1]
  got = hf.flatten(state['params'])
  assert sorted(got) == sorted(expected)
  for name, x in expected.items():
    assert np.array_equal(got[name], x), name
  counts = sorted(int(x) for x in jax.tree.leaves(state['opt_state']) if np.ndim(x) == 0)
  # Adafactor's count went on from T5X's 3; the schedule's (and the run's step) from 0.
  assert counts == [1, 3 + 1], counts


def test_adafactor_state_for_a_scanned_model_stacks_the_layers():
  params = abstract_params({'variant': 'v1_1', 'mlp_activation': 'gated-gelu', **SHAPE}, scan=True)
  tx = optax.adafactor(lambda step: 0.01, min_dim_size_to_factor=32, momentum=None)
  state, _ = init_from.load_adafactor_for_init('t5x:' + T511, jax.eval_shape(tx.init, params),
                                               params)
  factored = next(
      s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.FactoredState))
      if isinstance(s, optax.FactoredState))
  raw = t5x.Checkpoint(T511).read(
      [f'state/param_states/decoder/layers_{i}/self_attention/key/kernel/v' for i in range(3)])
  want = np.stack([x.reshape(40, 4, 6) for _, x in sorted(raw.items())])
  got = factored.v['decoder']['layers']['self_attention']['key']['kernel']  # [3, 40, 4, 6]
  np.testing.assert_array_equal(np.asarray(got), want)
  # [3, 40, 56] is factored by optax over (40, 56): rows and columns are T5X's per layer.
  wi = factored.v_row['encoder']['layers']['mlp']['wi_1']['kernel']
  rows = t5x.Checkpoint(T511).read(
      [f'state/param_states/encoder/layers_{i}/mlp/wi_1/kernel/v_row' for i in range(2)])
  assert wi.shape == (2, 40)
  np.testing.assert_allclose(
      np.asarray(wi) / np.asarray(wi).mean(axis=1, keepdims=True),
      np.stack([r / r.mean() for _, r in sorted(rows.items())]), rtol=1e-5)


def test_t5x_to_t5lite_cli_errors_and_the_activation_override(tmp_path, capsys):
  code = convert.main(
      ['t5x-to-t5lite', '--checkpoint',
       str(tmp_path), '--out',
       str(tmp_path / 'o')])
  err = capsys.readouterr().err
  assert code == 2 and 'not a T5X checkpoint' in err, err
  out = tmp_path / 'ul2_like'
  assert convert.main(
      ['t5x-to-t5lite', '--checkpoint', T511, '--out',
       str(out), '--mlp_activation', 'gated-silu']) == 0
  assert '--config.model.mlp_activation=gated-silu' in capsys.readouterr().out
  assert json.loads(
      (out / 'model_config.json').read_text())['model']['mlp_activation'] == ('gated-silu')
  code = convert.main([
      't5x-to-t5lite', '--checkpoint', T510, '--out',
      str(tmp_path / 'x'), '--mlp_activation', 'gated-silu'
  ])
  assert code == 2 and 'one-matrix MLP (wi)' in capsys.readouterr().err


def test_both_formats_read_from_gs_as_locally(gcs, tmp_path):
  # Google's released T5X checkpoints live on gs://: tensorstore reads them there (emulated here;
  # in a fresh interpreter, as the emulator's address must be set before tensorstore starts).
  for name, path in (('legacy', LEGACY), ('orbax', T511)):
    files.copy_tree(path, f'{gcs.url}/{name}/checkpoint_3')
  expected = t5x.load(T511)[1]
  np.savez(tmp_path / 'expected.npz', **{k.replace('/', '|'): v for k, v in expected.items()})
  code = f'''
import numpy as np
from t5lite import t5x
expected = dict(np.load({str(tmp_path / 'expected.npz')!r}))
for name in ('legacy', 'orbax'):
  fields, flat = t5x.load({gcs.url!r} + '/' + name)  # the folder above: its newest checkpoint_N
  assert fields['d_model'] == 40 and len(flat) == len(expected), name
  for k, v in flat.items():
    assert np.array_equal(v, expected[k.replace('/', '|')]), (name, k)
print('read', t5x.Checkpoint({gcs.url!r} + '/legacy').path)
'''
  result = subprocess.run([sys.executable, '-c', code], env=gcs.env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert f'read {gcs.url}/legacy/checkpoint_3' in result.stdout
