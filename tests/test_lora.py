"""LoRA (model.lora_rank; t5lite/models/lora.py, t5lite/lora_export.py): at step 0 the model is
the base model exactly; only the factors train (base bitwise unchanged, optimizer state for the
factors only) from a base model (init_from=hf:), on a data/fsdp/tensor mesh, with LoRA dropout;
exact resume; the merged HF export computes the LoRA model's logits in transformers, and the
adapter export does under peft on the base model; bad targets and exports are refused."""
import dataclasses
import json
import os
import shutil

import flax
import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from t5lite import checkpoints, convert, hf, lora_export, optim, train
from t5lite.config import ConfigError
from t5lite.models import layers, presets
from t5lite.models.lora import LoraConfig
from t5lite.models.t5 import make_model

# the quickstart model, float32, short runs (shared with the freezing tests)
from test_freeze import tiny_config
from test_scoring import numpy_scores, text_batch  # a numpy log-softmax reference

LORA = dict(model__lora_rank=4, model__lora_alpha=8.0, model__lora_dropout=0.1,
            model__lora_targets=presets.LORA_ALL_TARGETS, optimizer__name='adamw',
            optimizer__learning_rate=1e-2, model__num_encoder_layers=1, model__num_decoder_layers=1)


def flat(tree):
  return {optim.param_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def hf_base(out):
  """A random HF T5.1.1 of the quickstart model's shape (the base model), saved to `out`."""
  torch.manual_seed(0)
  config = transformers.T5Config(vocab_size=2048, d_model=128, d_ff=256, d_kv=32, num_heads=4,
                                 num_layers=1, feed_forward_proj='gated-gelu', dropout_rate=0.0,
                                 tie_word_embeddings=False)
  model = transformers.T5ForConditionalGeneration(config)
  with torch.no_grad():  # transformers 5.x ties lm_head unless it is a separate module
    model.lm_head = torch.nn.Linear(128, 2048, bias=False)
  model.save_pretrained(out)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A random HF base model, and a 4-step LoRA run from it (init_from=hf:) on a 2x2x2 mesh, with
  LoRA dropout through the gated MLP (saves at 2 and 4)."""
  base = str(tmp_path_factory.mktemp('base'))
  hf_base(base)
  lora = str(tmp_path_factory.mktemp('lora'))
  config = tiny_config(4, checkpoint__init_from=f'hf:{base}', mesh__data=2, mesh__fsdp=2,
                       mesh__tensor=2, **LORA)
  train.run(config, lora)
  return base, lora, config


def model_and_params(workdir, step=None):
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  model = make_model(presets.ModelConfig.from_config(saved['model']))  # lora_targets: a JSON list
  return model, checkpoints.restore_as_numpy(workdir, step)[1]['params']


def batch(vocab=2048, seed=0):
  rng = np.random.RandomState(seed)
  enc, tgt = rng.randint(2, vocab, (3, 12)), rng.randint(2, vocab, (3, 7))
  enc[1, 8:], tgt[1, 5:] = 0, 0
  return enc, np.concatenate([np.zeros((3, 1), np.int64), tgt[:, :-1]], 1), tgt


def logits(model, params):
  enc, dec, _ = batch()
  return np.asarray(
      jax.jit(model.apply)({'params': params}, encoder_input_tokens=enc, decoder_input_tokens=dec))


def test_factors_init_like_peft():
  """A kaiming-uniform in +-1/sqrt(fan_in) (peft's init of lora_A), B zero, the kernel's axes."""
  lora = LoraConfig(rank=2, alpha=4.0, dropout=0.0, targets=('/kernel$',))
  projection = layers.Projection((16, 3, 4), ('embed', 'heads', 'kv'), 1, 1.0, 'float32', lora=lora)
  boxed = projection.init(jax.random.PRNGKey(0), np.ones((1, 2, 16), np.float32))['params']
  assert boxed['lora_a'].names == ('embed', 'lora_rank')
  assert boxed['lora_b'].names == ('lora_rank', 'heads', 'kv')
  params = flax.linen.meta.unbox(boxed)
  assert params['lora_a'].shape == (16, 2) and params['lora_b'].shape == (2, 3, 4)
  assert 0 < np.abs(params['lora_a']).max() <= 16**-0.5 and np.abs(params['lora_a']).min() > 0
  assert not np.any(params['lora_b'])


def test_step_0_is_the_base_model_exactly():
  """With B = 0 (its init), scanned and not, the LoRA model computes the base model bitwise."""
  base = dataclasses.replace(presets.preset('tiny', vocab_size=2048), dtype='float32',
                             scan_layers=True, num_encoder_layers=1, num_decoder_layers=1)
  with_lora = dataclasses.replace(base, lora_rank=4, lora_targets=presets.LORA_ALL_TARGETS)
  enc, dec, _ = batch()
  shapes = flax.linen.meta.unbox(
      jax.eval_shape(
          make_model(with_lora).init, jax.random.PRNGKey(0), encoder_input_tokens=enc,
          decoder_input_tokens=dec)['params'])
  rng = np.random.RandomState(0)  # random params (an init is slow to compile), B = 0
  scanned = jax.tree_util.tree_map_with_path(
      lambda p, s: np.zeros(s.shape, s.dtype) if optim.param_name(p).endswith('/lora_b') else
      (rng.normal(size=s.shape) * 0.2).astype(s.dtype), shapes)
  unscanned = hf.unflatten(hf.unstack_layers(hf.flatten(scanned)))
  for scan, params in ((True, scanned), (False, unscanned)):
    factors = [n for n in flat(params) if n.endswith(('/lora_a', '/lora_b'))]
    per_layer = 'layers/' if scan else 'layers_0/'
    assert f'encoder/{per_layer}attention/query/lora_a' in factors
    assert f'decoder/{per_layer}mlp/wi_0/lora_b' in factors  # the gated MLP's fused kernels too
    # encoder layers: q k v o wi_0 wi_1 wo; decoder layers: those and cross-attention's q k v o
    assert len(factors) == 2 * (7 + 11)
    strip = lambda tree: {
        k: strip(v) if isinstance(v, dict) else v for k, v in tree.items()
        if k not in ('lora_a', 'lora_b')
    }
    lora_model = make_model(dataclasses.replace(with_lora, scan_layers=scan))
    base_model = make_model(dataclasses.replace(base, scan_layers=scan))
    np.testing.assert_array_equal(logits(lora_model, params), logits(base_model, strip(params)))


def test_only_the_factors_train_with_optimizer_state_for_them_only(runs):
  base, lora, _ = runs
  start = hf.flatten(hf.load_hf(base)[1])
  end = checkpoints.restore_as_numpy(lora)[1]
  params = flat(end['params'])
  moved = [n for n in params if n.endswith('/lora_b') and np.abs(params[n]).max() > 1e-3]
  assert len(moved) == len([n for n in params if n.endswith('/lora_b')]) == 18, moved
  assert set(start) == {n for n in params if '/lora_' not in n}
  for name, value in start.items():
    assert np.array_equal(params[name], value), name  # the base: bitwise the HF model's
  stateful = {n for n, x in flat(end['opt_state']).items() if x.ndim}
  assert stateful and all('/lora_' in n for n in stateful), sorted(stateful)[:5]


def test_resume_is_bitwise(runs, tmp_path):
  _, lora, config = runs
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(lora, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '4'))  # killed after the save of step 2
  train.run(config, resumed)
  jax.tree.map(np.testing.assert_array_equal,
               checkpoints.restore_as_numpy(resumed)[1],
               checkpoints.restore_as_numpy(lora)[1])


def test_sharded_run_equals_one_device(runs, tmp_path):
  """The 2x2x2 run's first 3 steps (dropout masks included) on one device: the same losses."""
  _, lora, config = runs
  one = config.copy_and_resolve_references()
  one.mesh.update(data=1, fsdp=1, tensor=1)
  one.train.steps = 3
  one.checkpoint.every_steps = 0  # (the end only)
  train.run(one, str(tmp_path / 'one'), jax.devices()[:1])
  read = lambda workdir: [
      json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl')) if '"loss"' in line
  ][:3]
  for a, b in zip(read(str(tmp_path / 'one')), read(lora), strict=True):
    assert a['step'] == b['step']
    np.testing.assert_allclose([a['loss'], a['grad_norm']], [b['loss'], b['grad_norm']], rtol=1e-5)


def export(*args):
  assert convert.main(['t5lite-to-hf', '--vocabulary', 'none', *args]) == 0


def torch_logits(model):
  enc, dec, tgt = batch()
  with torch.no_grad():
    return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                 decoder_input_ids=torch.tensor(dec),
                 decoder_attention_mask=torch.tensor(tgt > 0)).logits.numpy()


def test_merged_and_adapter_exports_compute_the_lora_model(runs, tmp_path, capsys):
  base, lora, _ = runs
  model, params = model_and_params(lora)
  ours = logits(model, params)
  real = batch()[2] > 0
  close = lambda theirs: np.abs(theirs - ours)[real].max() / np.abs(ours[real]).max()
  hf_base_model = transformers.T5ForConditionalGeneration.from_pretrained(base).eval()
  # the factors matter: the checks below could not pass with them left out
  assert close(torch_logits(hf_base_model)) > 1e-2

  export('--checkpoint', lora, '--out', str(tmp_path / 'merged'), '--merge_lora')
  merged = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / 'merged').eval()
  assert close(torch_logits(merged)) < 1e-5

  export('--checkpoint', lora, '--out', str(tmp_path / 'adapter'), '--lora_adapter_only',
         '--base_model', base)
  adapter_config = json.load(open(tmp_path / 'adapter' / 'adapter_config.json'))
  assert adapter_config['target_modules'] == ['k', 'o', 'q', 'v', 'wi_0', 'wi_1', 'wo']
  adapted = peft.PeftModel.from_pretrained(hf_base_model, str(tmp_path / 'adapter')).eval()
  assert close(torch_logits(adapted)) < 1e-5

  # --drop_lora gives back the base model the adapter applies to
  export('--checkpoint', lora, '--out', str(tmp_path / 'dropped'), '--drop_lora')
  dropped = load_file(tmp_path / 'dropped' / 'model.safetensors')
  original = load_file(os.path.join(base, 'model.safetensors'))
  assert set(dropped) <= set(original)
  for name, value in dropped.items():
    np.testing.assert_array_equal(value, original[name])

  capsys.readouterr()
  assert convert.main(['t5lite-to-hf', '--checkpoint', lora, '--out', str(tmp_path / 'x')]) == 2
  assert 'has LoRA factors' in capsys.readouterr().err


def test_a_target_matching_no_kernel_is_a_config_error(tmp_path):
  config = tiny_config(1, model__lora_rank=4,
                       model__lora_targets=('/query/kernel$', '/logits_dense/kernel$'))
  with pytest.raises(ConfigError, match="'/logits_dense/kernel\\$' match.* no attention or MLP"):
    train.run(config, str(tmp_path / 'bad'))


def test_adapter_of_some_layers_and_export_refusals():
  model = presets.model_config('tiny', vocab_size=256).to_dict()
  model.update(lora_rank=2, lora_alpha=4.0)
  a, b = np.arange(128 * 2.0).reshape(128, 2), np.arange(2 * 4 * 32.0).reshape(2, 4, 32)
  params = hf.unflatten({
      'encoder/layers_1/attention/query/kernel': np.zeros((128, 4, 32)),
      'encoder/layers_1/attention/query/lora_a': a, 'encoder/layers_1/attention/query/lora_b': b
  })
  config, tensors = lora_export.adapter(params, model)
  module = 'encoder.block.1.layer.0.SelfAttention.q'  # one layer's only: a regex, not 'q'
  assert config['target_modules'] == module.replace('.', '\\.')
  np.testing.assert_array_equal(tensors[f'base_model.model.{module}.lora_A.weight'], a.T)
  np.testing.assert_array_equal(tensors[f'base_model.model.{module}.lora_B.weight'],
                                b.reshape(2, 128).T)  # [out = heads * kv, r], HF's head order
  merged = lora_export.merged(params, model)['encoder/layers_1/attention/query/kernel']
  np.testing.assert_allclose(merged, (4.0 / 2) * (a @ b.reshape(2, -1)).reshape(128, 4, 32))
  with pytest.raises(lora_export.LoraExportError, match="trainable=\\('norm',\\)"):
    lora_export.prepare({'model': model, 'train': {'trainable': ['norm']}}, params, 'adapter')
  with pytest.raises(lora_export.LoraExportError, match='--merge_lora: the checkpoint has no LoRA'):
    lora_export.prepare({'model': {'lora_rank': 0}}, {'encoder': {'k': np.ones(2)}}, 'merge')
  # A soft prompt (prompt tuning, alone or beside LoRA) has no place in HF T5 or a peft adapter.
  prompted = dict(params, prompt={'embedding': np.zeros((4, 128))})
  for mode in ('', 'adapter', 'merge'):
    with pytest.raises(lora_export.LoraExportError, match='soft prompt.*no place for it'):
      lora_export.prepare({'model': dict(model, prompt_length=4)}, prompted, mode)


def test_infer_scores_with_the_lora_factors(runs, tmp_path):
  """`t5lite.infer --mode score` on the LoRA run's checkpoint: each target's log-likelihood is
  the LoRA model's (a numpy log-softmax over its logits), not the base model's."""
  from t5lite import infer  # pylint: disable=import-outside-toplevel
  from t5lite.data import vocab  # pylint: disable=import-outside-toplevel
  _, lora, config = runs
  records = [{'inputs': 'Return the absolute value of a number.', 'targets': 'library'},
             {'inputs': 'The assignment statement binds names.', 'targets': 'reference'}]
  source = tmp_path / 'in.jsonl'
  source.write_text(''.join(json.dumps(r) + '\n' for r in records))
  config = config.copy_and_resolve_references()
  config.infer.mode = 'score'
  infer.run(config, str(tmp_path / 'out.jsonl'), 'latest', lora, input=str(source))
  got = [json.loads(line)['log_likelihood'] for line in open(tmp_path / 'out.jsonl')]

  vocabulary = vocab.get_vocabulary(config.data.vocabulary, config.data.sp_vocab_size)
  model, params = model_and_params(lora)
  no_lora = jax.tree_util.tree_map_with_path(
      lambda p, x: np.zeros_like(x) if optim.param_name(p).endswith('lora_b') else x, params)

  def log_likelihood(p, record):
    return float(numpy_scores(model, p, text_batch(vocabulary, record))[0])

  want = [log_likelihood(params, r) for r in records]
  base = [log_likelihood(no_lora, r) for r in records]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(want) - np.asarray(base)).max() > 1e-2, (want, base)
