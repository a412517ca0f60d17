"""The `model.kernels` switch: 'auto' resolves to 'tuned' (the custom VJPs in
t5lite/models/kernels/) on CPU and to 'xla' (plain formulations, jax.nn.dot_product_attention,
JAX autodiff) on TPU and GPU; both give the same loss and gradients, 'xla' traces no custom VJP
and no hardware probe, and the probe 'tuned' needs runs once, in make_model, never while a step
is traced. The path is chosen by the config and the platform, never by patching."""
import functools
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.models import kernels as kernels_lib
from t5lite.models.kernels import matmul
from t5lite.models.presets import ModelConfig, model_config
from t5lite.models.t5 import make_model


def tiny(kernels, dtype, architecture='encoder_decoder', variant='v1_1', **overrides):
  c = model_config('tiny', variant=variant, vocab_size=128, architecture=architecture)
  c.update(dtype=dtype, kernels=kernels, **overrides)
  return ModelConfig.from_config(c)


def batch(architecture, seed=0):
  """Four rows: one packing two examples (segment ids 1 and 2, each decoder segment starting
  from BOS), the rest single examples, three of them with padding (segment 0: fully masked
  query rows in attention)."""
  rng = np.random.RandomState(seed)
  targets = rng.randint(2, 128, (4, 12))
  targets[1, 7:] = targets[3, 4:] = 0  # padding
  targets[0, 11:] = 0
  segments = (targets > 0).astype(int)
  segments[0, 6:11] = 2  # row 0: two packed examples, then one padding token
  inputs = np.concatenate([np.zeros((4, 1), int), targets[:, :-1]], 1)
  inputs[0, 6] = 0  # the second packed example starts from BOS too
  out = dict(decoder_input_tokens=inputs, decoder_target_tokens=targets,
             decoder_segment_ids=segments)
  if architecture == 'encoder_decoder':
    encoder = rng.randint(2, 128, (4, 16))
    encoder[2, 9:] = encoder[0, 14:] = 0
    encoder_segments = (encoder > 0).astype(int)
    encoder_segments[0, 8:14] = 2
    out.update(encoder_input_tokens=encoder, encoder_segment_ids=encoder_segments)
  return {k: np.asarray(v, np.int32) for k, v in out.items()}


def loss_fn(model, data, dropout_key=None):
  """Mean token cross-entropy over the non-padding targets."""

  def loss(params):
    rngs = None if dropout_key is None else {'dropout': dropout_key}
    logits = model.apply({'params': params}, **data, deterministic=dropout_key is None, rngs=rngs)
    log_probs = jax.nn.log_softmax(logits)
    targets = data['decoder_target_tokens']
    token = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    weights = (targets > 0).astype(jnp.float32)
    return -jnp.sum(token * weights) / jnp.sum(weights)

  return loss


def loss_and_grads(cfg, data, dropout_key=None, platform='cpu'):
  model = make_model(cfg, platform)
  params = model.init(jax.random.PRNGKey(0), **data)['params']
  return jax.jit(jax.value_and_grad(loss_fn(model, data, dropout_key)))(params)


CASES = [
    ('encoder_decoder', 'v1_1', {}),
    ('encoder_decoder', 'v1_0', {}),  # ReLU MLP, tied logits (Embed.attend)
    ('decoder_only', 'v1_1', {}),
    ('encoder_decoder', 'v1_1', {'scan_layers': True, 'remat_policy': 'minimal'}),
    ('encoder_decoder', 'v1_1', {'dropout_rate': 0.1}),  # the attention dropout's keep mask too
]


@pytest.mark.parametrize('architecture,variant,overrides,dtype',
                         [case + ('float32',) for case in CASES]
                         + [case + ('bfloat16',) for case in CASES[:3]],
                         ids=lambda v: '+'.join(v) or 'plain' if isinstance(v, dict) else str(v))
def test_xla_kernels_match_tuned(architecture, variant, overrides, dtype):
  """'auto' on CPU (the tuned custom VJPs) against 'xla' (jax.nn.dot_product_attention or, with
  dropout, the plain einsum attention; plain einsums and norm; autodiff), on packed and padded
  rows: the loss and every parameter's gradient."""
  if dtype == 'bfloat16' and not matmul.mixed_precision_supported():
    pytest.skip("this CPU has no bf16 x bf16 -> f32 dots: 'xla' in bfloat16 cannot run here")
  data = batch(architecture)
  key = jax.random.PRNGKey(3) if overrides.get('dropout_rate') else None
  results = {
      k: loss_and_grads(tiny(k, dtype, architecture, variant, **overrides), data, key)
      for k in ('auto', 'xla')
  }
  (auto_loss, auto_grads), (xla_loss, xla_grads) = results['auto'], results['xla']
  assert np.isfinite(auto_loss) and np.isfinite(xla_loss)
  # float32: the same numbers up to summation order; bfloat16: up to bf16 rounding of the
  # backward's intermediates (which the two paths round at different places).
  rtol = 1e-5 if dtype == 'float32' else 2e-2
  np.testing.assert_allclose(xla_loss, auto_loss, rtol=rtol)
  flat_auto = jax.tree_util.tree_flatten_with_path(auto_grads)[0]
  flat_xla = jax.tree.leaves(xla_grads)
  assert len(flat_auto) == len(flat_xla)
  for (path, a), x in zip(flat_auto, flat_xla):
    a, x = np.asarray(a, np.float64), np.asarray(x, np.float64)
    assert a.dtype == x.dtype and a.shape == x.shape
    assert np.isfinite(x).all(), jax.tree_util.keystr(path)
    err = np.linalg.norm(x - a) / max(np.linalg.norm(a), 1e-30)
    assert err < (1e-5 if dtype == 'float32' else 3e-2), (jax.tree_util.keystr(path), err)


def step_jaxpr(model, data):
  """The traced train step (loss and gradients) from abstract parameters: nothing runs."""
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **data))['params']
  return jax.make_jaxpr(jax.value_and_grad(loss_fn(model, data)))(params)


@pytest.mark.parametrize('architecture', ['encoder_decoder', 'decoder_only'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_auto_on_tpu_is_the_xla_step(architecture, dtype):
  """make_model for a TPU (as t5lite.aot does, on this CPU host) resolves 'auto' to 'xla': the
  step it traces is the 'xla' step, equation for equation (so its loss and gradients are those
  test_xla_kernels_match_tuned checks), and not the CPU's tuned one."""
  data = batch(architecture)
  on_tpu = make_model(tiny('auto', dtype, architecture), 'tpu')
  xla = make_model(tiny('xla', dtype, architecture), 'cpu')
  tuned = make_model(tiny('auto', dtype, architecture), 'cpu')
  assert (on_tpu.cfg.kernels, xla.cfg.kernels, tuned.cfg.kernels) == ('xla', 'xla', 'tuned')
  want = str(step_jaxpr(xla, data))
  assert str(step_jaxpr(on_tpu, data)) == want
  assert str(step_jaxpr(tuned, data)) != want  # the comparison tells the two paths apart


def test_resolve():
  resolve = kernels_lib.resolve
  assert resolve('auto', 'cpu') == 'tuned'
  for platform in ('tpu', 'gpu', 'cuda', 'rocm'):
    assert resolve('auto', platform) == 'xla'
  for platform in ('cpu', 'tpu'):  # a resolved value is kept, whatever the platform
    assert resolve('xla', platform) == 'xla'
    assert resolve('tuned', platform) == 'tuned'
  with pytest.raises(ValueError, match="unknown model.kernels 'fast'"):
    resolve('fast', 'cpu')
  # A layer built with 'auto' directly resolves it by the default backend (CPU in these tests).
  assert jax.default_backend() == 'cpu'
  assert not kernels_lib.plain('auto') and not kernels_lib.plain('tuned')
  assert kernels_lib.plain('xla')


@pytest.fixture(name='probe_runs')
def fixture_probe_runs(monkeypatch):
  """Replaces matmul._probe by a cached probe of its own that records, for each run of the real
  probe (a cache miss), whether make_model was on the stack. (mixed_precision_supported looks
  _probe up at each call, so every probe goes through the replacement.)"""
  runs = []
  original = matmul._probe.__wrapped__  # pylint: disable=protected-access

  @functools.lru_cache(maxsize=None)
  def probe(platform):
    runs.append('make_model' in {frame.name for frame in traceback.extract_stack()})
    return original(platform)

  monkeypatch.setattr(matmul, '_probe', probe)
  return runs, probe


@pytest.mark.parametrize('architecture', ['encoder_decoder', 'decoder_only'])
def test_probe_runs_once_at_make_model_and_never_while_tracing(architecture, probe_runs):
  runs, probe = probe_runs
  data = batch(architecture)

  def lower(model):
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **data))['params']
    jax.jit(jax.value_and_grad(loss_fn(model, data))).lower(params)

  # On a TPU (or compiling for one from this host) there is nothing to probe: 'xla'.
  lower(make_model(tiny('auto', 'bfloat16', architecture), 'tpu'))
  assert not runs
  # On CPU in bfloat16, the tuned kernels' probe: once, in make_model; tracing and lowering the
  # step (whose tuned kernels ask for it again) only read its result.
  model = make_model(tiny('auto', 'bfloat16', architecture), 'cpu')
  assert runs == [True]
  lower(model)
  lower(model)
  assert runs == [True]
  # In float32 the tuned kernels need no bf16 dots: make_model probes nothing.
  probe.cache_clear()
  runs.clear()
  lower(make_model(tiny('auto', 'float32', architecture), 'cpu'))
  assert not runs
  # The record sees a probe outside make_model: with its result forgotten, the traced step runs it.
  probe.cache_clear()
  lower(model)
  assert runs == [False]


def primitives(jaxpr, out=None):
  """Names of every primitive in a jaxpr, sub-jaxprs (jit, scan, remat, custom_vjp) included."""
  out = set() if out is None else out
  for eqn in jaxpr.eqns:
    out.add(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if hasattr(sub, 'eqns'):
          primitives(sub, out)
        elif hasattr(sub, 'jaxpr'):
          primitives(sub.jaxpr if hasattr(sub.jaxpr, 'eqns') else sub.jaxpr.jaxpr, out)
  return out


@pytest.mark.parametrize('scan_layers', [False, True])
def test_xla_kernels_trace_no_custom_vjp_and_no_probe(scan_layers):
  """A train step differentiates the loss; autodiff inlines custom VJPs (their forward and
  backward rules), so the marker is looked for in the loss the step differentiates, and the
  step itself is traced too, with the probe's cache emptied first."""
  data = batch('encoder_decoder')
  found = {}
  for kernels in ('auto', 'xla'):
    model = make_model(tiny(kernels, 'bfloat16', scan_layers=scan_layers), 'cpu')
    params = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), **data))['params']
    loss = loss_fn(model, data)
    found[kernels] = {
        name for name in primitives(jax.make_jaxpr(loss)(params).jaxpr) if 'custom' in name
    }
    if kernels == 'xla':
      matmul._probe.cache_clear()  # pylint: disable=protected-access
      step = jax.make_jaxpr(jax.value_and_grad(loss))(params)
      assert not {name for name in primitives(step.jaxpr) if 'custom' in name}
      assert matmul._probe.cache_info().misses == 0  # pylint: disable=protected-access
  assert 'custom_vjp_call' in found['auto']  # the check sees them where they are
  assert not found['xla'], found['xla']


def test_unknown_kernels_value_is_refused():
  with pytest.raises(ValueError, match="unknown model.kernels 'fast'; valid: auto, xla"):
    make_model(tiny('fast', 'float32', 'decoder_only'), 'cpu')
