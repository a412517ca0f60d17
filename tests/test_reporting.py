"""MetricWriter: metrics.jsonl lines and TensorBoard events, including the purge marker that a
resumed run writes so TensorBoard shows replayed steps once; the FLOPs per step against a hand
count of the matmuls (and the model's own dot_generals), and MFU from a given step time."""
import dataclasses
import glob
import json
import struct
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.extend import core as jax_core
from tensorboardX.proto import event_pb2

from t5lite import reporting
from t5lite.models.presets import ModelConfig
from t5lite.models.t5 import make_model


def read_events(logdir):
  """Every Event in the TFRecord files under logdir (8-byte length, 4-byte crc, data, 4-byte crc)."""
  events = []
  for path in sorted(glob.glob(f'{logdir}/events.*')):
    data = open(path, 'rb').read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


def test_resumed_writer_marks_the_purge_step(tmp_path):
  first = reporting.MetricWriter(str(tmp_path), tensorboard=True)
  for step in (1, 2, 3):
    first.write(step, {'loss': 10.0 - step})
  first.close()
  time.sleep(1.1)  # event file names carry whole seconds: a new file, as a real restart makes
  resumed = reporting.MetricWriter(str(tmp_path), tensorboard=True, purge_step=3)
  resumed.write(3, {'loss': 6.5})
  resumed.close()

  events = read_events(tmp_path / 'tensorboard')
  starts = [
      e.step for e in events
      if e.HasField('session_log') and e.session_log.status == event_pb2.SessionLog.START
  ]
  assert starts == [3]  # TensorBoard drops the first run's events from step 3 on
  scalars = [(e.step, v.simple_value) for e in events if e.HasField('summary')
             for v in e.summary.value if v.tag == 'train/loss']
  assert scalars == [(1, 9.0), (2, 8.0), (3, 7.0), (3, 6.5)]
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [l['step'] for l in lines] == [1, 2, 3, 3]  # train.trim_metrics removes the first 3


# --- FLOPs and MFU against a hand count -----------------------------------------------------------

# d_model, d_ff, num_heads x head_dim (inner), vocabulary, lengths: all different, so a swapped
# factor shows.
D, FF, HEADS, HEAD_DIM, VOCAB, ENC_LEN, DEC_LEN = 48, 80, 3, 20, 112, 11, 7
INNER = HEADS * HEAD_DIM


def hand_config(architecture, variant):
  return ModelConfig(variant=variant, architecture=architecture, vocab_size=VOCAB, d_model=D,
                     d_ff=FF, num_heads=HEADS, head_dim=HEAD_DIM, num_encoder_layers=2,
                     num_decoder_layers=3, dtype='float32')


def matmul_flops(shapes):
  """2 * m * k * n for every (m, k, n) matmul."""
  return sum(2 * m * k * n for m, k, n in shapes)


def hand_forward_flops(architecture, variant):
  """One example's forward matmuls, written out: attention scores (L x head_dim @ head_dim x L
  per head) and the weighted sum of values count the full square, as the docstring says."""
  mlp_in = 2 if variant == 'v1_1' else 1  # gated GELU: wi_0 and wi_1; v1.0: one ReLU wi

  def self_attention(length):
    return ([(length, D, INNER)] * 3 + [(length, INNER, D)]  # q, k, v; out
            + [(length, HEAD_DIM, length)] * HEADS  # scores, per head
            + [(length, length, HEAD_DIM)] * HEADS)  # weights @ values, per head

  def mlp(length):
    return [(length, D, FF)] * mlp_in + [(length, FF, D)]

  shapes = [(DEC_LEN, D, VOCAB)]  # logits
  for _ in range(3):
    shapes += self_attention(DEC_LEN) + mlp(DEC_LEN)
    if architecture == 'encoder_decoder':  # cross-attention: q/out on the decoder's tokens
      shapes += ([(DEC_LEN, D, INNER), (ENC_LEN, D, INNER), (ENC_LEN, D, INNER),
                  (DEC_LEN, INNER, D)] + [(DEC_LEN, HEAD_DIM, ENC_LEN)] * HEADS
                 + [(DEC_LEN, ENC_LEN, HEAD_DIM)] * HEADS)
  if architecture == 'encoder_decoder':
    for _ in range(2):
      shapes += self_attention(ENC_LEN) + mlp(ENC_LEN)
  return matmul_flops(shapes)


def jaxpr_dot_flops(jaxpr):
  """2 * (output size) * (contracted size) for every dot_general of a jaxpr, sub-jaxprs included:
  what the model really multiplies."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract
                                                                         ]))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        if isinstance(sub, jax_core.ClosedJaxpr):
          total += jaxpr_dot_flops(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          total += jaxpr_dot_flops(sub)
  return total


def test_the_mlp_matrices_follow_the_activation_not_the_variant():
  """mlp_activation decides wi vs wi_0 + wi_1 (tied or untied logits cost the same matmul); the
  config.model ConfigDict counts as its ModelConfig does."""
  flops = lambda cfg: reporting.forward_flops_per_example(cfg, ENC_LEN, DEC_LEN)
  v1_0, v1_1 = hand_config('encoder_decoder', 'v1_0'), hand_config('encoder_decoder', 'v1_1')
  assert flops(dataclasses.replace(v1_1, mlp_activation='relu')) == flops(v1_0)
  assert flops(dataclasses.replace(v1_0, mlp_activation='gated-silu')) == flops(v1_1)
  as_dict = dataclasses.asdict(dataclasses.replace(v1_0, mlp_activation='gated-relu'))
  assert flops(ml_collections.ConfigDict(as_dict)) == flops(v1_1)


@pytest.mark.parametrize('architecture,variant', [('encoder_decoder', 'v1_1'),
                                                  ('encoder_decoder', 'v1_0'),
                                                  ('decoder_only', 'v1_1')])
def test_train_flops_match_a_hand_count_and_the_models_matmuls(architecture, variant):
  cfg = hand_config(architecture, variant)
  forward = hand_forward_flops(architecture, variant)
  inputs_length = ENC_LEN if architecture == 'encoder_decoder' else 0
  assert reporting.forward_flops_per_example(cfg, inputs_length, DEC_LEN) == forward
  # Training: forward + backward (2x forward) = 3x, times the global batch.
  assert reporting.train_flops_per_step(cfg, 5, inputs_length, DEC_LEN) == 3 * 5 * forward
  # The hand count is what the model multiplies: every dot_general of its forward pass.
  batch = {'decoder_input_tokens': jnp.ones((2, DEC_LEN), jnp.int32)}
  if architecture == 'encoder_decoder':
    batch['encoder_input_tokens'] = jnp.ones((2, ENC_LEN), jnp.int32)
  model = make_model(cfg)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **batch))['params']
  jaxpr = jax.make_jaxpr(lambda p: model.apply({'params': p}, **batch))(params)
  assert jaxpr_dot_flops(jaxpr.jaxpr) == 2 * forward


def test_mfu_steps_and_tokens_per_second_from_a_given_step_time(monkeypatch):
  """4 steps in 2 s (0.5 s a step) of 6 TFLOP each on a 40 TFLOP/s machine: MFU 6/0.5/40 = 0.3."""
  clock = [100.0]
  monkeypatch.setattr(reporting.time, 'perf_counter', lambda: clock[0])
  throughput = reporting.Throughput(6e12, 40e12, total_steps=20)
  throughput.start()
  for _ in range(4):
    throughput.count(tokens=1000)
  clock[0] += 2.0
  values = throughput.values(step=4, process_count=2)
  assert values['mfu'] == pytest.approx(0.3)
  assert values['steps_per_sec'] == pytest.approx(2.0)
  assert values['tokens_per_sec'] == pytest.approx(4 * 1000 * 2 / 2.0)  # both processes' rows
  assert values['eta_seconds'] == pytest.approx(16 * 0.5)
  # 3 s of evaluation paused out of the next 4 s: 2 steps in 1 s of training.
  throughput.count(tokens=1000)
  throughput.count(tokens=1000)
  clock[0] += 4.0
  throughput.pause(3.0)
  assert throughput.values(step=6, process_count=1)['mfu'] == pytest.approx(6e12 / 0.5 / 40e12)
  assert 'mfu' not in reporting.Throughput(6e12, 0.0, 20).values(1, 1)  # no peak, no MFU


def test_the_stdout_line_shows_what_was_measured_and_nothing_else():
  # A distillation run's KL is on the line next to its loss; a plain run's line has no KL.
  line = reporting.format_line(7, {'loss': 2.5, 'distill_kl': 0.125, 'learning_rate': 0.01})
  assert line == 'step 7 | loss 2.5000 | kl 0.1250 | lr 0.01'
  assert reporting.format_line(8, {'loss': 1.0}) == 'step 8 | loss 1.0000'
