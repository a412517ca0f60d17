"""Vocabulary expansion (checkpoint.init_new_rows, t5lite/vocab_expansion.py): init_from a model
trained on a SentencePiece vocabulary into a larger model whose vocabulary extends it. The
defining property: at step 0 the logits of old tokens over old tokens are the old model's, with
T5's sentinels (at the top of the vocabulary) followed to their new ids."""
import dataclasses
import importlib.util
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2

from t5lite import checkpoints, cli, init_from, train, vocab_expansion
from t5lite.config import ConfigError, validate
from t5lite.data import embedded, vocab
from t5lite.models import presets, t5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('quickstart',
                                               os.path.join(REPO, 'configs', 'quickstart.py'))
quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quickstart)

OLD_PIECES, EXTRA = 300, 100  # ids: 300 pieces, then 100 sentinels counting down from 399
NEW_WORDS = ('\u2581configuration', '\u2581interpreter', '\u2581argument', '\u2581generator',
             '\u2581tokenizer', 'ization')
OLD_ROWS, NEW_ROWS = 512, 640


def tiny_config(steps, vocabulary, vocab_size, seed=0, **checkpoint):
  c = quickstart.get_config()
  c.model.dtype = 'float32'
  c.model.vocab_size = vocab_size
  c.data.vocabulary = vocabulary
  c.data.inputs_length = 32
  c.train.update(steps=steps, batch_size=8, log_every=1, seed=seed)
  c.schedule.warmup_steps = 100  # step 1's learning rate is 0: its checkpoint holds the init
  c.reporting.update(tensorboard=False, peak_flops_per_device=1e11)
  c.eval.every_steps = 0
  c.checkpoint.update(every_steps=0, async_save=False, **checkpoint)
  return c


@pytest.fixture(scope='module')
def vocabs(tmp_path_factory):
  """(old .model path, extended .model path): a small SentencePiece model trained here, and the
  same model with NEW_WORDS appended as pieces (the usual way to extend one: edit its proto)."""
  d = tmp_path_factory.mktemp('vocab')
  old = str(d / 'old.model')
  vocab.train_sentencepiece(embedded.corpus_documents()[:40], old, OLD_PIECES)
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(open(old, 'rb').read())
  assert not {p.piece for p in proto.pieces} & set(NEW_WORDS)
  for word in NEW_WORDS:
    proto.pieces.add(piece=word, score=0.0)
  new = str(d / 'new.model')
  with open(new, 'wb') as f:
    f.write(proto.SerializeToString())
  return old, new


def grown_config(new, a, steps):
  """Run B's config: from run A onto the extended vocabulary, new rows from the pieces, a
  checkpoint after every step (all kept)."""
  c = tiny_config(steps, new, NEW_ROWS, seed=1, init_from=a, init_new_rows='pieces')
  c.checkpoint.update(every_steps=1, keep=0)
  return c


@pytest.fixture(scope='module')
def runs(vocabs, tmp_path_factory):
  """Run A (1 step on the old vocabulary, 512 rows) and run B (3 steps from A on the extended
  vocabulary, 640 rows, new rows from the pieces; step 1's learning rate is 0): A's workdir, A's
  params, B's params at step 1 (the grown init) and B's workdir."""
  old, new = vocabs
  a = str(tmp_path_factory.mktemp('a'))
  train.run(tiny_config(1, old, OLD_ROWS), a)
  b = str(tmp_path_factory.mktemp('b'))
  train.run(grown_config(new, a, 3), b)
  return (a, checkpoints.restore_as_numpy(a)[1]['params'],
          checkpoints.restore_as_numpy(b, 1)[1]['params'], b)


def logits(config, params, encoder_ids, decoder_ids):
  model = cli.build(config).model
  return np.asarray(
      model.apply({'params': params}, np.asarray(encoder_ids), np.asarray(decoder_ids)))


def test_old_tokens_keep_their_logits_and_new_rows_are_the_mean_of_their_pieces(vocabs, runs):
  old_path, new_path = vocabs
  _, pa, pb, _ = runs
  old = vocab.SentencePieceVocabulary(old_path)
  assert (old.vocab_size, vocab.SentencePieceVocabulary(new_path).vocab_size) == (400, 406)
  # By hand: the pieces keep their ids (appended at the end); sentinel k moves from 399-k to 405-k.
  to_new = np.concatenate([np.arange(OLD_PIECES), np.arange(OLD_PIECES, 400) + len(NEW_WORDS)])
  rng = np.random.default_rng(0)
  enc = rng.integers(3, 400, (2, 12))
  enc[:, 3] = 399  # <extra_id_0>
  enc[:, 7] = 398
  dec = rng.integers(3, 400, (2, 6))
  dec[:, 0] = 0
  la = logits(tiny_config(1, old_path, OLD_ROWS), pa, enc, dec)
  lb = logits(tiny_config(1, new_path, NEW_ROWS), pb, to_new[enc], to_new[dec])
  np.testing.assert_allclose(lb[..., to_new], la[..., :400], rtol=1e-5, atol=1e-5)
  # Copying rows by index would have given the sentinels' rows to the new pieces.
  assert not np.allclose(lb[..., :400], la[..., :400], rtol=1e-3, atol=1e-3)

  emb_a, emb_b = pa['token_embedder']['embedding'], pb['token_embedder']['embedding']
  out_a, out_b = pa['logits_dense']['kernel'], pb['logits_dense']['kernel']
  assert emb_b.shape == (NEW_ROWS, emb_a.shape[1]) and out_b.shape == (out_a.shape[0], NEW_ROWS)
  np.testing.assert_array_equal(emb_b[to_new], emb_a[:400])
  for j, word in enumerate(NEW_WORDS, start=OLD_PIECES):
    pieces = old.encode(word.replace('\u2581', ' '))
    assert len(pieces) > 1, (word, pieces)
    np.testing.assert_allclose(emb_b[j], emb_a[pieces].mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out_b[:, j], out_a[:, pieces].mean(1), rtol=1e-6, atol=1e-6)
  # Rows that are no token (T5's padding past id 405) take the mean of the old tokens' rows.
  np.testing.assert_allclose(emb_b[406:], np.broadcast_to(emb_a[:400].mean(0), emb_b[406:].shape),
                             rtol=1e-6, atol=1e-6)


def abstract(params):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)


def test_mean_and_mean_noise_rows(vocabs, runs):
  old_path, new_path = vocabs
  a, pa, pb, _ = runs
  new = vocab.SentencePieceVocabulary(new_path)
  mean = pa['token_embedder']['embedding'][:400].mean(0)
  for rule in ('mean', 'mean_noise:0.5'):
    loaded = init_from.load_params_for_init(a, abstract(pb),
                                            expansion=vocab_expansion.Expansion(new, rule))
    emb = np.asarray(loaded['token_embedder']['embedding'])
    np.testing.assert_array_equal(emb[:OLD_PIECES], pa['token_embedder']['embedding'][:300])
    fresh = emb[OLD_PIECES:OLD_PIECES + len(NEW_WORDS)]
    if rule == 'mean':
      np.testing.assert_allclose(fresh, np.broadcast_to(mean, fresh.shape), rtol=1e-6, atol=1e-6)
    else:
      noise = np.asarray(
          loaded['logits_dense']['kernel'])[:, 406:] - pa['logits_dense']['kernel'][:, :400].mean(
              1, keepdims=True)
      assert abs(noise.std() - 0.5) < 0.05 and abs(noise.mean()) < 0.05


def test_tied_embeddings_keep_old_logits(vocabs):
  """T5 v1.0 ties the output layer to the embedding: growing its rows keeps the logits too."""
  old = vocab.SentencePieceVocabulary(vocabs[0])
  new = vocab.SentencePieceVocabulary(vocabs[1])
  cfg_a = dataclasses.replace(presets.preset('tiny', 'v1_0', OLD_ROWS), dtype='float32')
  cfg_b = dataclasses.replace(cfg_a, vocab_size=NEW_ROWS)
  assert cfg_a.tie_logits
  ids = np.arange(3, 15).reshape(2, 6) * 33 % 400
  ids[0, 2] = 399
  params = nn.unbox(t5.EncoderDecoder(cfg_a).init(jax.random.PRNGKey(0), ids, ids)['params'])
  flat = {'token_embedder/embedding': np.asarray(params['token_embedder']['embedding'])}
  grown = vocab_expansion.expand_params(flat, old, new, NEW_ROWS, 'mean')
  assert 'logits_dense/kernel' not in grown
  params_b = dict(params, token_embedder={'embedding': grown['token_embedder/embedding']})
  to_new = np.concatenate([np.arange(OLD_PIECES), np.arange(OLD_PIECES, 400) + len(NEW_WORDS)])
  la = np.asarray(t5.EncoderDecoder(cfg_a).apply({'params': params}, ids, ids))
  lb = np.asarray(t5.EncoderDecoder(cfg_b).apply({'params': params_b}, to_new[ids], to_new[ids]))
  np.testing.assert_allclose(lb[..., to_new], la[..., :400], rtol=1e-5, atol=1e-5)


def test_errors(vocabs, runs, tmp_path):
  old_path, new_path = vocabs
  a, _, pb, _ = runs
  new = vocab.SentencePieceVocabulary(new_path)
  # Without init_new_rows a larger vocabulary stays a shape error, which names the switch.
  with pytest.raises(checkpoints.CheckpointError, match='init_new_rows'):
    init_from.load_params_for_init(a, abstract(pb))
  # A vocabulary that does not hold the old pieces (a smaller, other one) is refused.
  other = str(tmp_path / 'other.model')
  vocab.train_sentencepiece(embedded.corpus_documents()[40:60], other, 200)
  with pytest.raises(checkpoints.CheckpointError, match='does not extend'):
    init_from.load_params_for_init(
        a, abstract(pb), expansion=vocab_expansion.Expansion(vocab.SentencePieceVocabulary(other),
                                                             'mean'))
  # Fewer rows than the checkpoint's vocabulary.
  small = jax.tree.map(lambda x: x, pb)
  small['token_embedder']['embedding'] = pb['token_embedder']['embedding'][:256]
  small['logits_dense']['kernel'] = pb['logits_dense']['kernel'][:, :256]
  with pytest.raises(checkpoints.CheckpointError, match='fewer than'):
    init_from.load_params_for_init(a, abstract(small),
                                   expansion=vocab_expansion.Expansion(new, 'mean'))
  # Any other dimension still has to match.
  wide = jax.tree.map(lambda x: x, pb)
  wide['token_embedder']['embedding'] = np.zeros((NEW_ROWS, 48), np.float32)
  with pytest.raises(checkpoints.CheckpointError, match='token_embedder/embedding: checkpoint'):
    init_from.load_params_for_init(a, abstract(wide),
                                   expansion=vocab_expansion.Expansion(new, 'mean'))
  for bad in ('median', 'mean_noise:', 'mean_noise:-1'):
    with pytest.raises(ConfigError, match='checkpoint.init_new_rows'):
      validate(tiny_config(1, new_path, NEW_ROWS, init_from=a, init_new_rows=bad), 1)
  # Without init_new_rows the config check refuses the changed vocabulary before any compute.
  with pytest.raises(ConfigError, match='data.vocabulary'):
    validate(tiny_config(1, new_path, NEW_ROWS, init_from=a), 1)


def test_grown_params_land_on_the_model_shardings(vocabs, runs):
  """The vocabulary params sharded over both axes of a (fsdp, tensor) mesh: the same values as on
  one device, each device holding its slice."""
  a, _, pb, _ = runs
  new = vocab.SentencePieceVocabulary(vocabs[1])
  expansion = vocab_expansion.Expansion(new, 'pieces')
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ('fsdp', 'tensor'))
  spec = jax.sharding.PartitionSpec
  # Every param on the same mesh (replicated), as a run places them; the two grown ones sharded.
  tree = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(
          mesh, spec())), pb)
  tree['token_embedder']['embedding'] = jax.ShapeDtypeStruct(
      pb['token_embedder']['embedding'].shape, np.float32,
      sharding=jax.sharding.NamedSharding(mesh, spec('tensor', 'fsdp')))
  tree['logits_dense']['kernel'] = jax.ShapeDtypeStruct(
      pb['logits_dense']['kernel'].shape, np.float32,
      sharding=jax.sharding.NamedSharding(mesh, spec('fsdp', 'tensor')))
  sharded = init_from.load_params_for_init(a, tree, expansion=expansion)
  single = init_from.load_params_for_init(a, abstract(pb), expansion=expansion)
  for name, axes in (('token_embedder', spec('tensor',
                                             'fsdp')), ('logits_dense', spec('fsdp', 'tensor'))):
    leaf = 'embedding' if name == 'token_embedder' else 'kernel'
    x = sharded[name][leaf]
    assert x.sharding.spec == axes and len(x.addressable_shards) == 8
    assert x.addressable_shards[0].data.shape == (x.shape[0] //
                                                  (4 if axes[0] == 'tensor' else 2), x.shape[1] //
                                                  (2 if axes[1] == 'fsdp' else 4))
    np.testing.assert_array_equal(np.asarray(x), np.asarray(single[name][leaf]))


def test_a_grown_run_resumes_bitwise(vocabs, runs, tmp_path):
  """Interrupted after its step 1, run B resumes from its own checkpoint (the workdir's wins over
  init_from, so the rows are not grown a second time) and ends bitwise where it ended in one go."""
  a, _, _, b = runs
  os.makedirs(tmp_path / 'checkpoints')
  shutil.copytree(os.path.join(b, 'checkpoints', '1'), tmp_path / 'checkpoints' / '1')
  history = train.run(grown_config(vocabs[1], a, 3), str(tmp_path))
  assert [r['step'] for r in history] == [2, 3]
  step, resumed = checkpoints.restore_as_numpy(str(tmp_path))
  assert step == 3
  _, one_go = checkpoints.restore_as_numpy(b)
  for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(one_go)):
    np.testing.assert_array_equal(x, y)
