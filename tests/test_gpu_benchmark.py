"""benchmarks/gpu_throughput.py --quick on CPU: its table's numbers agree with each other and with
t5lite.reporting, recomputed here from the printed values.

One subprocess on 2 simulated CPU devices (a data-parallel mesh of 2; fewer devices than the
suite's 8 keep the compile short on a 2-core machine), under a minute.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from t5lite import reporting
from t5lite.data import preprocessors
from t5lite.models.presets import preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = [
    'row', 'model', 'params', 'kernels', 'remat', 'scan', 'microbatches', 'first step s (compile)',
    'step s (median)', 'step s (best)', 'tokens/step', 'tokens/s', 'FLOP/step',
    'peak TFLOP/s/device', 'MFU', 'peak mem GiB', 'vs nanoT5'
]
# --quick's shape, as its --help states it: tiny preset, vocab 2048, batch 8, 64 -> 16 tokens.
BATCH, INPUTS, TARGETS, VOCAB = 8, 64, 16, 2048


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp('gpu_benchmark') / 'rows.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run(
      [sys.executable, 'benchmarks/gpu_throughput.py', '--quick', '--json',
       str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith('| row |'))
  assert [c.strip() for c in lines[header].strip('|').split('|')] == COLUMNS
  rows = {}
  for line in lines[header + 2:]:
    if not line.startswith('|'):
      break
    cells = dict(zip(COLUMNS, (c.strip() for c in line.strip('|').split('|'))))
    rows[cells['row']] = cells
  return {'stdout': result.stdout, 'rows': rows, 'json': json.loads(out.read_text())}


def number(cell: str) -> float:
  return float(cell.replace(',', ''))


def test_machine_line_names_the_devices_and_jax(quick):
  import jax  # pylint: disable=import-outside-toplevel
  first = quick['stdout'].splitlines()[0]
  assert first.startswith('machine: 2 x cpu ') and f'jax {jax.__version__}' in first


def test_both_model_rows_with_their_remat_defaults(quick):
  rows = quick['rows']
  assert sorted(rows) == ['base', 'large']
  assert rows['base']['remat'] == 'none' and rows['large']['remat'] == 'minimal'
  for r in rows.values():
    assert r['model'] == 't5.1.1-tiny' and r['kernels'] == 'tuned'  # 'auto' on CPU
    # the tiny preset's parameter count, from its dimensions (independent of flax's init)
    m = preset('tiny', vocab_size=VOCAB)
    d, ff, inner, n = m.d_model, m.d_ff, m.num_heads * m.head_dim, m.num_encoder_layers
    buckets = m.relative_attention_num_buckets * m.num_heads
    encoder = n * (4 * d * inner + 3 * d * ff + 2 * d) + buckets + d
    decoder = n * (8 * d * inner + 3 * d * ff + 3 * d) + buckets + d
    assert number(r['params']) == VOCAB * d * 2 + encoder + decoder  # embedding + logits


def test_times_are_positive_and_best_is_at_most_median(quick):
  for r in quick['rows'].values():
    median, best = number(r['step s (median)']), number(r['step s (best)'])
    assert 0 < best <= median
    assert number(r['first step s (compile)']) > 0


def test_tokens_per_second_is_tokens_per_step_over_median(quick):
  for r in quick['rows'].values():
    tokens = number(r['tokens/step'])
    assert tokens == BATCH * (INPUTS + TARGETS)
    # the printed median has 4 decimals: the recomputed rate is exact up to that rounding
    median = number(r['step s (median)'])
    low, high = tokens / (median + 5e-5), tokens / max(median - 5e-5, 1e-9)
    assert low - 0.5 <= number(r['tokens/s']) <= high + 0.5


def test_flops_are_reportings_for_the_quick_shape(quick):
  expected = reporting.train_flops_per_step(preset('tiny', vocab_size=VOCAB), BATCH, INPUTS,
                                            TARGETS)
  for r in quick['rows'].values():
    assert number(r['FLOP/step']) == expected
  for r in quick['json']['rows']:
    assert r['flops_per_step'] == expected


def test_cpu_has_no_peak_so_mfu_and_nanot5_are_not_claimed(quick):
  for r in quick['rows'].values():
    assert r['peak TFLOP/s/device'] == 'unknown' and r['MFU'] == 'unknown'
    assert r['vs nanoT5'] == '-' and r['peak mem GiB'] == '-'


def test_json_rows_match_the_table(quick):
  for r in quick['json']['rows']:
    cells = quick['rows'][r['row']]
    assert f'{r["step_s_median"]:.4f}' == cells['step s (median)']
    assert r['tokens_per_s'] == pytest.approx(r['tokens_per_step'] / r['step_s_median'])
    assert r['params'] == number(cells['params'])
  assert quick['json']['machine']['device_count'] == 2


def test_default_shape_is_t5s_span_corruption_shape():
  # 114 targets for 512 inputs: T5's random_spans_helper at noise 0.15, mean span 3 (T5.1.1's and
  # nanoT5's pre-training), so the benchmark's default shape is the one training really runs.
  spec = importlib.util.spec_from_file_location(
      'gpu_throughput', os.path.join(ROOT, 'benchmarks', 'gpu_throughput.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  _, targets_length = preprocessors.random_spans_helper(512, 0.15, 3.0)
  assert module.NANOT5_SHAPE == (128, 512, targets_length)
  args = module.make_parser().parse_args([])
  assert (args.batch, args.inputs, args.targets) == module.NANOT5_SHAPE
