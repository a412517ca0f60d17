"""Training health: non-finite steps and dead runs caught on the device at every step
(trainer.Watch), accuracy that counts a tie as wrong, and config checks that reject inf and nan."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t5lite.data.catalog  # noqa: F401  (registers the built-in tasks the configs name)
from t5lite import checks
from t5lite import config as config_lib
from t5lite import config_files
from t5lite import optim, partitioning, trainer
from t5lite.losses import cross_entropy_sums
from t5lite.models.presets import ModelConfig
from t5lite.models.t5 import make_model

from test_training import small_config, synthetic_batches

_BUILT = {}


def _setup(config, devices=None):
  """(model, tx, schedule, mesh, rules, batch sharding, fresh state, shardings, plain step,
  watched step) for `config`. The jitted steps and the initial state are built once per config
  (compiling dominates these tests); each call gets its own copy of the state (steps donate it)."""
  devices = devices or jax.devices()[:1]
  key = (config.to_json(), len(devices))
  if key not in _BUILT:
    mesh = partitioning.make_mesh(config_lib.validate(config, len(devices)), devices)
    rules = config.partitioning.rules
    model = make_model(ModelConfig.from_config(config.model))
    tx, schedule = optim.make_optimizer(config)
    example = next(synthetic_batches(1, config.train.batch_size))
    state, shardings = trainer.init_train_state(model, tx, mesh, rules, example, 0)
    train_step = trainer.make_train_step(model, tx, schedule, config.train, False)
    _BUILT[key] = (mesh, rules, partitioning.batch_sharding(mesh, rules), jax.device_get(state),
                   shardings, trainer.jit_train_step(train_step, shardings, mesh, rules),
                   trainer.jit_train_step(train_step, shardings, mesh, rules, watch=True))
  mesh, rules, sharding, host_state, shardings, plain, watched = _BUILT[key]
  return mesh, sharding, jax.device_put(host_state, shardings), plain, watched


def _watched_run(config, batches, edit=None):
  """Runs the watched step over `batches`; `edit(step_number, state)` may change the state before
  a step. Returns the host metrics and the WatchReport after each step, and the final state."""
  mesh, sharding, state, _, step = _setup(config)
  watch = trainer.initial_watch(mesh)
  metrics_seen, reports = [], []
  for number, batch in enumerate(batches, 1):
    if edit is not None:
      state = edit(number, state)
    state, metrics, watch = step(state, partitioning.host_to_global(batch, sharding), watch)
    metrics_seen.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    reports.append(trainer.read_watch(watch))
  return metrics_seen, reports, state


# --- the watch on a real model ------------------------------------------------------------------


def test_watched_step_is_bitwise_the_unwatched_step():
  config = small_config()
  _, sharding, state, plain, _ = _setup(config)
  batches = list(synthetic_batches(3))
  plain_metrics = []
  for batch in batches:
    state, metrics = plain(state, partitioning.host_to_global(batch, sharding))
    plain_metrics.append(jax.device_get(metrics))
  plain_state = jax.device_get(state)

  watched_metrics, reports, watched_state = _watched_run(config, batches)
  for a, b in zip(plain_metrics, watched_metrics):
    assert set(a) == set(b)
    for key in a:
      assert float(a[key]) == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key
  for x, y in zip(jax.tree.leaves(plain_state), jax.tree.leaves(jax.device_get(watched_state))):
    np.testing.assert_array_equal(x, y)
  assert [m['finite'] for m in watched_metrics] == [1.0, 1.0, 1.0]
  assert reports[-1] == trainer.WatchReport(first_bad_step=None, dead_steps=0, last_step=3)
  assert watched_metrics[-1]['loss'] < watched_metrics[0]['loss']  # a healthy run: it trains


def _poison_one_param(at_step):
  """An `edit` for _watched_run: one entry of one kernel becomes NaN before step `at_step`."""

  def edit(number, state):
    if number != at_step:
      return state
    kernel = state.params['encoder']['layers_0']['mlp']['wi_0']['kernel']
    poisoned = jax.device_put(kernel.at[0, 0].set(jnp.nan), kernel.sharding)
    params = jax.tree.map(lambda x: poisoned if x is kernel else x, state.params)
    return state.replace(params=params)

  return edit


def test_a_nan_parameter_is_caught_at_its_step_and_the_first_bad_step_sticks():
  metrics, reports, _ = _watched_run(small_config(), list(synthetic_batches(5)),
                                     edit=_poison_one_param(at_step=3))
  assert [m['finite'] for m in metrics] == [1.0, 1.0, 0.0, 0.0, 0.0]
  assert math.isnan(metrics[2]['loss'])
  # None before step 3; then 3, and still 3 after the later (also bad) steps.
  assert [r.first_bad_step for r in reports] == [None, None, 3, 3, 3]
  assert [r.last_step for r in reports] == [1, 2, 3, 4, 5]
  assert all(r.dead_steps == 0 for r in reports)  # a nan norm is not a zero norm


def test_a_non_finite_loss_from_the_batch_is_caught():
  batches = list(synthetic_batches(4))
  batches[1] = dict(batches[1])
  weights = batches[1]['decoder_loss_weights'].copy()
  weights[0, 0] = np.inf  # the loss of step 2 is not finite (the params of step 2 are fine)
  batches[1]['decoder_loss_weights'] = weights
  metrics, reports, _ = _watched_run(small_config(), batches)
  assert metrics[0]['finite'] == 1.0 and metrics[1]['finite'] == 0.0
  assert math.isnan(metrics[1]['loss'])  # inf / inf target tokens
  assert [r.first_bad_step for r in reports] == [None, 2, 2, 2]


def test_nan_gradients_with_a_finite_loss_are_caught():
  """Adafactor at lr 1e6 without clipping: the loss of step 2 is still finite, its gradients are
  not (measured); the flag reads the gradient norm, so step 2 is named."""
  config = small_config()
  config.optimizer.name, config.optimizer.learning_rate = 'adafactor', 1e6
  metrics, reports, _ = _watched_run(config, list(synthetic_batches(3)))
  assert np.isfinite(metrics[1]['loss']) and math.isnan(metrics[1]['grad_norm'])
  assert [m['finite'] for m in metrics] == [1.0, 0.0, 0.0]
  assert reports[-1].first_bad_step == 2


def test_a_dead_run_counts_dead_steps_and_scores_no_accuracy():
  """Adafactor at lr 1e6 with clipping and warm-up (the quickstart's settings): from step 3 on
  every gradient is exactly 0 and the loss is flat at ln(vocab), the model's logits all tie."""
  config = small_config()
  config.optimizer.name, config.optimizer.learning_rate = 'adafactor', 1e6
  config.train.max_grad_norm = 1.0
  config.schedule.name, config.schedule.warmup_steps = 'cosine', 100
  config.train.steps = 60
  metrics, reports, _ = _watched_run(config, list(synthetic_batches(6)))
  assert [m['grad_norm'] == 0.0 for m in metrics] == [False, False, True, True, True, True]
  for m in metrics[2:]:
    assert m['loss'] == pytest.approx(math.log(256), rel=1e-6)
    assert m['accuracy'] == 0.0  # all logits tie: no token is right (it was 1.0 with >=)
    assert m['finite'] == 1.0
  assert [r.dead_steps for r in reports] == [0, 0, 1, 2, 3, 4]
  assert all(r.first_bad_step is None for r in reports)


# --- the watch's rules on hand-made metrics -----------------------------------------------------


def test_watch_rules_on_a_scripted_sequence():
  """watch_train_step around a fake step whose metrics come from the batch: the expected
  first_bad_step / dead_steps of each step are written by hand."""

  def fake_step(state, batch):
    finite = (jnp.isfinite(batch['loss']) & jnp.isfinite(batch['grad_norm'])).astype(jnp.float32)
    return state.replace(step=state.step + 1), {**batch, 'finite': finite}

  step = jax.jit(trainer.watch_train_step(fake_step))
  mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  watch = trainer.initial_watch(mesh)
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params={}, opt_state={})
  # (loss, grad norm) of steps 1..10, then (first_bad_step, dead_steps) expected after each.
  script = [
      ((5.0, 1.0), (None, 0)),
      ((5.0, 0.0), (None, 1)),  # dead: loss > 0 with a zero gradient
      ((5.0, 0.0), (None, 2)),
      ((5.0, 1e-30), (None, 0)),  # any nonzero norm resets the count
      ((5.0, 0.0), (None, 1)),
      ((0.0, 0.0), (None, 0)),  # nothing to learn (e.g. no target tokens) is not dead
      ((5.0, np.inf), (7, 0)),  # first bad step: 7
      ((5.0, 0.0), (7, 1)),
      ((np.nan, 1.0), (7, 0)),  # later bad steps leave it at 7
      ((5.0, 0.0), (7, 1)),
  ]
  for number, ((loss, norm), expected) in enumerate(script, 1):
    batch = {'loss': jnp.float32(loss), 'grad_norm': jnp.float32(norm)}
    state, _, watch = step(state, batch, watch)
    assert trainer.read_watch(watch) == trainer.WatchReport(*expected, last_step=number), number


def test_watch_is_replicated_on_a_sharded_mesh():
  config = small_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh, sharding, state, _, step = _setup(config, jax.devices())
  watch = trainer.initial_watch(mesh)
  for batch in synthetic_batches(2):
    state, metrics, watch = step(state, partitioning.host_to_global(batch, sharding), watch)
  for leaf in jax.tree.leaves(watch):
    assert leaf.sharding.is_fully_replicated and leaf.dtype == jnp.int32
  assert trainer.read_watch(watch) == trainer.WatchReport(None, 0, 2)
  assert float(metrics['finite']) == 1.0


# --- accuracy: the target must be the unique maximum ---------------------------------------------


def test_accuracy_counts_only_a_unique_maximum():
  # One row per case; vocab 4. Expected by hand: 1 only where the target's logit beats every other.
  logits = np.array(
      [
          [0.0, 0.0, 0.0, 0.0],  # all tie (a dead model), target 2: wrong
          [1.0, 3.0, 2.0, 0.0],  # unique max at the target 1: right
          [2.0, 0.5, 0.5, 2.0],  # target 0 ties with class 3 (argmax would say 0): wrong
          [2.0, 0.5, 0.5, 1.0],  # target 0 the unique max: right
          [1.0, 5.0, 5.0, 0.0],  # two other classes tie above the target 3: wrong
          [-1e30, -1e30, 7.0, -1e30],  # unique max far above the rest: right
      ],
      np.float32)
  targets = np.array([2, 1, 0, 0, 3, 2])
  weights = np.ones(6, np.float32)
  expected = np.array([0, 1, 0, 1, 0, 1], np.float32)
  # numpy, independently: the target holds the max, and only one class does.
  is_max = logits == logits.max(-1, keepdims=True)
  assert np.array_equal((is_max[np.arange(6), targets] & (is_max.sum(-1) == 1)), expected == 1)
  for row in range(6):
    sums = cross_entropy_sums(jnp.asarray(logits[row:row + 1]), jnp.asarray(targets[row:row + 1]),
                              jnp.asarray(weights[row:row + 1]))
    assert float(sums['correct_sum']) == expected[row], row
  sums = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights * 2))
  assert float(sums['correct_sum']) == 2 * expected.sum()
  # The loss is unchanged by where the max sits: numpy's logsumexp - target logit (float64).
  shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
  log_z = logits.max(-1) + np.log(np.exp(shifted).sum(-1))
  np.testing.assert_allclose(float(sums['loss_sum']),
                             2 * np.sum(log_z - logits[np.arange(6), targets]), rtol=1e-6)
  assert float(sums['loss_sum']) / 12 > 0


def test_all_tied_logits_give_ln_vocab_and_zero_accuracy():
  logits = jnp.full((3, 5, 256), 0.25, jnp.float32)
  targets = jnp.asarray(np.random.RandomState(0).randint(0, 256, (3, 5)))
  sums = cross_entropy_sums(logits, targets, jnp.ones((3, 5)))
  assert float(sums['correct_sum']) == 0.0
  np.testing.assert_allclose(float(sums['loss_sum']) / 15, math.log(256), rtol=1e-6)


# --- checks: non-finite numbers ------------------------------------------------------------------


@pytest.mark.parametrize('value', [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize(
    'check', [
        checks.positive, checks.non_negative,
        checks.in_range(0, 1),
        checks.in_range(0, 1, lo_open=True, hi_open=True),
        checks.count('things'), checks.finite
    ], ids=['positive', 'non_negative', 'in_range', 'in_range_open', 'count', 'finite'])
def test_numeric_checks_reject_non_finite_values(check, value):
  with pytest.raises(config_lib.ConfigError) as info:
    check(value, 'train.z_loss')
  assert str(info.value) == f'config.train.z_loss={value!r} is not a finite number'


def test_numeric_checks_still_accept_finite_numbers():
  checks.positive(1e300, 'a.b')
  checks.non_negative(0.0, 'a.b')
  checks.in_range(0, 1)(0.5, 'a.b')
  checks.count('things')(3, 'a.b')
  checks.finite(-2.5, 'a.b')
  checks.finite('not a number: the other checks judge it', 'a.b')
  with pytest.raises(config_lib.ConfigError, match='must be a positive number'):
    checks.positive(-1.0, 'a.b')


@pytest.mark.parametrize('raw', ['1e999', '-1e999'])  # the command line's only way to inf
def test_a_non_finite_learning_rate_fails_validation(raw):
  config = config_lib.base_config()
  config_files.set_override(config, 'optimizer.learning_rate', raw)
  assert not math.isfinite(config.optimizer.learning_rate)  # 1e999 parses as inf
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config, 1)
  value = config.optimizer.learning_rate
  assert str(info.value) == f'config.optimizer.learning_rate={value!r} is not a finite number'
