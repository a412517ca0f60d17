"""No involuntary rematerialization: the train, eval and decode steps compiled for the supported
meshes (data, fsdp, tensor and their combinations; 8 CPU devices and a TPU v5e:2x2 topology
through libtpu) make XLA's SPMD partitioner print no "Involuntary full rematerialization" (a
resharding it can only do by replicating the whole array on every device, then slicing it).

The partitioner logs it from C++: to file descriptor 2 on CPU (seen by pytest's capfd), and into
libtpu's own log files (TPU_LOG_DIR, by default /tmp/tpu_logs, one per process, named after its
pid) when compiling for a TPU, unless TPU_STDERR_LOG_LEVEL sends them to fd 2 as well: both are
read. A control compiles the token-embedding lookup that used to trigger it (a plain jnp.take of
the [vocab/tensor, embed/fsdp] table for a batch split over data and fsdp) and checks that the
warning is seen there, on CPU and for the TPU, so that a silent log cannot pass for a clean one.

The fix (t5lite/models/layers.py Embed) must not change a number: its lookup and the table's
gradient are compared with an unsharded jnp.take, bit for bit.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from t5lite import aot, cli, partitioning
from t5lite.data import catalog  # pylint: disable=unused-import  (registers the quickstart's task)
from t5lite.models import layers, presets

WARNING = 'Involuntary full rematerialization'
VOCAB, D_MODEL = 2048, 128


def _libtpu_logs() -> list[str]:
  """This process's libtpu log files (glog names them ...log.LEVEL.DATE-TIME.PID)."""
  folder = os.environ.get('TPU_LOG_DIR', '/tmp/tpu_logs')
  return glob.glob(os.path.join(folder, f'*.log.*.{os.getpid()}'))


@contextlib.contextmanager
def xla_log(capfd):
  """Collects what XLA logs inside: fd 2 (capfd) and what libtpu appends to its log files.
  Yields a list that holds the text once the block has ended."""
  sizes = {path: os.path.getsize(path) for path in _libtpu_logs()}
  capfd.readouterr()
  text = []
  yield text
  out, err = capfd.readouterr()
  text.append(out + err)
  for path in _libtpu_logs():
    with open(path, errors='replace') as f:
      f.seek(sizes.get(path, 0))
      text.append(f.read())


def _devices(platform: str, count: int):
  if platform == 'cpu':
    return jax.devices()[:count]
  return aot.topology_devices('v5e:2x2')


def _quickstart():
  """configs/quickstart.py as a module (its get_config builds the ConfigDict)."""
  path = os.path.join(os.path.dirname(__file__), '..', 'configs', 'quickstart.py')
  spec = importlib.util.spec_from_file_location('quickstart_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config(mesh, variant='v1_1', architecture='encoder_decoder'):
  """The quickstart, shrunk to compile fast: one layer per stack, short sequences, 8 rows."""
  c = _quickstart().get_config()
  c.model = presets.model_config('tiny', variant=variant, vocab_size=VOCAB,
                                 architecture=architecture)
  c.model.dtype = 'bfloat16'
  if architecture == 'decoder_only':
    c.data.converter = 'prefix_lm'  # decoder_prompt_tokens and bidirectional inputs
  c.model.num_encoder_layers = c.model.num_decoder_layers = 1
  c.data.inputs_length = 16
  c.train.batch_size = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c


# Every combination of two or three mesh axes, on 8 CPU devices and on the 4 devices of a v5e:2x2,
# and each kind of model (v1.1, v1.0 with logits tied to the embedding, decoder-only) on a mesh
# that used to warn. Before the fix, every mesh with data and fsdp both > 1 did (CPU 2x2x2 in
# every step, per lookup and per gradient; CPU 2x4x1 and TPU 2x2x1 in the train step's gradient);
# single-axis meshes and the others here never did.
CASES = [
    ('cpu', (2, 2, 2), 'v1_1', 'encoder_decoder'),
    ('cpu', (2, 2, 2), 'v1_0', 'decoder_only'),
    ('cpu', (2, 4, 1), 'v1_1', 'decoder_only'),
    ('tpu', (2, 2, 1), 'v1_0', 'encoder_decoder'),
    ('tpu', (2, 2, 1), 'v1_1', 'decoder_only'),
    ('tpu', (1, 2, 2), 'v1_0', 'decoder_only'),
    ('tpu', (2, 1, 2), 'v1_1', 'encoder_decoder'),
]


@pytest.mark.parametrize('platform,mesh,variant,architecture', CASES,
                         ids=[f'{p}-{"x".join(map(str, m))}-{v}-{a}' for p, m, v, a in CASES])
def test_train_eval_and_decode_compile_without_involuntary_remat(capfd, platform, mesh, variant,
                                                                 architecture):
  devices = _devices(platform, int(np.prod(mesh)))
  built = cli.build(_config(mesh, variant, architecture), devices)
  assert built.model.cfg.tie_logits == (variant == 'v1_0')
  with xla_log(capfd) as log:
    compiled = aot.compile_steps(built, ('train', 'eval', 'decode'))
  assert set(compiled) == {'train', 'eval', 'decode'}
  for name, executable in compiled.items():
    assert executable.memory_analysis() is not None, name  # really compiled, for these devices
    assert {d.platform for d in jax.tree.leaves(executable.input_shardings)[0].device_set
           } == {platform}, name
  text = ''.join(log)
  assert WARNING not in text, '\n'.join(line for line in text.splitlines() if WARNING in line)


def _plain_lookup_step(mesh):
  """The lookup as it was (jnp.take of the table in its parameter sharding) and its gradient,
  jitted with the model's shardings: the table [vocab/tensor, embed/fsdp], the ids and the rows
  split over data+fsdp."""
  rows_sharding = NamedSharding(mesh, P(('data', 'fsdp'), None, None))

  def loss(table, ids):
    rows = jax.lax.with_sharding_constraint(jnp.take(table, ids, axis=0), rows_sharding)
    return jnp.sum(rows)

  shardings = (NamedSharding(mesh, P('tensor', 'fsdp')), NamedSharding(mesh, P(('data', 'fsdp'))))
  return jax.jit(jax.grad(loss), in_shardings=shardings, out_shardings=shardings[0])


@pytest.mark.parametrize('platform,mesh', [('cpu', (2, 2, 2)), ('tpu', (2, 2, 1))])
def test_the_log_shows_the_warning_for_the_plain_lookup(capfd, platform, mesh):
  # The control: if the warning could not reach xla_log, the test above would pass for nothing.
  m = partitioning.make_mesh(mesh, _devices(platform, int(np.prod(mesh))))
  args = (jax.ShapeDtypeStruct((VOCAB, D_MODEL),
                               jnp.float32), jax.ShapeDtypeStruct((8, 16), jnp.int32))
  with xla_log(capfd) as log:
    _plain_lookup_step(m).lower(*args).compile()
  assert WARNING in ''.join(log)


def _embed_on_mesh(mesh_shape):
  """Embed's lookup and the table's gradient, jitted on a mesh of the CPU devices under the
  default rules, the table in its parameter sharding and the ids in the batch's."""
  mesh = partitioning.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  rules = partitioning.DEFAULT_RULES
  embed = layers.Embed(VOCAB, D_MODEL, jnp.bfloat16)
  table_sharding = nn.logical_to_mesh_sharding(P('vocab', 'embed'), mesh,
                                               partitioning.rules_tuple(rules))
  ids_sharding = partitioning.batch_sharding(mesh, rules)

  def lookup(table, ids):
    return embed.apply({'params': {'embedding': table}}, ids)

  def grad(table, ids, cotangent):
    return jax.vjp(lambda t: lookup(t, ids), table)[1](cotangent)[0]

  jitted_lookup = partitioning.jit(lookup, mesh, rules, in_shardings=(table_sharding, ids_sharding))
  jitted_grad = partitioning.jit(grad, mesh, rules,
                                 in_shardings=(table_sharding, ids_sharding, None),
                                 out_shardings=table_sharding)
  return jitted_lookup, jitted_grad


@pytest.mark.parametrize('mesh', [(2, 2, 2), (2, 4, 1), (1, 2, 4)])
def test_the_lookup_and_its_gradient_equal_an_unsharded_take(mesh):
  rng = np.random.default_rng(0)
  table = rng.standard_normal((VOCAB, D_MODEL)).astype(np.float32)
  # Repeated ids (the gradient adds their rows) and ids in every tensor shard of the vocabulary.
  ids = rng.integers(0, VOCAB, (8, 16)).astype(np.int32)
  ids[:, :4] = ids[0, 0]
  # Small integers: the gradient's sums are exact in any order the partitioner adds them in.
  cotangent = jnp.asarray(rng.integers(-4, 5, (8, 16, D_MODEL)), jnp.bfloat16)
  lookup, grad = _embed_on_mesh(mesh)

  rows = np.asarray(lookup(table, ids).astype(jnp.float32))
  want = np.asarray(jnp.take(jnp.asarray(table), ids, axis=0).astype(jnp.bfloat16), np.float32)
  np.testing.assert_array_equal(rows, want)

  got = np.asarray(grad(table, ids, cotangent))
  want = np.zeros_like(table)  # the scatter-add that jnp.take's gradient is, in numpy
  np.add.at(want, ids.reshape(-1), np.asarray(cotangent, np.float32).reshape(-1, D_MODEL))
  np.testing.assert_array_equal(got, want)


def test_the_model_logits_on_a_mesh_are_those_of_the_plain_lookup(monkeypatch):
  # The whole model (tied logits: the table is both looked up and attended to), sharded over
  # data, fsdp and tensor: the same logits, bit for bit, as with the lookup as it was. (The
  # encoder-decoder looks up the same way; a decoder alone compiles faster.)
  built = cli.build(_config((2, 2, 2), 'v1_0', 'decoder_only'), jax.devices())
  _, shardings = partitioning.abstract_params(built.model, built.mesh, built.rules)
  rng = np.random.default_rng(0)
  inputs = {'decoder_input_tokens': jnp.asarray(rng.integers(0, VOCAB, (8, 16)), jnp.int32)}
  init = lambda: nn.meta.unbox(built.model.init(jax.random.PRNGKey(0), **inputs)['params'])
  params = jax.jit(init, out_shardings=shardings)()

  def logits():
    apply = lambda p, x: built.model.apply({'params': p}, **x)
    return np.asarray(partitioning.jit(apply, built.mesh, built.rules)(params, inputs))

  fixed = logits()
  monkeypatch.setattr(layers.Embed, '__call__',
                      lambda self, ids: jnp.take(self.embedding, ids, axis=0).astype(self.dtype))
  np.testing.assert_array_equal(fixed, logits())
