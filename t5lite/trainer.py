"""Train state, the train / eval steps, and the run's initial state (resume | init_from | fresh).

`make_train_step` returns a pure function `(state, batch) -> (state, metrics)`, jitted by
`jit_train_step` with in/out shardings derived from the logical rules and with the state donated
(`partitioning.jit`: the call enters mesh and rules itself). With `watch=True` the jitted step
also carries a `Watch` on the device: the first step with a non-finite loss or gradient, and the
count of consecutive dead steps (gradient norm 0), read by the host only at log and save steps.
Gradients are accumulated over `train.microbatches` slices of the batch; the loss is a sum over
target tokens divided by the number of target tokens of the whole batch, so k microbatches give
the same update as one full batch. The loss arithmetic is `t5lite.losses`.

`initial_state` decides where a run starts: the newest readable checkpoint of the run's own
workdir, else a fresh initialisation, with its params then taken from `init_from` if given
(fine-tuning: optimizer state and step stay fresh, except T5X's Adafactor statistics for an
Adafactor run; the workdir's own checkpoints always win).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5lite import checkpoints, distill, losses, optim, partitioning
from t5lite import init_from as init_lib  # initial_state has an argument named init_from
from t5lite.models import lora
from t5lite.models import prompt as prompt_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules,
                         example_batch: dict[str, Any], seed: int):
  """(ShapeDtypeStructs carrying this mesh's shardings, shardings) of the train state.

  Traced with jax.eval_shape, so nothing is allocated: the shardings for `init_train_state`, and
  restore targets that put every checkpointed array straight into this mesh's layout.
  `example_batch` only lends shapes (arrays or ShapeDtypeStructs); `seed` changes no shape.
  """
  del seed
  params, param_shardings = partitioning.abstract_params(model, mesh, rules,
                                                         losses.model_inputs(example_batch))
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), params)
  if getattr(model, 'cfg', None) is not None and model.cfg.lora is not None:
    names = [optim.param_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    lora.check_targets(names, model.cfg.lora)  # before any compute
  opt_state = jax.eval_shape(tx.init, params)
  opt_shardings = partitioning.optimizer_state_shardings(tx, opt_state, param_shardings, mesh)
  shardings = TrainState(step=NamedSharding(mesh, P()), params=param_shardings,
                         opt_state=opt_shardings)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                          shardings)
  return abstract, shardings


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules,
                     example_batch: dict[str, Any], seed: int, shardings: TrainState | None = None):
  """Initialises parameters and optimizer state directly in their shardings (computed here
  unless the caller already has them from `abstract_train_state`). Returns (state, shardings).
  """
  if shardings is None:
    _, shardings = abstract_train_state(model, tx, mesh, rules, example_batch, seed)
  inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in losses.model_inputs(example_batch).items()}
  init_params = partitioning.jit(lambda key: nn.meta.unbox(model.init(key, **inputs))['params'],
                                 mesh, rules, out_shardings=shardings.params)
  params = init_params(jax.random.PRNGKey(seed))
  # jit(tx.init) alone would not carry the parameter shardings over: give out_shardings.
  opt_state = partitioning.jit(tx.init, mesh, rules, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state), shardings


@dataclasses.dataclass
class InitialState:
  """Where a run starts. `step`: the step of `state` (0 unless resumed); `data_state`: this
  process's data-iterator state to `set_state` (None unless resumed); `source`: one line for
  the log saying which of resume / init_from / fresh it was."""
  state: TrainState
  shardings: TrainState
  step: int
  data_state: Any
  source: str


def initial_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules,
                  example_batch: dict[str, Any], seed: int, checkpointer, config_dict: dict,
                  init_from: str = '', init_rename=(), init_ignore=(), vocab_expansion=None,
                  init_from_state: str = 'params') -> InitialState:
  """The newest readable checkpoint of `checkpointer` (a checkpoints.Checkpointer, or None for
  none), else a fresh initialisation from `seed` whose params come from `init_from` when given.

  init_from is read only when nothing was resumed: once a fine-tune has saved, resuming takes
  precedence. `config_dict` is checked against the checkpoint's config (restore_latest).
  `init_from_state` (checkpoint.init_from_state): params | params_and_optimizer | full
  (init_from.load_state_for_init: the optimizer state too; full also the step and data position).
  """
  abstract, shardings = abstract_train_state(model, tx, mesh, rules, example_batch, seed)
  restored = checkpointer.restore_latest(abstract, config_dict) if checkpointer else None
  if restored is not None:
    return InitialState(
        restored.state, shardings, restored.step, restored.data_state,
        f'resumed from the checkpoint of step {restored.step} in '
        f'{checkpointer.directory}')
  state, _ = init_train_state(model, tx, mesh, rules, example_batch, seed, shardings)
  if not init_from:
    return InitialState(state, shardings, 0, None, 'fresh initialisation')
  source = checkpoints.resolve_init_path(init_from)
  if init_from_state != 'params' and not source.startswith(checkpoints.T5X_PREFIX):
    return _state_from(source, init_from_state, state, abstract, shardings, init_rename
                       or init_ignore or vocab_expansion)
  # vocab_expansion (a vocab_expansion.Expansion): the vocabulary params grow onto a new vocabulary.
  prompt_length = model.cfg.prompt_length
  loaded = init_lib.load_params_for_init(
      source, abstract.params, init_rename, init_ignore, vocab_expansion,
      optional=(optim.PROMPT_TRAINABLE,) if prompt_length else ())
  state = state.replace(params=init_lib.merge_init_params(state.params, loaded))
  fresh = [
      optim.param_name(p) for p, x in jax.tree_util.tree_leaves_with_path(loaded)
      if isinstance(x, jax.ShapeDtypeStruct)
  ]
  new_lora = sum(bool(re.search(optim.LORA_FACTORS, n)) for n in fresh)  # a base model's: new
  fresh = len(fresh) - new_lora
  lora_note = f', {new_lora} new LoRA factors from init' if new_lora else ''
  grown = (f'; vocabulary grown onto the run\'s, new rows: {vocab_expansion.new_rows}'
           if vocab_expansion else '')
  if prompt_length and isinstance(loaded['prompt']['embedding'], jax.ShapeDtypeStruct):
    # A base model's checkpoint: the prompt is drawn again, from the embedding just loaded.
    state = state.replace(params=prompt_lib.resample(state.params, seed, model.cfg,
                                                     shardings.params['prompt']['embedding']))
    fresh -= 1
    grown += '; soft prompt drawn from the loaded token embedding'
  # From a T5X checkpoint an Adafactor run can continue T5X's Adafactor statistics (init_from.py).
  opt_state, note = (init_lib.load_adafactor_for_init(source, abstract.opt_state, abstract.params,
                                                      init_rename, init_ignore)
                     if init_from_state == 'params_and_optimizer' else (None, ''))
  if init_from_state == 'params_and_optimizer' and opt_state is None:
    raise checkpoints.CheckpointError(
        f'checkpoint.init_from={source} with checkpoint.init_from_state=params_and_optimizer: a '
        "T5X checkpoint's optimizer state is Adafactor's, this run's optimizer.name is not "
        "adafactor; use init_from_state='params'")
  if opt_state is not None:
    state = state.replace(opt_state=init_lib.merge_init_params(state.opt_state, opt_state))
    return InitialState(
        state, shardings, 0, None,
        f'initialised params and Adafactor statistics from {source} ({fresh} kept fresh by '
        f'init_ignore{lora_note}{note}); the step, the data and the learning-rate schedule start '
        'at 0')
  return InitialState(
      state, shardings, 0, None,
      f'initialised params from {source} ({fresh} kept fresh by init_ignore{lora_note}{grown}); '
      'optimizer state and step start fresh')


def _state_from(source: str, mode: str, fresh: TrainState, abstract: TrainState, shardings,
                remapped) -> InitialState:
  """checkpoint.init_from_state params_and_optimizer | full from a t5lite checkpoint."""
  if remapped:
    raise checkpoints.CheckpointError(
        f'checkpoint.init_from_state={mode!r} takes the checkpoint\'s train state as it is: '
        "checkpoint.init_rename, init_ignore and init_new_rows work with init_from_state='params'")
  loaded, data_state = init_lib.load_state_for_init(source, abstract, mode)
  state = init_lib.merge_init_params(fresh, loaded)
  if mode == 'full':
    step = int(jax.device_get(state.step))
    return InitialState(
        state, shardings, step, data_state,
        f'branched from {source}: its params, optimizer state, step {step} and data position')
  return InitialState(
      state, shardings, 0, None,
      f'initialised params and optimizer state from {source}; the step, the data and the '
      'learning-rate schedule start at 0 (schedule.step_offset shifts the schedule)')


def _split_microbatches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...] taking every k-th row, so each microbatch stays spread over all
  data-parallel devices (rows i, i+k, ... rather than a contiguous block held by few devices)."""

  def split(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    train_cfg, dropout: bool, teacher_model: nn.Module | None = None) -> Callable:
  """The pure train step (unjitted): (state, batch) -> (state, metrics). Reads only
  train_cfg.microbatches, z_loss, label_smoothing, seed and trainable (frozen params: no gradient,
  bitwise unchanged) (and distill_* with a teacher).

  With `teacher_model` (distillation, t5lite/distill.py) the step is (state, batch,
  teacher_params) -> (state, metrics): the teacher's logits (no gradient) enter the loss as
  distill_alpha * T^2 * KL(teacher || student) + (1 - distill_alpha) * cross-entropy, summed per
  target token and normalised like the cross-entropy; metrics gain distill_kl (the KL per target
  token) and `loss` stays the plain cross-entropy, comparable with any other run.

  metrics: loss, z_loss, accuracy, target_tokens, grad_norm, learning_rate and `finite` (1.0 when
  the loss, the z-loss and every gradient of this step are finite, else 0.0). The update is
  applied either way: `watch_train_step` records the first bad step for the host to act on.
  """
  k = int(train_cfg.microbatches)
  z_loss, smoothing = float(train_cfg.z_loss), float(train_cfg.label_smoothing)
  dropout_key = jax.random.PRNGKey(int(train_cfg.seed) + 1)
  if teacher_model is not None:
    alpha, temperature = float(train_cfg.distill_alpha), float(train_cfg.distill_temperature)

  def loss_fn(params, batch, rng, teacher_params=None):
    logits = model.apply({'params': params}, **losses.model_inputs(batch),
                         deterministic=not dropout, rngs={'dropout': rng})
    sums = losses.cross_entropy_sums(logits, batch['decoder_target_tokens'],
                                     batch['decoder_loss_weights'], z_loss, smoothing)
    if teacher_model is None:
      return sums['loss_sum'] + sums['z_loss_sum'], sums
    # Hinton et al. 2015's T^2 keeps the soft term's gradient scale independent of T.
    teacher = distill.teacher_logits(teacher_model, teacher_params, batch)
    sums['kl_sum'] = losses.kl_divergence_sum(teacher, logits, batch['decoder_loss_weights'],
                                              temperature)
    total = alpha * temperature**2 * sums['kl_sum'] + (1.0 - alpha) * sums['loss_sum']
    return total + sums['z_loss_sum'], sums

  # () = all (train.trainable); with LoRA or prompt tuning on, the factors or the prompt and
  # what train.trainable lists
  trainable = optim.trainable_patterns(train_cfg, getattr(model, 'cfg', None))
  grad_fn = jax.grad(optim.frozen_stop_gradient(loss_fn, trainable), has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_params=None):
    rng = jax.random.fold_in(dropout_key, state.step)
    if k == 1:
      grads, sums = grad_fn(state.params, batch, rng, teacher_params)
    else:
      micro = _split_microbatches(batch, k)

      def accumulate(carry, xs):
        i, mb = xs
        mb = {key: nn.with_logical_constraint(v, ('batch', None)) for key, v in mb.items()}
        g, s = grad_fn(state.params, mb, jax.random.fold_in(rng, i), teacher_params)
        return jax.tree.map(jnp.add, carry, (g, s)), None

      names = ('loss_sum', 'z_loss_sum', 'correct_sum', 'weight_sum')
      names += () if teacher_model is None else ('kl_sum',)
      zeros = jax.tree.map(jnp.zeros_like, (state.params, dict.fromkeys(names, 0.0)))
      zeros = jax.tree.map(lambda z: z.astype(jnp.float32), zeros)
      (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
    denominator = jnp.maximum(sums['weight_sum'], 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optim.keep_frozen(optax.apply_updates(state.params, updates), state.params, trainable)
    loss, z = sums['loss_sum'] / denominator, sums['z_loss_sum'] / denominator
    grad_norm = optax.tree.norm(grads)
    metrics = {
        'loss': loss,
        'z_loss': z,
        'accuracy': sums['correct_sum'] / denominator,
        'target_tokens': sums['weight_sum'],
        'grad_norm': grad_norm,
        'learning_rate': jnp.asarray(schedule(state.step), jnp.float32),
        # A nan or inf in any gradient makes the norm nan or inf (sqrt of a sum of squares): three
        # scalar checks cover every gradient without another pass over them. (Finite gradients
        # whose squares overflow float32, norm > ~1.8e19, also count as bad: a divergence anyway.)
        'finite':
            (jnp.isfinite(loss) & jnp.isfinite(z) & jnp.isfinite(grad_norm)).astype(jnp.float32),
    }
    if teacher_model is not None:
      metrics['distill_kl'] = sums['kl_sum'] / denominator
      metrics['finite'] = metrics['finite'] * jnp.isfinite(metrics['distill_kl'])
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: nn.Module, param_shardings, mesh: Mesh,
                   rules) -> partitioning.Partitioned:
  """jitted (params, batch) -> summed loss / correct / weight over the batch's target tokens, with
  the params in their training shardings; dropout off, no z-loss or label smoothing (so the
  validation loss is the plain cross-entropy per target token, comparable across configs)."""

  def eval_step(params, batch):
    logits = model.apply({'params': params}, **losses.model_inputs(batch), deterministic=True)
    return losses.cross_entropy_sums(logits, batch['decoder_target_tokens'],
                                     batch['decoder_loss_weights'])

  return partitioning.jit(eval_step, mesh, rules,
                          in_shardings=(param_shardings, partitioning.batch_sharding(mesh, rules)),
                          out_shardings=NamedSharding(mesh, P()))


@flax.struct.dataclass
class Watch:
  """What the jitted step tracks across steps on the device, so the host needs no sync per step
  (it reads this at log and save steps only, `read_watch`). Replicated int32 scalars:

  first_bad_step: the 1-based number of the first step whose loss, z-loss or gradients were
    non-finite; 0 while there was none. It never changes once set: the params of that step's
    input (the checkpoint of step first_bad_step - 1) and everything after are suspect.
  dead_steps: consecutive steps, up to the last, whose gradient norm was exactly 0 while the loss
    was > 0 (a dead run: nothing can move any more; a live model with loss > 0 always has some
    nonzero gradient at its output layer). Reset by any other step.
  last_step: the number of the last step run.
  """
  first_bad_step: jax.Array
  dead_steps: jax.Array
  last_step: jax.Array


def initial_watch(mesh: Mesh) -> Watch:
  """A fresh Watch (nothing seen yet), replicated over `mesh`."""
  zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, P()))
  return Watch(first_bad_step=zero(), dead_steps=zero(), last_step=zero())


def watch_train_step(train_step: Callable) -> Callable:
  """(state, batch) -> (state, metrics) made (state, batch, watch) -> (state, metrics, watch):
  the same step, plus a few scalar ops updating the Watch from its metrics. Arguments after the
  watch (a distillation teacher's params) go on to the step."""

  def watched(state: TrainState, batch: dict[str, jax.Array], watch: Watch, *extra):
    number = state.step + 1  # this step's 1-based number (the step its checkpoint would carry)
    state, metrics = train_step(state, batch, *extra)
    bad = metrics['finite'] == 0
    first_bad = jnp.where((watch.first_bad_step == 0) & bad, number, watch.first_bad_step)
    # Exactly 0: what a dead run really shows (Adafactor at lr 1e6: every gradient underflows to
    # 0 from step 3 on); a nan norm is not 0, so it resets the count (first_bad_step has it).
    dead = (metrics['grad_norm'] == 0) & (metrics['loss'] > 0)
    dead_steps = jnp.where(dead, watch.dead_steps + 1, 0)
    return state, metrics, Watch(first_bad_step=first_bad.astype(jnp.int32),
                                 dead_steps=dead_steps.astype(jnp.int32),
                                 last_step=number.astype(jnp.int32))

  return watched


@dataclasses.dataclass(frozen=True)
class WatchReport:
  """A Watch on the host. first_bad_step: None while every step was finite."""
  first_bad_step: int | None
  dead_steps: int
  last_step: int


def read_watch(watch: Watch) -> WatchReport:
  """Fetches the Watch (three scalars: one small device_get; call it at log or save steps)."""
  first_bad, dead, last = (
      int(x) for x in jax.device_get((watch.first_bad_step, watch.dead_steps, watch.last_step)))
  return WatchReport(first_bad_step=first_bad or None, dead_steps=dead, last_step=last)


def jit_train_step(train_step: Callable, state_shardings: TrainState, mesh: Mesh, rules,
                   watch: bool = False, teacher_shardings=None) -> partitioning.Partitioned:
  """The train step jitted with shardings (this is pjit), entering mesh and rules on each call;
  the input state is donated. `.lower(state, batch)` compiles ahead of time.

  watch=True: jits `watch_train_step(train_step)` instead, called as
  `state, metrics, watch = step(state, batch, watch)` with a Watch from `initial_watch(mesh)`
  (replicated; not donated, it is three scalars).

  teacher_shardings (distillation): the step takes the teacher's params as its last argument,
  in these shardings, not donated (distill.bind passes them on every call).
  """
  replicated = NamedSharding(mesh, P())
  batch_sharding = partitioning.batch_sharding(mesh, rules)
  teacher = () if teacher_shardings is None else (teacher_shardings,)
  if watch:
    return partitioning.jit(watch_train_step(train_step), mesh, rules,
                            in_shardings=(state_shardings, batch_sharding, replicated) + teacher,
                            out_shardings=(state_shardings, replicated, replicated),
                            donate_argnums=(0,))
  return partitioning.jit(train_step, mesh, rules,
                          in_shardings=(state_shardings, batch_sharding) + teacher,
                          out_shardings=(state_shardings, replicated), donate_argnums=(0,))


@jax.jit
def all_finite(tree) -> jax.Array:
  """True when every floating-point leaf is free of inf and nan."""
  leaves = [
      jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
