"""Distillation (train.distill_*): the KL term against numpy; a student equal to its teacher has KL
0 and (1 - alpha) times the cross-entropy's gradient, on one device and on a sharded mesh with
microbatches; the teacher's config is checked against the student's; a small student distilled
from a tiny trained teacher on the quickstart's task moves toward it (vs the same steps of plain
cross-entropy), and a distillation run resumes bitwise."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5lite import checkpoints, config_files, distill, losses, partitioning, train, trainer
from t5lite import config as config_lib
from t5lite.data import pipeline
from t5lite.models.presets import ModelConfig, model_config
from t5lite.models.t5 import make_model


def numpy_kl_sum(teacher, student, weights, temperature):
  """sum_positions w * sum_v p_t (log p_t - log p_s), float64, softmaxes at `temperature`."""

  def log_softmax(x):
    x = np.asarray(x, np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  log_t, log_s = log_softmax(teacher), log_softmax(student)
  kl = (np.exp(log_t) * (log_t - log_s)).sum(-1)
  return float((kl * weights).sum())


@pytest.mark.parametrize('temperature', [1.0, 2.5])
def test_kl_matches_numpy(temperature):
  rng = np.random.RandomState(0)
  teacher = rng.randn(3, 5, 37).astype(np.float32) * 3
  student = rng.randn(3, 5, 37).astype(np.float32) * 3
  weights = (rng.rand(3, 5) > 0.3).astype(np.float32)
  student[0, 0] = np.nan  # a padding position (weight 0) whose logits are not even finite
  weights[0, 0] = 0.0
  got = float(losses.kl_divergence_sum(teacher, student, weights, temperature))
  want = numpy_kl_sum(teacher, np.nan_to_num(student), weights, temperature)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert want > 1.0  # random logits are far apart: the check is not of zeros
  assert float(losses.kl_divergence_sum(teacher, teacher, weights, temperature)) == 0.0


def small_config(**train_fields):
  c = config_lib.base_config()
  c.model = model_config('tiny', vocab_size=256)
  c.model.update(d_model=64, d_ff=128, num_heads=8, head_dim=8, attention_dim=64, dtype='float32',
                 num_encoder_layers=1, num_decoder_layers=1)
  c.train.update(batch_size=8, z_loss=0.0, distill_alpha=0.3, distill_temperature=2.0)
  c.train.update(train_fields)
  return c


def synthetic_batch(batch_size=8, seed=0):
  rng = np.random.RandomState(seed)
  dec_seg = np.repeat(np.array([1] * 5 + [2] * 2 + [0])[None], batch_size, 0)
  targets = rng.randint(3, 256, (batch_size, 8)) * (dec_seg > 0)
  dec_in = np.zeros_like(targets)
  dec_in[:, 1:] = targets[:, :-1]
  return dict(encoder_input_tokens=rng.randint(3, 256, (batch_size, 12)).astype(np.int32),
              decoder_input_tokens=dec_in.astype(np.int32),
              decoder_target_tokens=targets.astype(np.int32),
              decoder_loss_weights=(dec_seg > 0).astype(np.float32))


def keep_the_gradient(grads, state, params=None):
  """An optax update that moves nothing and keeps the gradient as its state."""
  del state, params
  return jax.tree.map(jnp.zeros_like, grads), grads


@pytest.mark.parametrize('devices,mesh_shape,microbatches', [(1, (1, 1, 1), 1), (8, (2, 2, 2), 2)])
def test_student_equal_to_teacher_has_kl_0_and_the_scaled_ce_gradient(devices, mesh_shape,
                                                                      microbatches):
  """KL(p || p) = 0 and its gradient (p_s - p_t) / T vanishes, so the gradient is (1 - alpha)
  times the cross-entropy's. The 'optimizer' keeps the step's gradient as its state."""
  config = small_config(microbatches=microbatches)
  mesh = partitioning.make_mesh(mesh_shape, jax.devices()[:devices])
  rules = config.partitioning.rules
  model = make_model(ModelConfig.from_config(config.model))
  tx = optax.GradientTransformation(init=lambda p: jax.tree.map(jnp.zeros_like, p),
                                    update=keep_the_gradient)
  schedule = optax.constant_schedule(1.0)
  batch = synthetic_batch()
  state, shardings = trainer.init_train_state(model, tx, mesh, rules, batch, 0)
  params = jax.device_get(state.params)
  global_batch = partitioning.host_to_global(batch, partitioning.batch_sharding(mesh, rules))
  plain = trainer.jit_train_step(trainer.make_train_step(model, tx, schedule, config.train, False),
                                 shardings, mesh, rules)
  distilled = trainer.jit_train_step(
      trainer.make_train_step(model, tx, schedule, config.train, False, teacher_model=model),
      shardings, mesh, rules, teacher_shardings=shardings.params)
  # The teacher's params: a copy of the student's (the step donates the state it is given).
  teacher = jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings.params)
  after_distill, m_distill = distilled(state, global_batch, teacher)
  state, _ = trainer.init_train_state(model, tx, mesh, rules, batch, 0)
  after_plain, m_plain = plain(state, global_batch)
  assert abs(float(m_distill['distill_kl'])) <= 1e-7
  assert float(m_distill['loss']) == pytest.approx(float(m_plain['loss']), rel=1e-6)
  grad_distill, grad_plain = jax.device_get((after_distill.opt_state, after_plain.opt_state))
  for g_d, g_p in zip(jax.tree.leaves(grad_distill), jax.tree.leaves(grad_plain)):
    # Float32 rounding of the backward pass, relative to the leaf's scale (not per element: an
    # element near 0 is a difference of larger terms).
    np.testing.assert_allclose(g_d, (1 - 0.3) * g_p, rtol=1e-5, atol=1e-5 * np.abs(g_p).max())
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grad_plain)) > 1e-3


def test_a_teacher_of_another_vocabulary_or_architecture_is_a_config_error(tmp_path):
  student = ModelConfig.from_config(small_config().model)
  saved = checkpoints.Checkpointer(str(tmp_path / 't'), async_save=False)
  params = {'w': np.zeros((2,), np.float32)}
  teacher_model = dict(small_config().model.to_dict(), vocab_size=512)
  saved.save(0, {'params': params}, {}, {'model': teacher_model})
  saved.close()
  c = small_config(distill_teacher=str(tmp_path / 't'))
  with pytest.raises(config_lib.ConfigError, match=r'vocab_size=512 .*vocab_size=256'):
    distill.teacher_config(c.train, student)
  c.train.distill_teacher = str(tmp_path / 'nothing')
  with pytest.raises(config_lib.ConfigError, match='distill_teacher=.*no complete t5lite'):
    distill.teacher_config(c.train, student)
  c.train.distill_teacher = 't5x:' + str(tmp_path)
  with pytest.raises(config_lib.ConfigError, match='t5x-to-t5lite'):
    distill.teacher_config(c.train, student)
  c.train.distill_teacher = ''
  assert distill.teacher_config(c.train, student) is None
  c.train.distill_alpha = 1.5
  with pytest.raises(config_lib.ConfigError, match=r'distill_alpha=1.5: must be in \[0, 1\]'):
    config_lib.validate(c, 1)


def test_an_hf_teacher_brings_its_own_config_and_params(tmp_path):
  """hf:DIR: the model config from its config.json (not the student's), the params converted
  onto the mesh, logits equal to the model that was written."""
  from t5lite import hf  # pylint: disable=import-outside-toplevel
  teacher_cfg = small_config().model
  teacher_cfg.update(d_model=48, num_heads=2, head_dim=24, attention_dim=48, d_ff=96)
  model = make_model(ModelConfig.from_config(teacher_cfg))
  batch = synthetic_batch()
  params = jax.device_get(model.init(jax.random.PRNGKey(3), **losses.model_inputs(batch)))
  params = jax.tree.map(lambda x: getattr(x, 'value', x), params['params'],
                        is_leaf=lambda x: hasattr(x, 'value'))
  hf.save_hf(params, teacher_cfg, str(tmp_path / 'hf'))
  c = small_config(distill_teacher='hf:' + str(tmp_path / 'hf'))
  found = distill.teacher_config(c.train, ModelConfig.from_config(c.model))
  assert (found.model.d_model, found.model.num_heads, found.model.d_ff) == (48, 2, 96)
  assert found.model.dtype == 'float32'  # hf: records none: the student's
  mesh = partitioning.make_mesh((2, 2, 2), jax.devices())
  teacher = distill.load_teacher(found, mesh, c.partitioning.rules, batch)
  got = distill.teacher_logits(teacher.model, teacher.params, batch)
  want = model.apply({'params': params}, **losses.model_inputs(batch))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


# --- on the quickstart's task: a tiny trained teacher, a smaller student


def quickstart(steps, **train_fields):
  c = config_files.load_config_file(
      os.path.join(os.path.dirname(__file__), '..', 'configs', 'quickstart.py'))
  c.model.update(dtype='float32', num_encoder_layers=1, num_decoder_layers=1)
  c.data.inputs_length = 64
  c.train.update(steps=steps, batch_size=8, log_every=5, **train_fields)
  c.schedule.warmup_steps = 2
  c.reporting.update(tensorboard=False, peak_flops_per_device=1e11)
  c.eval.every_steps = 0
  c.checkpoint.update(every_steps=10, async_save=False)
  return c


def student_config(steps, teacher, alpha):
  c = quickstart(steps, distill_teacher=teacher, distill_alpha=alpha, distill_temperature=2.0,
                 microbatches=2)
  c.model.update(d_model=32, d_ff=64, num_heads=2, head_dim=16, attention_dim=32)
  c.mesh.update(data=2, fsdp=2, tensor=2)  # the teacher is sharded by the same rules
  c.optimizer.learning_rate = 0.01
  c.schedule.name = 'constant'  # the same rates whatever train.steps says: resumable to more steps
  return c


def held_out_batches(config, n=2):
  """The first `n` batches of 16 of the held-out split (model inputs and loss weights)."""
  _, vocabulary = train.build_data(config)
  it = pipeline.make_task_iterator(config.data.task, feature_lengths=train.feature_lengths(config),
                                   global_batch_size=16, seed=0, split='validation', shuffle=False,
                                   repeat=False, vocabulary=vocabulary)
  return [batch for _, batch in zip(range(n), it)]


def held_out_kl(batches, student_apply, student_params, teacher_apply, teacher_params):
  """KL(teacher || student) per target token at T = 1 over `batches`, in numpy from each model's
  logits."""
  total = weight = 0.0
  for batch in batches:
    inputs = losses.model_inputs(batch)
    s = student_apply({'params': student_params}, **inputs)
    t = teacher_apply({'params': teacher_params}, **inputs)
    total += numpy_kl_sum(t, s, batch['decoder_loss_weights'], 1.0)
    weight += float(batch['decoder_loss_weights'].sum())
  return total / weight


def test_distilling_moves_the_student_toward_the_teacher_and_resumes_bitwise(tmp_path):
  teacher_dir = str(tmp_path / 'teacher')
  train.run(quickstart(30), teacher_dir)
  _, teacher_state = checkpoints.restore_as_numpy(teacher_dir)
  config = student_config(20, teacher_dir, 1.0)
  teacher_cfg = distill.teacher_config(
      config_lib.resolve(config).train, ModelConfig.from_config(config.model))
  assert teacher_cfg.model.d_model == 128 and teacher_cfg.path.endswith('checkpoints/30')

  distilled_dir, ce_dir, resumed_dir = (tmp_path / n for n in ('kd', 'ce', 'resumed'))
  history = train.run(config, str(distilled_dir))
  assert all(np.isfinite(r['distill_kl']) for r in history)
  train.run(student_config(20, teacher_dir, 0.0), str(ce_dir))
  _, kd = checkpoints.restore_as_numpy(str(distilled_dir))
  _, ce = checkpoints.restore_as_numpy(str(ce_dir))
  _, kd_10 = checkpoints.restore_as_numpy(str(distilled_dir), 10)
  student = make_model(ModelConfig.from_config(config.model))
  fresh, _ = trainer.init_train_state(student, optax.identity(),
                                      partitioning.make_mesh(
                                          (1, 1, 1),
                                          jax.devices()[:1]), config.partitioning.rules,
                                      synthetic_batch(), config.train.seed)
  batches = held_out_batches(config)
  student_apply = jax.jit(student.apply)
  teacher_apply = jax.jit(make_model(teacher_cfg.model).apply)
  kls = {
      name: held_out_kl(batches, student_apply, params, teacher_apply, teacher_state['params'])
      for name, params in (('init', jax.device_get(fresh.params)), ('kd_10', kd_10['params']),
                           ('kd', kd['params']), ('ce', ce['params']))
  }
  print('held-out KL(teacher || student) per target token:', kls)
  assert kls['kd'] < kls['kd_10'] < kls['init']
  assert kls['kd'] < kls['ce']

  # Resume: from the distillation run's step 10 (copied to a new workdir with the record of its
  # teacher), the same command trains to 20 with the teacher read again: bitwise the steps 11..20
  # of the run in one go, although the teacher's workdir has trained on to step 35 meanwhile
  # (the run reads the step it began with, distill.pin).
  shutil.copytree(distilled_dir / 'checkpoints' / '10', resumed_dir / 'checkpoints' / '10')
  shutil.copy(distilled_dir / distill.PIN_FILE, resumed_dir / distill.PIN_FILE)
  train.run(quickstart(35), teacher_dir)
  assert checkpoints.resolve_init_path(teacher_dir).endswith('checkpoints/35')
  history = train.run(config, str(resumed_dir))
  assert [r['step'] for r in history][0] == 15
  _, resumed = checkpoints.restore_as_numpy(str(resumed_dir))
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(kd)):
    np.testing.assert_array_equal(a, b)
