"""Training invariants: sharded == unsharded, microbatches == full batch (token-weighted, unequal
padding, dropout), the loss vs numpy, the logged gradient norm and global-norm clipping, remat ==
no remat, schedules against hand values; the initial state's three sources (fresh, resume,
init_from)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t5lite.data.catalog  # noqa: F401  (registers the built-in tasks the configs name)
from t5lite import checkpoints
from t5lite import config as config_lib
from t5lite import optim, partitioning, trainer
from t5lite.losses import cross_entropy_sums
from t5lite.models.presets import ModelConfig, model_config
from t5lite.models.t5 import make_model


def small_config(**train):
  c = config_lib.base_config()
  # Dimensions divisible by 8 so that every mesh below shards every axis evenly.
  c.model = model_config('tiny', vocab_size=256)
  c.model.update(d_model=64, d_ff=128, num_heads=8, head_dim=8, attention_dim=64, dtype='float32')
  c.train.batch_size = 16
  c.train.update(train)
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3
  c.schedule.name = 'constant'
  c.schedule.warmup_steps = 0
  return c


def synthetic_batches(n, batch_size=16, seed=0):
  """Packed batches: two examples per row with segment ids, random tokens."""
  rng = np.random.RandomState(seed)
  for _ in range(n):
    enc_seg = np.repeat(np.array([1] * 7 + [2] * 5 + [0] * 4)[None], batch_size, 0)
    dec_seg = np.repeat(np.array([1] * 4 + [2] * 3 + [0])[None], batch_size, 0)
    targets = rng.randint(3, 256, (batch_size, 8)) * (dec_seg > 0)
    inputs = rng.randint(3, 256, (batch_size, 16)) * (enc_seg > 0)
    dec_in = np.zeros_like(targets)
    dec_in[:, 1:4], dec_in[:, 5:7] = targets[:, 0:3], targets[:, 4:6]
    yield dict(encoder_input_tokens=inputs, encoder_segment_ids=enc_seg,
               decoder_input_tokens=dec_in, decoder_target_tokens=targets,
               decoder_segment_ids=dec_seg, decoder_loss_weights=(dec_seg > 0).astype(np.float32))


def train_losses(config, devices, steps=5, tx=None):
  shape = config_lib.validate(config, len(devices))
  mesh = partitioning.make_mesh(shape, devices)
  rules = config.partitioning.rules
  model = make_model(ModelConfig.from_config(config.model))
  configured_tx, schedule = optim.make_optimizer(config)
  tx = tx or configured_tx
  batches = list(synthetic_batches(steps, config.train.batch_size))
  example = next(synthetic_batches(1, config.train.batch_size))
  state, shardings = trainer.init_train_state(model, tx, mesh, rules, example, 0)
  step = trainer.jit_train_step(trainer.make_train_step(model, tx, schedule, config.train, False),
                                shardings, mesh, rules)
  sharding = partitioning.batch_sharding(mesh, rules)
  losses = []
  for batch in batches:
    state, metrics = step(state, partitioning.host_to_global(batch, sharding))
    losses.append(float(metrics['loss']))
  return np.array(losses), state


@pytest.fixture(scope='module')
def reference_losses():
  assert len(jax.devices()) == 8, 'conftest.py should give 8 CPU devices'
  return train_losses(small_config(), jax.devices()[:1])[0]


@pytest.mark.parametrize('mesh', [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_sharded_equals_unsharded(mesh, reference_losses):
  config = small_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  losses, state = train_losses(config, jax.devices())
  np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
  assert reference_losses[-1] < reference_losses[0]  # it trains
  if mesh[1] > 1 or mesh[2] > 1:  # parameters really are split across devices
    kernel = state.params['encoder']['layers_0']['mlp']['wi_0']['kernel']
    assert kernel.addressable_shards[0].data.size < kernel.size


def capture_gradients():
  """An optimizer that leaves the params alone and keeps the step's gradient as its state, so a
  test reads exactly the gradient the train step handed to the optimizer (no rounding of
  parameter differences in the way)."""
  import optax
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def padded_batch(batch_size=8, inputs=16, targets=8, seed=0):
  """Unpacked rows with unequal padding: row r has r % targets + 1 target tokens and
  inputs - r % inputs input tokens, so the microbatches of rows i, i + k, ... differ in their
  numbers of loss tokens."""
  rng = np.random.RandomState(seed)
  rows = np.arange(batch_size)
  dec = np.arange(targets)[None] < (rows % targets + 1)[:, None]
  enc = np.arange(inputs)[None] < (inputs - rows % inputs)[:, None]
  tgt = rng.randint(3, 256, (batch_size, targets)) * dec  # ids of a 256-entry vocabulary
  dec_in = np.zeros_like(tgt)
  dec_in[:, 1:] = tgt[:, :-1]
  return dict(encoder_input_tokens=rng.randint(3, 256, (batch_size, inputs)) * enc,
              decoder_input_tokens=dec_in, decoder_target_tokens=tgt,
              decoder_loss_weights=dec.astype(np.float32))


def one_step(config, batch, tx, dropout):
  """(metrics, state after one jitted train step) on one device, from init seed 0."""
  mesh = partitioning.make_mesh(config_lib.validate(config, 1), jax.devices()[:1])
  rules = config.partitioning.rules
  model = make_model(ModelConfig.from_config(config.model))
  _, schedule = optim.make_optimizer(config)
  state, shardings = trainer.init_train_state(model, tx, mesh, rules, batch, 0)
  step = trainer.jit_train_step(trainer.make_train_step(model, tx, schedule, config.train, dropout),
                                shardings, mesh, rules)
  params = jax.device_get(state.params)
  state, metrics = step(
      state, partitioning.host_to_global(batch, partitioning.batch_sharding(mesh, rules)))
  return jax.device_get(metrics), jax.device_get(state), params, model


def token_loss_sum(model, params, batch, rng):
  """Sum over the loss tokens of -log softmax(logits)[target] (jax.nn.log_softmax, not
  t5lite.losses), with dropout from `rng` when given."""
  inputs = {k: v for k, v in batch.items() if k != 'decoder_loss_weights'}
  logits = model.apply({'params': params}, **inputs, deterministic=rng is None,
                       rngs={'dropout': rng} if rng is not None else {})
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  picked = jnp.take_along_axis(log_p,
                               jnp.asarray(batch['decoder_target_tokens'])[..., None], -1)[..., 0]
  return -jnp.sum(picked * batch['decoder_loss_weights'])


def tiny_config(**train):
  c = small_config(**train)
  c.model.num_encoder_layers = c.model.num_decoder_layers = 1  # compiles faster
  c.train.z_loss = 0.0
  c.train.batch_size = 8
  return c


def test_microbatches_are_token_weighted_with_unequal_padding_and_dropout():
  """k=4 microbatches of rows with unequal numbers of loss tokens: without dropout, the loss and
  gradient equal the full batch's and the loss is the mean over all tokens (not the mean of the
  four microbatch means, which differs here). With dropout, they equal a hand-built reference:
  each microbatch (rows i, i+4) with its own dropout key fold_in(fold_in(PRNGKey(seed + 1),
  step), i), the summed token losses and gradients divided by the batch's token count."""
  batch = padded_batch()
  counts = [batch['decoder_loss_weights'][i::4].sum() for i in range(4)]
  assert len(set(counts)) == 4  # every microbatch has its own number of loss tokens

  full, full_state, params, model = one_step(tiny_config(), batch, capture_gradients(), False)
  micro, micro_state, _, _ = one_step(tiny_config(microbatches=4), batch, capture_gradients(),
                                      False)
  total = batch['decoder_loss_weights'].sum()
  assert full['target_tokens'] == micro['target_tokens'] == total
  loss_sums = [
      float(token_loss_sum(model, params, jax.tree.map(lambda x: x[i::4], batch), None))
      for i in range(4)
  ]
  token_mean = sum(loss_sums) / total
  mean_of_means = np.mean([l / c for l, c in zip(loss_sums, counts)])
  assert abs(token_mean - mean_of_means) > 1e-3 * token_mean  # the test tells them apart
  np.testing.assert_allclose(full['loss'], token_mean, rtol=1e-5)
  np.testing.assert_allclose(micro['loss'], token_mean, rtol=1e-5)
  reference = jax.grad(lambda p: token_loss_sum(model, p, batch, None) / total)(params)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(reference)) > 1e-3
  for got in (full_state.opt_state, micro_state.opt_state):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got,
                 reference)

  # Dropout on: the trainer's per-microbatch keys, rebuilt by hand.
  config = tiny_config(microbatches=4)
  config.model.dropout_rate = 0.3
  dropped, dropped_state, _, model = one_step(config, batch, capture_gradients(), True)
  step_key = jax.random.fold_in(jax.random.PRNGKey(config.train.seed + 1), 0)

  def reference_loss(p):
    return sum(
        token_loss_sum(model, p, jax.tree.map(lambda x: x[i::4], batch),
                       jax.random.fold_in(step_key, i)) for i in range(4)) / total

  loss, grads = jax.jit(jax.value_and_grad(reference_loss))(params)
  assert abs(float(loss) - token_mean) > 1e-3  # dropout really is on
  np.testing.assert_allclose(dropped['loss'], loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               dropped_state.opt_state, grads)


def test_microbatches_on_a_sharded_mesh():
  config = small_config(microbatches=2)
  config.mesh.data, config.mesh.fsdp = 2, 4
  losses, _ = train_losses(config, jax.devices(), steps=2)
  reference, _ = train_losses(small_config(), jax.devices()[:1], steps=2)
  np.testing.assert_allclose(losses, reference, rtol=1e-5)


def adamw_first_step(params, grads, lr, eps, weight_decay):
  """AdamW's first update by hand: bias-corrected m = g and v = g^2, so -lr * (g / (|g| + eps)
  + weight_decay * p)."""
  return jax.tree.map(lambda p, g: -lr * (g / (np.abs(g) + eps) + weight_decay * p), params, grads)


def test_logged_grad_norm_and_global_norm_clipping():
  """grad_norm is the global norm (numpy, float64) of the gradient that jax.grad gives for the
  token-mean loss; with train.max_grad_norm below it, AdamW's first update is the one for the
  gradient scaled by max_grad_norm / norm. eps=1 makes that update depend on the gradient's
  scale (with eps << |g| Adam's first step is g / |g|, blind to any clipping)."""
  batch = padded_batch()
  config = tiny_config()
  config.optimizer.update(learning_rate=1.0, eps=1.0, weight_decay=0.1)
  model = make_model(ModelConfig.from_config(config.model))
  total = batch['decoder_loss_weights'].sum()
  runs = {}
  for max_norm in (0.0, 'quarter'):
    if max_norm == 'quarter':
      max_norm = norm / 4
    config.train.max_grad_norm = max_norm
    tx, _ = optim.make_optimizer(config)
    metrics, state, params, _ = one_step(config, batch, tx, False)
    if not runs:  # the reference gradient, at the initial params
      grads = jax.device_get(
          jax.jit(jax.grad(lambda p: token_loss_sum(model, p, batch, None) / total))(params))
      norm = float(
          np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads))))
    runs[max_norm] = jax.tree.map(np.subtract, state.params, params)
    # The logged norm is the gradient's, before clipping.
    np.testing.assert_allclose(metrics['grad_norm'], norm, rtol=1e-5)

  unclipped = adamw_first_step(params, grads, 1.0, 1.0, 0.1)
  clipped = adamw_first_step(params, jax.tree.map(lambda g: g * (norm / 4) / norm, grads), 1.0, 1.0,
                             0.1)
  differ = max(
      float(np.abs(a - b).max())
      for a, b in zip(jax.tree.leaves(unclipped), jax.tree.leaves(clipped)))
  assert differ > 1e-3  # clipping changes the update by far more than the tolerance below
  check = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
  jax.tree.map(check, runs[0.0], unclipped)
  jax.tree.map(check, runs[norm / 4], clipped)


def remat_primitives(jaxpr):
  """The `policy` of every remat (checkpoint) equation in a jaxpr and its sub-jaxprs."""
  from jax.extend import core
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('checkpoint', 'remat', 'remat2'):
      found.append(eqn.params.get('policy'))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        if isinstance(sub, core.ClosedJaxpr):
          found += remat_primitives(sub.jaxpr)
        elif isinstance(sub, core.Jaxpr):
          found += remat_primitives(sub)
  return found


@pytest.mark.parametrize('scan,policy', [(False, 'full'), (True, 'minimal')],
                         ids=['unrolled-full', 'scan-minimal'])
def test_remat_gives_the_no_remat_loss_and_gradients(scan, policy):
  """Rematerialisation only changes what the backward pass recomputes: in float32 the loss and
  every gradient equal the model's without remat, with dropout off and on (the recomputed layer
  must draw the same dropout masks). Remat without scan, and the 'minimal' policy (under scan,
  as large models run it)."""
  import dataclasses
  base = ModelConfig(vocab_size=256, d_model=32, d_ff=64, num_heads=4, head_dim=8,
                     num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.2, dtype='float32',
                     scan_layers=scan)
  batch = padded_batch()
  plain, remat = make_model(base), make_model(dataclasses.replace(base, remat_policy=policy))
  inputs = {k: v for k, v in batch.items() if k != 'decoder_loss_weights'}
  params = jax.jit(plain.init)(jax.random.PRNGKey(0), **inputs)['params']
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(remat.init, jax.random.PRNGKey(0), **inputs)['params'])

  def losses_and_grads(model):
    fn = lambda p, rng: jax.value_and_grad(lambda q: token_loss_sum(model, q, batch, rng))(p)
    both = lambda p: (fn(p, None), fn(p, jax.random.PRNGKey(5)))
    return both, jax.device_get(jax.jit(both)(params))

  plain_fn, expected = losses_and_grads(plain)
  remat_fn, got = losses_and_grads(remat)
  # The remat really is there (and not in the plain model), with the policy asked for.
  policies = remat_primitives(jax.make_jaxpr(remat_fn)(params).jaxpr)
  assert policies and all((p is None) == (policy == 'full') for p in policies)
  assert not remat_primitives(jax.make_jaxpr(plain_fn)(params).jaxpr)
  (loss, grads), (dropped_loss, dropped_grads) = expected
  assert abs(float(loss) - float(dropped_loss)) > 1e-3  # dropout is on in the second
  # Float32 rounding only (the recomputation may fuse and add in another order): a gradient of
  # ~0.01 differs in its 7th digit at most; another dropout mask would change it in the 2nd.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected)


def numpy_cross_entropy(logits, targets, weights, z_loss, smoothing):
  vocab = logits.shape[-1]
  soft = np.full(logits.shape, smoothing / (vocab - 1))
  np.put_along_axis(soft, targets[..., None], 1 - smoothing, axis=-1)
  log_z = np.log(np.exp(logits).sum(-1))
  log_probs = logits - log_z[..., None]
  entropy = -np.sum(np.where(soft > 0, soft * np.log(np.maximum(soft, 1e-30)), 0), -1)
  ce = -np.sum(soft * log_probs, -1) - entropy
  return np.sum(ce * weights), np.sum(z_loss * log_z**2 * weights)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_cross_entropy_matches_numpy(smoothing):
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 5, 11) * 3
  targets = rng.randint(0, 11, (2, 5))
  targets[0] = logits[0].argmax(-1)  # half the tokens right, so the accuracy count means something
  weights = (rng.rand(2, 5) > 0.3).astype(np.float32)
  sums = cross_entropy_sums(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                            jnp.asarray(weights), 1e-4, smoothing)
  ce, z = numpy_cross_entropy(logits, targets, weights, 1e-4, smoothing)
  np.testing.assert_allclose(sums['loss_sum'], ce, rtol=1e-5)
  np.testing.assert_allclose(sums['z_loss_sum'], z, rtol=1e-5)
  np.testing.assert_allclose(sums['weight_sum'], weights.sum())
  correct = ((logits.argmax(-1) == targets) * weights).sum()
  assert correct >= weights[0].sum() > 0
  np.testing.assert_allclose(sums['correct_sum'], correct)
  # Shift invariance in float32 (the max is subtracted before exp), and the gradient of the
  # hand-written logsumexp equals jax.nn.logsumexp's.
  args = (jnp.asarray(targets), jnp.asarray(weights), 1e-4, smoothing)
  shifted = cross_entropy_sums(jnp.asarray(logits + 1000.0, jnp.float32), *args)
  np.testing.assert_allclose(shifted['loss_sum'], ce, rtol=1e-4)
  loss = lambda x: cross_entropy_sums(x, *args)['loss_sum']
  reference = lambda x: jnp.sum(
      (jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, args[0][..., None], -1)[..., 0]) * args[1])
  if smoothing == 0:
    np.testing.assert_allclose(
        jax.grad(loss)(jnp.asarray(logits, jnp.float32)),
        jax.grad(reference)(jnp.asarray(logits, jnp.float32)), atol=1e-6)


def test_schedules_match_hand_values():
  c = config_lib.base_config()
  s = c.schedule
  s.name, s.warmup_steps = 'rsqrt', 100
  rsqrt = optim.make_schedule(s, 1.0, 1000)
  assert float(rsqrt(0)) == pytest.approx(0.1) and float(rsqrt(400)) == pytest.approx(0.05)
  s.name, s.warmup_steps, s.end_ratio = 'cosine', 10, 0.1
  cosine = optim.make_schedule(s, 2.0, 110)
  assert float(cosine(5)) == pytest.approx(1.0)
  assert float(cosine(60)) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half way: cos = 0
  assert float(cosine(110)) == pytest.approx(0.2)
  s.name, s.warmup_steps, s.decay_fraction, s.end_ratio = 'wsd', 10, 0.2, 0.0
  wsd = optim.make_schedule(s, 1.0, 100)  # warm 0-10, stable 10-80, decay 80-100
  assert float(wsd(5)) == pytest.approx(0.5) and float(wsd(50)) == pytest.approx(1.0)
  assert float(wsd(90)) == pytest.approx(0.5) and float(wsd(100)) == pytest.approx(0.0)
  s.name, s.warmup_steps = 'constant', 0
  assert float(optim.make_schedule(s, 0.3, 100)(77)) == pytest.approx(0.3)


def test_adafactor_uses_t5_defaults():
  c = small_config()
  c.optimizer.name = 'adafactor'
  tx, _ = optim.make_optimizer(c)
  params = {'w': jnp.ones((256, 128)), 'b': jnp.ones((7,))}
  state = tx.init(params)
  leaves = {type(x).__name__ for x in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, 'v_row'))}
  assert 'FactoredState' in leaves
  factored = [
      x for x in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, 'v_row'))
      if hasattr(x, 'v_row')
  ][0]
  # second moments factored into a row and a column vector for the 256x128 matrix
  assert sorted([factored.v_row['w'].shape, factored.v_col['w'].shape]) == [(128,), (256,)]
  # update clipping at 1.0: a huge gradient gives an update of RMS <= lr * param RMS
  grads = {'w': jnp.full((256, 128), 1e6), 'b': jnp.full((7,), 1e6)}
  updates, _ = tx.update(grads, state, params)
  assert float(jnp.sqrt(jnp.mean(updates['w']**2))) <= 1e-3 * 1.0 + 1e-9


def test_learns_a_task_that_needs_cross_attention():
  """Target = the token the encoder input repeats, then EOS: solvable only by reading the
  encoder, so reaching 100% accuracy shows encoder, cross-attention, loss and updates work."""
  config = small_config()
  config.schedule.warmup_steps = 10
  config.optimizer.learning_rate = 3e-3
  shape = config_lib.validate(config, 1)
  mesh = partitioning.make_mesh(shape, jax.devices()[:1])
  rules = config.partitioning.rules
  model = make_model(ModelConfig.from_config(config.model))
  tx, schedule = optim.make_optimizer(config)
  rng = np.random.RandomState(0)

  def batch():
    token = rng.randint(3, 35, (16, 1))  # 32 distinct tokens, each seen ~60 times
    targets = np.concatenate([token, np.ones_like(token)], 1)
    return dict(encoder_input_tokens=np.repeat(token, 6, 1),
                decoder_input_tokens=np.concatenate([np.zeros_like(token), token], 1),
                decoder_target_tokens=targets, decoder_loss_weights=np.ones((16, 2), np.float32))

  state, shardings = trainer.init_train_state(model, tx, mesh, rules, batch(), 0)
  step = trainer.jit_train_step(trainer.make_train_step(model, tx, schedule, config.train, False),
                                shardings, mesh, rules)
  sharding = partitioning.batch_sharding(mesh, rules)
  for _ in range(120):
    state, metrics = step(state, partitioning.host_to_global(batch(), sharding))
  assert float(metrics['accuracy']) == 1.0 and float(metrics['loss']) < 0.1


# --- initial_state: fresh | resume | init_from ----------------------------------------------------


def _initial(config, workdir, **init):
  """trainer.initial_state on 8 devices as (2, 2, 2) with `workdir`'s checkpointer."""
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh = partitioning.make_mesh(config_lib.validate(config, 8), jax.devices()[:8])
  model = make_model(ModelConfig.from_config(config.model))
  tx, schedule = optim.make_optimizer(config)
  example = next(synthetic_batches(1, config.train.batch_size))
  config_dict = json.loads(json.dumps(config.to_dict(), default=str))
  ckpt = checkpoints.Checkpointer(str(workdir), async_save=False)
  try:
    init = trainer.initial_state(model, tx, mesh, config.partitioning.rules, example,
                                 config.train.seed, ckpt, config_dict, **init)
  finally:
    ckpt.close()
  return init, (model, tx, schedule, mesh, example, config_dict)


def _assert_equal(a, b):
  a, b = jax.device_get(a), jax.device_get(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_initial_state_fresh_resume_and_init_from(tmp_path):
  config = small_config()
  # Fresh: what init_train_state makes, at step 0, nothing to resume.
  fresh, (model, tx, schedule, mesh, example, config_dict) = _initial(config, tmp_path / 'a')
  rules = config.partitioning.rules
  assert fresh.source == 'fresh initialisation'
  assert fresh.step == 0 and fresh.data_state is None and int(fresh.state.step) == 0
  reference, shardings = trainer.init_train_state(model, tx, mesh, rules, example, 0)
  _assert_equal(fresh.state, reference)
  assert jax.tree.leaves(fresh.shardings) == jax.tree.leaves(shardings)

  # Train two steps and save: a resume gives back exactly that state, step and data state.
  step = trainer.jit_train_step(trainer.make_train_step(model, tx, schedule, config.train, False),
                                fresh.shardings, mesh, rules)
  state = fresh.state
  for batch in synthetic_batches(2, config.train.batch_size):
    state, _ = step(state,
                    partitioning.host_to_global(batch, partitioning.batch_sharding(mesh, rules)))
  saved = jax.device_get(state)
  ckpt = checkpoints.Checkpointer(str(tmp_path / 'a'), async_save=False)
  ckpt.save(2, state, {'next_index': 2}, config_dict)
  ckpt.close()
  resumed, _ = _initial(small_config(), tmp_path / 'a', init_from=str(tmp_path / 'elsewhere'))
  assert resumed.step == 2 and resumed.data_state == {'next_index': 2}
  assert resumed.source.startswith('resumed from the checkpoint of step 2 in ')
  _assert_equal(resumed.state, saved)  # init_from is not even looked at when resuming

  # init_from on an empty workdir: the saved params, a fresh optimizer state and step 0.
  tuned, _ = _initial(small_config(), tmp_path / 'b', init_from=str(tmp_path / 'a'))
  assert tuned.step == 0 and tuned.data_state is None and int(tuned.state.step) == 0
  assert tuned.source.startswith('initialised params from ')
  assert '(0 kept fresh by init_ignore)' in tuned.source
  _assert_equal(tuned.state.params, saved.params)
  _assert_equal(tuned.state.opt_state, reference.opt_state)
