"""Training throughput on this machine: t5lite's train step vs HuggingFace PyTorch T5, compile
times, peak memory. One table, measured in one run.

    python benchmarks/train_throughput.py                  # full run (under 15 min on 2 cores)
    python benchmarks/train_throughput.py --quick          # tiny shapes, checks it works (~1-2 min)
    python benchmarks/train_throughput.py --only t5lite    # or --only hf
    python benchmarks/train_throughput.py --steps 8 --json /tmp/throughput.json

What is measured (docs/performance.md says more):
- step rows: one training step (forward, backward, optimizer update) on a random token batch
  (no padding, no data pipeline in the timing) for two shapes, `quickstart` (configs/quickstart.py:
  tiny T5.1.1, vocab 2048, batch 32, 128 -> 32 tokens) and `small` (T5.1.1-small: 8+8 layers,
  d_model 512, d_ff 1024, 6x64 heads, vocab 32128, batch 8, 512 -> 114 tokens), each in float32 and
  bfloat16, for
    t5lite: its real jitted step (trainer.make_train_step + jit_train_step + init_train_state on a
            1-device mesh, state donated), AdamW (lr 1e-3 constant, betas 0.9/0.98, eps 1e-8) with
            global-norm clipping 1.0, t5lite's default z-loss 1e-4; bfloat16 = model.dtype
            (float32 params);
    HF:     transformers' T5ForConditionalGeneration with the same dimensions (T5Config from
            t5lite.hf, untied lm_head for v1.1), same batch, torch.optim.AdamW(fused=True, as HF's
            Trainer uses) with the same lr, betas, eps, weight decay and clipping, torch threads =
            cores; bfloat16 = torch.autocast('cpu', bfloat16).
    HF, kept host memory: the same HF step in a process started with glibc's MALLOC_MMAP_MAX_=0,
            MALLOC_TRIM_THRESHOLD_=2**64-1 and MALLOC_ARENA_MAX=1, the allocator settings
            t5lite applies to itself on CPU (config.keep_host_memory, t5lite/host_memory.py):
            what HF would gain from the same trick, so that the ratio against it shows what is
            t5lite's own.
  The first step (compile for t5lite, lazy optimizer state for torch) and one more warm-up step
  are excluded; the median of --steps timed steps is reported.
- compile rows: trace + lower + XLA compile of t5lite's train step at T5.1.1-small width with
  2, 8 and 24 encoder and decoder layers, unrolled and with model.scan_layers (short sequences:
  compile time barely depends on them).
- every row runs in its own subprocess: its peak RSS (ru_maxrss) is its own, and XLA's and
  torch's thread pools never compete. t5lite and HF rows of one shape and dtype run back to back,
  so that their ratio sees the same machine load.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/train_throughput.py` from a checkout, not installed
  sys.path.insert(0, ROOT)

WARMUP = 1  # warm-up steps after the first call, excluded from the median
# One row's subprocess may take this long (seconds; --quick: 150). An idle machine needs about
# 2 minutes for the slowest full row; a row that runs out is reported as such, so that the run
# ends even when other jobs starve it (torch's OpenMP threads slow down 10x and more then).
WORKER_TIMEOUT_S = 420

# ---------------------------------------------------------------------------------------------
# What to measure


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  batch: int
  inputs: int
  targets: int
  size: str = 'tiny'  # preset; 'quickstart' keeps configs/quickstart.py's model
  vocab: int = 32128
  layers: int | None = None  # overrides the preset's encoder and decoder layers


def shapes(quick: bool) -> list[Shape]:
  if quick:
    return [
        Shape('quickstart', batch=8, inputs=128, targets=32, size='quickstart'),
        Shape('small-1L', batch=2, inputs=32, targets=8, size='small', layers=1)
    ]
  return [
      Shape('quickstart', batch=32, inputs=128, targets=32, size='quickstart'),
      Shape('small', batch=8, inputs=512, targets=114, size='small')
  ]


def compile_shapes(quick: bool) -> list[Shape]:
  """Compile-time rows: T5.1.1-small width (quick: tiny width, 1 and 2 layers), short
  sequences."""
  if quick:
    return [
        Shape(f'tiny-{n}L', batch=2, inputs=32, targets=8, size='tiny', vocab=2048, layers=n)
        for n in (1, 2)
    ]
  return [
      Shape(f'small-{n}L', batch=2, inputs=64, targets=16, size='small', layers=n)
      for n in (2, 8, 24)
  ]


def build_config(shape: Shape, dtype: str, scan: bool = False):
  """The t5lite ConfigDict of a row: configs/quickstart.py with the shape's model and lengths and
  AdamW set here (whatever optimizer the quickstart uses), so both frameworks run the same update.
  Needs no jax, so the HF worker can call it too."""
  from t5lite import config_files  # pylint: disable=import-outside-toplevel
  from t5lite.models.presets import model_config  # pylint: disable=import-outside-toplevel
  config = config_files.load_config_file(os.path.join(ROOT, 'configs', 'quickstart.py'))
  if shape.size != 'quickstart':
    config.model = model_config(shape.size, variant='v1_1', vocab_size=shape.vocab)
  if shape.layers is not None:
    config.model.num_encoder_layers = config.model.num_decoder_layers = shape.layers
  config.model.dtype = dtype
  config.model.scan_layers = scan
  # AdamW with global-norm clipping at a constant rate: HF gets exactly these (random batches, so
  # the value of the rate does not matter; a schedule would only add a few scalar ops).
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.b1, config.optimizer.b2, config.optimizer.eps = 0.9, 0.98, 1e-8
  config.optimizer.weight_decay = 0.0
  config.train.max_grad_norm = 1.0
  config.schedule.name = 'constant'
  config.schedule.warmup_steps = 0
  config.train.batch_size = shape.batch
  config.data.inputs_length = shape.inputs
  config.data.targets_length = shape.targets
  return config


def random_batch(shape: Shape, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Uniform random ids in [3, vocab) (no padding, EOS or sentinel structure), T5X features."""
  rng = np.random.RandomState(seed)
  targets = rng.randint(3, vocab, (shape.batch, shape.targets)).astype(np.int32)
  return {
      'encoder_input_tokens': rng.randint(3, vocab, (shape.batch, shape.inputs)).astype(np.int32),
      # decoder inputs: targets shifted right behind the start token 0, as the converter makes them
      'decoder_input_tokens': np.concatenate(
          [np.zeros((shape.batch, 1), np.int32), targets[:, :-1]], axis=1),
      'decoder_target_tokens': targets,
      'decoder_loss_weights': np.ones((shape.batch, shape.targets), np.float32),
  }


def model_matmul_shapes(shape: Shape, model) -> list[tuple[int, int, int]]:
  """(m, k, n) of the model's big matmuls: MLP in and out over the encoder's tokens, and the
  output layer over the decoder's. The "peak" is the best of them, so it is the rate this
  framework reaches on matmuls of exactly this model's sizes (smaller shapes run slower)."""
  enc, dec = shape.batch * shape.inputs, shape.batch * shape.targets
  return [(enc, model.d_model, model.d_ff), (enc, model.d_ff, model.d_model),
          (dec, model.d_model, model.vocab_size)]


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def core_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Workers: each runs in its own subprocess and prints one `RESULT {json}` line


def t5lite_step_worker(spec: dict) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  # A persistent compilation cache would turn the first step into a cache read.
  jax.config.update('jax_enable_compilation_cache', False)
  # pylint: disable-next=import-outside-toplevel
  from t5lite import host_memory, optim, partitioning, reporting, trainer
  from t5lite.models.presets import ModelConfig  # pylint: disable=import-outside-toplevel
  from t5lite.models.t5 import make_model  # pylint: disable=import-outside-toplevel

  shape = Shape(**spec['shape'])
  config = build_config(shape, spec['dtype'])
  host_memory.keep_freed_memory(config.keep_host_memory)  # as t5lite's train job does
  rules = config.partitioning.rules
  mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  model_cfg = ModelConfig.from_config(config.model)
  model = make_model(model_cfg)
  tx, schedule = optim.make_optimizer(config)
  batch = random_batch(shape, model_cfg.vocab_size)

  start = time.perf_counter()
  state, shardings = trainer.init_train_state(model, tx, mesh, rules, batch, config.train.seed)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - start
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  step = trainer.jit_train_step(
      trainer.make_train_step(model, tx, schedule, config.train, dropout=False), shardings, mesh,
      rules)
  global_batch = partitioning.host_to_global(batch, partitioning.batch_sharding(mesh, rules))

  times, cpu = [], []
  for _ in range(1 + WARMUP + spec['steps']):
    start, start_cpu = time.perf_counter(), time.process_time()
    state, metrics = step(state, global_batch)  # donates the old state
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  rss = peak_rss_mib()  # before the peak measurement below allocates its operands
  loss = float(metrics['loss'])

  peaks = [
      reporting.measure_matmul_peak(spec['dtype'], m, k, n)
      for m, k, n in model_matmul_shapes(shape, model_cfg)
  ]
  return {
      'first_s': times[0], 'init_s': init_s, 'times': times[1 + WARMUP:],
      'cpu_times': cpu[1 + WARMUP:], 'params': params, 'loss': loss, 'peak_flops': max(peaks),
      'peak_rss_mib': rss, 'peak_how':
          ('XLA jnp.matmul, ' +
           ('bf16 operands, f32 accumulation' if spec['dtype'] == 'bfloat16' else 'f32'))
  }


def t5lite_compile_worker(spec: dict) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_enable_compilation_cache', False)
  from t5lite import optim, partitioning, trainer  # pylint: disable=import-outside-toplevel
  from t5lite.models.presets import ModelConfig  # pylint: disable=import-outside-toplevel
  from t5lite.models.t5 import make_model  # pylint: disable=import-outside-toplevel

  shape = Shape(**spec['shape'])
  config = build_config(shape, spec['dtype'], scan=spec['scan'])
  rules = config.partitioning.rules
  mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  model = make_model(ModelConfig.from_config(config.model))
  tx, schedule = optim.make_optimizer(config)
  batch = random_batch(shape, config.model.vocab_size)
  # Abstract state and batch: compiling needs only shapes and shardings, nothing is allocated.
  abstract, shardings = trainer.abstract_train_state(model, tx, mesh, rules, batch,
                                                     config.train.seed)
  batch_sharding = partitioning.batch_sharding(mesh, rules)
  batch_spec = {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in batch.items()
  }
  step = trainer.jit_train_step(
      trainer.make_train_step(model, tx, schedule, config.train, dropout=False), shardings, mesh,
      rules)
  start = time.perf_counter()
  lowered = step.lower(abstract, batch_spec)  # under the mesh and rules, as a call is
  lowered_at = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  return {
      'lower_s': lowered_at - start, 'compile_s': done - lowered_at, 'first_s': done - start,
      'params': params, 'peak_rss_mib': peak_rss_mib()
  }


def hf_step_worker(spec: dict) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from t5lite import hf  # pylint: disable=import-outside-toplevel  (numpy only, no jax)

  # XLA's CPU client uses every core; give torch the same.
  torch.set_num_threads(core_count())
  shape = Shape(**spec['shape'])
  config = build_config(shape, 'float32')
  m, opt, train = config.model, config.optimizer, config.train
  hf_config = transformers.T5Config(**hf.hf_config_from_model_config(m))
  hf_config.use_cache = False  # training: no key/value cache
  torch.manual_seed(0)
  start = time.perf_counter()
  model = transformers.T5ForConditionalGeneration(hf_config)
  if m.variant == 'v1_1':
    # transformers 5.x ties lm_head to the embedding whatever tie_word_embeddings says
    # (DESIGN.md): give T5.1.1 its own output layer, as t5lite has.
    model.lm_head = torch.nn.Linear(m.d_model, m.vocab_size, bias=False)
    torch.nn.init.normal_(model.lm_head.weight, 0.0, m.d_model**-0.5)
  params = sum(p.numel() for p in model.parameters())  # parameters() counts a tied tensor once
  model.train()
  # fused=True: the kernel HF's Trainer uses by default with torch >= 2.8 (optim
  # 'adamw_torch_fused'); torch's own default on CPU is a per-tensor loop, 3-5x slower here.
  optimizer = torch.optim.AdamW(model.parameters(), lr=opt.learning_rate, betas=(opt.b1, opt.b2),
                                eps=opt.eps, weight_decay=opt.weight_decay, fused=True)
  init_s = time.perf_counter() - start
  batch = {k: torch.from_numpy(v) for k, v in random_batch(shape, m.vocab_size).items()}
  inputs = {
      'input_ids': batch['encoder_input_tokens'].long(),
      'attention_mask': torch.ones_like(batch['encoder_input_tokens']).long(),
      'decoder_input_ids': batch['decoder_input_tokens'].long(),
      'labels': batch['decoder_target_tokens'].long()
  }
  bf16 = spec['dtype'] == 'bfloat16'

  def train_step():
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
      loss = model(**inputs).loss  # mean cross-entropy over target tokens, as t5lite's loss
    loss.backward()
    if train.max_grad_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())  # a sync point, like t5lite's block_until_ready

  times, cpu = [], []
  for _ in range(1 + WARMUP + spec['steps']):
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = train_step()
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  rss = peak_rss_mib()

  peaks = []
  with torch.no_grad():
    dtype = torch.bfloat16 if bf16 else torch.float32
    for mm, k, n in model_matmul_shapes(shape, m):
      a, b = torch.ones(mm, k, dtype=dtype), torch.ones(k, n, dtype=dtype)
      # Into a preallocated output: a fresh one per call is a fresh allocation (page faults on
      # up to 117 MB) and measured the allocator, not the matmul (a float32 "peak" below HF's
      # own step's rate, i.e. MFU over 100%).
      out = torch.matmul(a, b)
      runs = []
      for _ in range(8):
        t = time.perf_counter()
        torch.matmul(a, b, out=out)
        runs.append(time.perf_counter() - t)
      peaks.append(2.0 * mm * k * n / min(runs))  # the best run, as reporting's peak
  return {
      'first_s': times[0],
      'init_s': init_s,
      'times': times[1 + WARMUP:],
      'cpu_times': cpu[1 + WARMUP:],
      'params': params,
      'loss': loss,
      'peak_flops': max(peaks),
      'peak_rss_mib': rss,
      'attention': hf_config._attn_implementation,  # pylint: disable=protected-access
      'peak_how': 'torch.matmul, ' + ('bf16 (as autocast runs nn.Linear)' if bf16 else 'f32')
  }


WORKERS = {
    't5lite': t5lite_step_worker, 'hf': hf_step_worker, 'hf_kept': hf_step_worker,
    'compile': t5lite_compile_worker
}
# glibc's environment form of t5lite.host_memory's mallopt calls, for the 'hf_kept' rows.
KEPT_MEMORY_ENV = {
    'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(2**64 - 1), 'MALLOC_ARENA_MAX': '1'
}
FRAMEWORKS = {
    't5lite': 't5lite', 'compile': 't5lite', 'hf': 'HF torch',
    'hf_kept': 'HF torch, kept host memory'
}


def run_worker(spec: dict, timeout: float, env: dict | None = None) -> dict:
  """Runs one measurement in a fresh Python process; returns its result dict (or an error)."""
  command = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(spec)]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env)
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout:.0f}s'}
  for line in reversed(done.stdout.splitlines()):
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  tail = (done.stderr.strip().splitlines() or ['(no output)'])[-1]
  return {'error': f'exit {done.returncode}: {tail}'}


# ---------------------------------------------------------------------------------------------
# The table


def machine_lines(args) -> list[str]:
  cpu = 'unknown CPU'
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass

  def version(name):
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return 'not installed'

  versions = ', '.join(
      f'{n} {version(n)}' for n in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'transformers'))
  omp = ('PASSIVE (--hf-omp-passive)' if args.hf_omp_passive else os.environ.get(
      'OMP_WAIT_POLICY', 'default'))
  return [
      f'machine: {cpu}, {core_count()} cores (os.cpu_count {os.cpu_count()}), '
      f'load average at start {" ".join(f"{x:.2f}" for x in os.getloadavg())}',
      f'versions: python {sys.version.split()[0]}, {versions}',
      f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; torch threads = {core_count()}, '
      f'OMP_WAIT_POLICY {omp}; '
      f'{"--quick: tiny shapes, " if args.quick else ""}{args.steps} timed steps per row '
      f'(median) after the first step and {WARMUP} warm-up step',
  ]


COLUMNS = [
    'kind', 'shape', 'framework', 'dtype', 'layers', 'scan', 'params', 'first step / compile s',
    'step s (median)', 'CPU s/step', 'tokens/s', 'GFLOP/step', 'matmul peak GFLOP/s', 'MFU',
    't5lite/HF', 't5lite/HF kept mem', 'vs fewest layers', 'peak RSS MiB', 'load'
]


def table(rows: list[dict]) -> list[str]:

  def fmt(v, spec):
    return '-' if v is None else format(v, spec)

  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  for r in rows:
    if r.get('error'):
      cells = [
          r['kind'], r['shape'], r['framework'], r['dtype'],
          str(r['layers']), {True: 'yes', False: 'no'}.get(r.get('scan'), '-'),
          f'ERROR: {r["error"]}'
      ]
      cells += ['-'] * (len(COLUMNS) - len(cells) - 1) + [fmt(r.get('load'), '.1f')]
    else:
      cells = [
          r['kind'], r['shape'], r['framework'], r['dtype'],
          str(r['layers']), {True: 'yes', False: 'no'}.get(r.get('scan'), '-'), f'{r["params"]:,}',
          fmt(r.get('first_s'), '.1f'),
          fmt(r.get('step_s'), '.3f'),
          fmt(r.get('cpu_s'), '.2f'),
          fmt(r.get('tokens_per_s'), ',.0f'),
          fmt(r.get('flops_per_step') and r['flops_per_step'] / 1e9, '.1f'),
          fmt(r.get('peak_flops') and r['peak_flops'] / 1e9, '.0f'),
          fmt(r.get('mfu') and 100 * r['mfu'], '.1f') + ('%' if r.get('mfu') else ''),
          fmt(r.get('ratio_vs_hf'), '.2f'),
          fmt(r.get('ratio_vs_hf_kept'), '.2f'),
          fmt(r.get('vs_fewest_layers'), '.2f'),
          fmt(r.get('peak_rss_mib'), ',.0f'),
          fmt(r.get('load'), '.1f')
      ]
    lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
  return lines


NOTES = """\
Columns: step s = median wall time of one train step (forward + backward + AdamW update, synced);
CPU s/step = the process's CPU time per step, median (all its threads: about cores x step s when
they all work; much less means other jobs took the cores, more means threads spin-waiting);
tokens/s = batch x (inputs + targets) / step s (random batches have no padding); GFLOP/step = model
matmul FLOPs x 3 (t5lite.reporting.train_flops_per_step; the same count for both frameworks);
MFU = GFLOP/step / step s / matmul peak, where the peak is measured in the row's own subprocess
right after its timed steps, in its framework and dtype (t5lite: reporting.measure_matmul_peak, XLA,
bf16 rows with bf16 operands and f32 accumulation; HF: torch.matmul, bf16 rows bf16 in and out, as
autocast runs nn.Linear), as the best of the model's shapes (encoder tokens x d_model x d_ff,
encoder tokens x d_ff x d_model, decoder tokens x d_model x vocab), best of 8 each;
t5lite/HF = HF step time / t5lite step time (>1: t5lite faster), same shape and dtype;
t5lite/HF kept mem = the same against HF run with t5lite's host allocator settings (glibc
MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=2**64-1, MALLOC_ARENA_MAX=1; t5lite applies them to itself
on CPU);
first step / compile s = the first call (t5lite: trace + lower + compile + one step; HF: one eager
step with lazy optimizer state) for step rows, trace + lower + XLA compile for compile rows;
vs fewest layers = compile s / compile s of the fewest-layer row with the same scan setting;
peak RSS = ru_maxrss of the row's subprocess (step rows: read before the peak measurement);
load = the machine's 1-minute load average when the row started (this run's own rows add about 1:
more means other jobs shared the cores and the row's numbers are not an idle machine's)."""


def finish_rows(results: list[tuple[dict, dict]], expected_params: dict) -> list[dict]:
  from t5lite import reporting  # pylint: disable=import-outside-toplevel
  from t5lite.models.presets import ModelConfig  # pylint: disable=import-outside-toplevel
  rows = []
  for spec, result in results:
    shape = Shape(**spec['shape'])
    config = build_config(shape, spec['dtype'])
    row = {
        'kind': 'compile' if spec['worker'] == 'compile' else 'step', 'shape': shape.name,
        'framework': FRAMEWORKS[spec['worker']
                               ], 'dtype': spec['dtype'] if spec['worker'] not in ('hf', 'hf_kept')
                                           or spec['dtype'] == 'float32' else 'bfloat16 autocast',
        'layers': f'{config.model.num_encoder_layers}+{config.model.num_decoder_layers}',
        'scan': spec.get('scan') if spec['worker'] == 'compile' else None, 'batch': shape.batch,
        'inputs': shape.inputs, 'targets': shape.targets, 'vocab': config.model.vocab_size, **result
    }
    if 'error' not in result and spec['worker'] != 'compile':
      row['step_s'] = float(np.median(result['times']))
      row['cpu_s'] = float(np.median(result['cpu_times']))
      row['tokens_per_s'] = shape.batch * (shape.inputs + shape.targets) / row['step_s']
      row['flops_per_step'] = reporting.train_flops_per_step(ModelConfig.from_config(config.model),
                                                             shape.batch, shape.inputs,
                                                             shape.targets)
      row['mfu'] = row['flops_per_step'] / row['step_s'] / result['peak_flops']
      want = expected_params[shape.name]
      if result['params'] != want:
        row['error'] = (f'{result["params"]:,} parameters, t5lite has {want:,}: not the same '
                        'model')
    rows.append(row)
  # Ratios between rows.
  for row in rows:
    if row['kind'] == 'step' and row['framework'] == 't5lite' and 'step_s' in row:
      for framework, key in (('HF torch', 'ratio_vs_hf'), ('HF torch, kept host memory',
                                                           'ratio_vs_hf_kept')):
        twin = [
            r for r in rows
            if r['kind'] == 'step' and r['framework'] == framework and r['shape'] == row['shape']
            and r['dtype'].split()[0] == row['dtype'] and 'step_s' in r and not r.get('error')
        ]
        if twin:
          row[key] = twin[0]['step_s'] / row['step_s']
    if row['kind'] == 'compile' and 'first_s' in row:
      same = [
          r for r in rows if r['kind'] == 'compile' and r['scan'] == row['scan'] and 'first_s' in r
      ]
      fewest = min(same, key=lambda r: int(r['layers'].split('+')[0]))
      row['vs_fewest_layers'] = row['first_s'] / fewest['first_s']
  return rows


def expected_param_counts(shape_list: list[Shape]) -> dict[str, int]:
  """t5lite's parameter count of each shape, from abstract shapes (nothing allocated)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from t5lite.models.presets import ModelConfig  # pylint: disable=import-outside-toplevel
  from t5lite.models.t5 import make_model  # pylint: disable=import-outside-toplevel
  counts = {}
  for shape in shape_list:
    model = make_model(ModelConfig.from_config(build_config(shape, 'float32').model))
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    boxed = jax.eval_shape(
        lambda key, x: model.init(key, encoder_input_tokens=x, decoder_input_tokens=x),
        jax.ShapeDtypeStruct((2,), jnp.uint32), tokens)
    counts[shape.name] = sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(boxed)['params']))
  return counts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='tiny shapes and 2 timed steps: checks the script in 1-2 minutes')
  parser.add_argument('--only', choices=('t5lite', 'hf'),
                      help='only t5lite rows (step and compile) or only HF rows')
  parser.add_argument('--steps', type=int, default=None,
                      help='timed steps per step row, median reported (default 5; --quick 2)')
  parser.add_argument('--json', metavar='OUT', help='also write the rows as JSON to OUT')
  parser.add_argument(
      '--hf-omp-passive', action='store_true',
      help='run HF rows with OMP_WAIT_POLICY=PASSIVE: on a machine shared with '
      'other jobs, torch\'s spin-waiting OpenMP threads otherwise slow its '
      'steps down 5-20x; off by default (torch\'s defaults, what users run)')
  parser.add_argument('--worker', help=argparse.SUPPRESS)  # internal: run one measurement
  args = parser.parse_args(argv)
  if args.worker:
    spec = json.loads(args.worker)
    print('RESULT ' + json.dumps(WORKERS[spec['worker']](spec)), flush=True)
    return 0
  args.steps = args.steps or (2 if args.quick else 5)
  if args.steps < 1:
    parser.error('--steps must be >= 1')

  header = machine_lines(args)
  if os.getloadavg()[0] >= 0.5 * core_count():
    header.append(f'WARNING: load average {os.getloadavg()[0]:.1f} on {core_count()} cores before '
                  'the first row: other jobs are running, so times are slower and noisier than an '
                  'idle machine\'s, and HF rows far more (OpenMP threads spin-wait for busy cores)')
  print('\n'.join(header), flush=True)
  specs = []
  for shape in shapes(args.quick):
    for dtype in ('float32', 'bfloat16'):
      # t5lite then HF, back to back: their ratio sees the same load on a shared machine.
      for worker in ('t5lite', 'hf', 'hf_kept'):
        if args.only in (None, worker.split('_')[0]):
          specs.append({
              'worker': worker, 'shape': dataclasses.asdict(shape), 'dtype': dtype,
              'steps': args.steps
          })
  if args.only in (None, 't5lite'):
    for scan in (False, True):
      for shape in compile_shapes(args.quick):
        specs.append({
            'worker': 'compile', 'shape': dataclasses.asdict(shape), 'dtype': 'bfloat16',
            'scan': scan
        })
  expected = expected_param_counts(shapes(args.quick))

  start = time.perf_counter()
  results = []
  timeout = 150 if args.quick else WORKER_TIMEOUT_S
  for i, spec in enumerate(specs, 1):
    load = os.getloadavg()[0]
    env = None
    if spec['worker'] == 'hf_kept':
      env = dict(os.environ, **KEPT_MEMORY_ENV)
    if args.hf_omp_passive and spec['worker'] in ('hf', 'hf_kept'):
      env = dict(env or os.environ, OMP_WAIT_POLICY='PASSIVE')
    result = run_worker(spec, timeout, env)
    result['load'] = load
    results.append((spec, result))
    what = (f'{spec["worker"]} {spec["shape"]["name"]} {spec["dtype"]}' +
            (f' scan={spec["scan"]}' if 'scan' in spec else ''))
    if 'error' in result:
      outcome = result['error']
    elif 'times' in result:
      outcome = f'{np.median(result["times"]):.3f} s/step'
    else:
      outcome = f'compiled in {result["first_s"]:.1f} s'
    print(f'[{i}/{len(specs)} {time.perf_counter() - start:.0f}s] {what}: {outcome}',
          file=sys.stderr, flush=True)
  rows = finish_rows(results, expected)
  elapsed = time.perf_counter() - start

  print()
  print('t5lite/HF is a time ratio, HF step time / t5lite step time: >1 means t5lite is faster. '
        'MFU peak: matmuls at the model\'s shapes, measured in the row\'s own subprocess (notes '
        'below).')
  print('\n'.join(table(rows)))
  print()
  print(NOTES)
  hf_rows = [r for r in rows if r['framework'] == 'HF torch' and 'attention' in r]
  if hf_rows:
    print(f'HF attention implementation: {hf_rows[0]["attention"]}; both: AdamW (torch fused) at '
          'a constant rate, clipping 1.0; t5lite also computes its z-loss (1e-4) and accuracy.')
  print(f'measured in {elapsed:.0f} s; load average at end '
        f'{" ".join(f"{x:.2f}" for x in os.getloadavg())}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'machine': header, 'steps': args.steps, 'quick': args.quick, 'rows': rows}, f,
                indent=1)
  return 1 if any(r.get('error') for r in rows) else 0


if __name__ == '__main__':
  sys.exit(main())
