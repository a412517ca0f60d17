"""The `model.kernels` switch: 'xla' (plain jnp formulations, JAX autodiff) gives the same loss and
gradients as 'auto' (the tuned custom VJPs in t5lite/models/kernels/), and traces no custom VJP
and no hardware probe. The path is chosen by the config, never by patching."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.models.kernels import matmul
from t5lite.models.presets import ModelConfig, model_config
from t5lite.models.t5 import make_model


def tiny(kernels, dtype, architecture='encoder_decoder', variant='v1_1', **overrides):
  c = model_config('tiny', variant=variant, vocab_size=128, architecture=architecture)
  c.update(dtype=dtype, kernels=kernels, **overrides)
  return ModelConfig.from_config(c)


def batch(architecture, seed=0):
  rng = np.random.RandomState(seed)
  targets = rng.randint(2, 128, (4, 12))
  targets[1, 7:] = targets[3, 4:] = 0  # padding
  out = dict(decoder_input_tokens=np.concatenate([np.zeros((4, 1), int), targets[:, :-1]], 1),
             decoder_target_tokens=targets)
  if architecture == 'encoder_decoder':
    inputs = rng.randint(2, 128, (4, 16))
    inputs[2, 9:] = 0
    out['encoder_input_tokens'] = inputs
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


def loss_and_grads(cfg, data, dropout_key=None):
  model = make_model(cfg)
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
def test_xla_kernels_match_auto(architecture, variant, overrides, dtype):
  if dtype == 'bfloat16' and not matmul.mixed_precision_supported():
    pytest.skip("this CPU has no bf16 x bf16 -> f32 dots: 'xla' in bfloat16 cannot run here")
  data = batch(architecture)
  key = jax.random.PRNGKey(3) if overrides.get('dropout_rate') else None
  results = {
      k: loss_and_grads(tiny(k, dtype, architecture, variant, **overrides), data, key)
      for k in ('auto', 'xla')
  }
  (auto_loss, auto_grads), (xla_loss, xla_grads) = results['auto'], results['xla']
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
    err = np.linalg.norm(x - a) / max(np.linalg.norm(a), 1e-30)
    assert err < (1e-5 if dtype == 'float32' else 3e-2), (jax.tree_util.keystr(path), err)


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
    model = make_model(tiny(kernels, 'bfloat16', scan_layers=scan_layers))
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
  data = batch('decoder_only')
  model = make_model(tiny('fast', 'float32', 'decoder_only'))
  with pytest.raises(ValueError, match="unknown model.kernels 'fast'; valid: auto, xla"):
    model.init(jax.random.PRNGKey(0), **data)
