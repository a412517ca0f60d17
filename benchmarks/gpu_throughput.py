"""Training throughput of T5.1.1-base and -large on this machine's accelerators (GPU or TPU).

    python benchmarks/gpu_throughput.py                     # base and large, bf16, 128 x 512 -> 114
    python benchmarks/gpu_throughput.py --models base --remat minimal --microbatches 2
    python benchmarks/gpu_throughput.py --quick             # tiny stand-ins on CPU, ~1 minute
    python benchmarks/gpu_throughput.py --json /tmp/gpu_throughput.json

Each row builds the train step the way `python -m t5lite.train` does: base_config() with the
preset's model (bfloat16 activations, float32 params), T5's Adafactor and rsqrt schedule,
cli.build (config check, mesh with mesh.data=-1: data parallel over every local device, model)
-> trainer.init_train_state -> make_train_step -> jit_train_step(watch=True). The batch is one
random token batch of the full shape (no padding, no data pipeline in the timing), put on the
mesh once. The first call (compile) and --warmup more steps are excluded; each of --steps timed
steps ends in block_until_ready on its metrics.

Columns: model.kernels as resolved for the platform ('auto': 'xla' on GPU and TPU, 'tuned' on
CPU); the first step (compile + one step); step time median and best; tokens/s = batch x (inputs + targets) / median; model FLOPs
per step from reporting.train_flops_per_step (matmuls, 3x forward, remat not counted); MFU
against reporting.KNOWN_PEAK_FLOPS for the device kind (dense bf16 data-sheet peak) times the
device count ('unknown' for a kind not in the table, CPU included); peak device memory from
jax's memory_stats where the backend has them (the process's peak so far: base runs first).
XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.95 here (JAX's own default: 0.75); a row that runs
out of memory says so and the next row still runs.

The bar, base only: nanoT5 (Nawrot 2023, github.com/PiotrNawrot/nanoT5, README "Efficiency
statistics") pre-trains T5.1.1-base in PyTorch at ~0.56 s per step on one 80 GB A100 with bf16,
torch.compile and no gradient accumulation, inputs 512 (targets 114). `vs nanoT5` is 0.56 s /
our median step at that shape on an A100 (above 1: faster); '-' on any other device or shape.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/gpu_throughput.py` from a checkout, not installed
  sys.path.insert(0, ROOT)

NANOT5_STEP_S = 0.56  # nanoT5 README, BF16 + torch.compile, grad acc 1, one A100 (see above)
# batch, inputs, targets: the shape issue 16 names. nanoT5's README table gives no batch size; its
# configs/default.yaml (as stored today) says batch_size 144, which would make the bar 0.50 s at
# 128 (docs/performance.md, GPU).
NANOT5_SHAPE = (128, 512, 114)
# Default remat per model for an 80 GB device, estimated from the shapes (not measured; override
# with --remat). Base saves per encoder layer its attention probabilities, 128 x 12 heads x
# 512 x 512 = 0.4 G elements (about 0.8 GB in bf16, more with float32 softmax pieces), and the
# MLP's 65,536 tokens x 2048 x 3 (0.8 GB): some 20-35 GB over 12 layers, plus about 4 GB of
# float32 logits and their gradient: it fits without remat. Large (16 heads, d_ff 2816, 24
# layers) would save some 75-100 GB; 'minimal' (jax's checkpoint_dots_with_no_batch_dims: keep the
# weight matmuls' results, recompute attention) keeps some 45 GB of it.
DEFAULT_REMAT = {'base': 'none', 'large': 'minimal'}


def build_config(size: str, args):
  from t5lite import config as config_lib  # pylint: disable=import-outside-toplevel
  from t5lite.models.presets import model_config  # pylint: disable=import-outside-toplevel
  c = config_lib.base_config()  # T5's Adafactor and rsqrt schedule, z-loss 1e-4
  c.model = model_config(args.preset or size, variant='v1_1', vocab_size=args.vocab)
  c.model.dtype = 'bfloat16'
  c.model.scan_layers = args.scan
  c.model.remat_policy = args.remat or DEFAULT_REMAT[size]
  c.train.batch_size = args.batch
  c.train.microbatches = args.microbatches
  c.data.inputs_length, c.data.targets_length = args.inputs, args.targets
  return c


def random_batch(batch: int, inputs: int, targets: int, vocab: int) -> dict[str, np.ndarray]:
  """Uniform random ids in [3, vocab) (no padding), T5X features; decoder inputs shifted right."""
  rng = np.random.RandomState(0)
  tgt = rng.randint(3, vocab, (batch, targets)).astype(np.int32)
  return {
      'encoder_input_tokens': rng.randint(3, vocab, (batch, inputs)).astype(np.int32),
      'decoder_input_tokens': np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1),
      'decoder_target_tokens': tgt,
      'decoder_loss_weights': np.ones((batch, targets), np.float32),
  }


def peak_flops(device_kind: str) -> float | None:
  from t5lite import reporting  # pylint: disable=import-outside-toplevel
  for kind, flops in reporting.KNOWN_PEAK_FLOPS.items():
    if device_kind.startswith(kind):  # as reporting.peak_flops_per_device matches them
      return flops
  return None


def peak_memory_gib(devices) -> float | None:
  stats = [d.memory_stats() or {} for d in devices]  # None on CPU
  peaks = [s['peak_bytes_in_use'] for s in stats if 'peak_bytes_in_use' in s]
  return max(peaks) / 2**30 if peaks else None


def run_model(size: str, args) -> dict:
  """Builds one model's train step, times it; returns its row."""
  # pylint: disable=import-outside-toplevel  (no jax backend before cli.build's allocator settings)
  import jax
  from t5lite import cli, optim, partitioning, reporting, trainer
  from t5lite.data import catalog  # pylint: disable=unused-import  (validate checks data.task)
  config = build_config(size, args)
  built = cli.build(config)  # validates; mesh over all devices (mesh.data=-1); the model
  cfg, mesh, rules = built.cfg, built.mesh, built.rules
  tx, schedule = optim.make_optimizer(cfg)
  batch = random_batch(args.batch, args.inputs, args.targets, cfg.model.vocab_size)
  state, shardings = trainer.init_train_state(built.model, tx, mesh, rules, batch, cfg.train.seed)
  step = trainer.jit_train_step(
      trainer.make_train_step(built.model, tx, schedule, cfg.train, dropout=False), shardings, mesh,
      rules, watch=True)
  watch = trainer.initial_watch(mesh)
  on_mesh = partitioning.host_to_global(batch, partitioning.batch_sharding(mesh, rules))
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  times = []
  for _ in range(1 + args.warmup + args.steps):
    start = time.perf_counter()
    state, metrics, watch = step(state, on_mesh, watch)  # donates the old state
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  if not np.isfinite(float(metrics['loss'])):
    raise RuntimeError(f'{size}: non-finite loss {float(metrics["loss"])}')
  timed = times[1 + args.warmup:]
  median, best = float(np.median(timed)), float(min(timed))
  tokens = args.batch * (args.inputs + args.targets)
  flops = reporting.train_flops_per_step(cfg.model, args.batch, args.inputs, args.targets)
  kind = built.devices[0].device_kind
  peak = peak_flops(kind)
  mfu = flops / median / (peak * len(built.devices)) if peak else None
  vs_nanot5 = None
  if (size == 'base' and not args.quick and kind.startswith('NVIDIA A100')
      and (args.batch, args.inputs, args.targets) == NANOT5_SHAPE):
    vs_nanot5 = NANOT5_STEP_S / median
  return dict(row=size, model=f't5.1.1-{cfg.model.size}', params=params,
              kernels=built.model.cfg.kernels, remat=cfg.model.remat_policy,
              scan=cfg.model.scan_layers, microbatches=cfg.train.microbatches, compile_s=times[0],
              step_s_median=median, step_s_best=best, tokens_per_step=tokens,
              tokens_per_s=tokens / median, flops_per_step=flops, peak_flops_per_device=peak,
              mfu=mfu, vs_nanot5=vs_nanot5, peak_memory_gib=peak_memory_gib(built.devices),
              loss=float(metrics['loss']))


def machine() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from t5lite import reporting  # pylint: disable=import-outside-toplevel
  cpu = reporting.cpu_name()
  device = jax.devices()[0]
  return dict(platform=device.platform, device_kind=device.device_kind,
              device_count=jax.device_count(), cpu=cpu, cpu_count=os.cpu_count(),
              jax=jax.__version__, host=platform.node())


def fmt(value, spec: str) -> str:
  return '-' if value is None else format(value, spec)


def print_table(m: dict, args, rows: list[dict]) -> None:
  print(f'machine: {m["device_count"]} x {m["platform"]} {m["device_kind"]} | host CPU {m["cpu"]}, '
        f'{m["cpu_count"]} cores ({m["host"]}) | jax {m["jax"]}')
  print(f'shape: batch {args.batch}, {args.inputs} -> {args.targets} tokens, bf16, Adafactor | '
        f'{args.steps} timed steps after compile + {args.warmup} warm-up | '
        f'XLA_PYTHON_CLIENT_MEM_FRACTION={os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")} '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print('| row | model | params | kernels | remat | scan | microbatches | first step s (compile) | '
        'step s (median) | '
        'step s (best) | tokens/step | tokens/s | FLOP/step | peak TFLOP/s/device | MFU | '
        'peak mem GiB | vs nanoT5 |')
  print('|' + '---|' * 17)
  for r in rows:
    if 'error' in r:
      print(f'| {r["row"]} | {r["error"]} |' + ' - |' * 15)
      continue
    p = r['peak_flops_per_device']
    peak = 'unknown' if p is None else f'{p / 1e12:.0f}'
    mfu = 'unknown' if r['mfu'] is None else f'{100 * r["mfu"]:.1f}%'
    print(f'| {r["row"]} | {r["model"]} | {r["params"]:,} | {r["kernels"]} | {r["remat"]} | '
          f'{"yes" if r["scan"] else "no"} | {r["microbatches"]} | {r["compile_s"]:.1f} | '
          f'{r["step_s_median"]:.4f} | {r["step_s_best"]:.4f} | {r["tokens_per_step"]:,} | '
          f'{r["tokens_per_s"]:,.0f} | {r["flops_per_step"]:,.0f} | '
          f'{peak} | {mfu} | {fmt(r["peak_memory_gib"], ".1f")} | '
          f'{fmt(r["vs_nanot5"], ".2f")} |')
  print(f'nanoT5 bar (Nawrot 2023): T5.1.1-base {NANOT5_STEP_S} s/step on one A100, '
        f'bf16 + torch.compile, {NANOT5_SHAPE[1]} -> {NANOT5_SHAPE[2]} tokens; vs nanoT5 = '
        'its step / ours (A100 only)')


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='base,large', help='comma-separated: base, large')
  parser.add_argument('--batch', type=int, default=128, help='global batch, over all devices')
  parser.add_argument('--inputs', type=int, default=512)
  parser.add_argument('--targets', type=int, default=114)
  parser.add_argument('--remat', choices=('none', 'minimal', 'full'), default=None,
                      help=f'model.remat_policy for every row (default per model: {DEFAULT_REMAT})')
  parser.add_argument('--scan', action='store_true', help='model.scan_layers (faster compile)')
  parser.add_argument('--microbatches', type=int, default=1, help='gradient accumulation')
  parser.add_argument('--steps', type=int, default=10, help='timed steps')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after the compile')
  parser.add_argument(
      '--quick', action='store_true',
      help='tiny preset, vocab 2048, batch 8, 64 -> 16 tokens, 2 steps for every row (CPU test)')
  parser.add_argument('--json', default='', help='also write the machine and rows here')
  return parser


def main(argv=None):
  parser = make_parser()
  args = parser.parse_args(argv)
  # JAX takes 75% of a GPU's memory by default; a benchmark may take nearly all of it (large at
  # batch 128). Read when the backend starts, so set before cli.build; an explicit value wins.
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95')
  # T5.1.1's vocabulary: 32,000 SentencePiece ids + 100 sentinels, padded to a multiple of 128.
  args.preset, args.vocab = None, 32128
  if args.quick:  # quickstart's 2048-id vocabulary: the 32128-row output layer would dominate
    args.preset, args.vocab, args.batch, args.inputs, args.targets = 'tiny', 2048, 8, 64, 16
    args.steps, args.warmup = 2, 1
  sizes = [s.strip() for s in args.models.split(',') if s.strip()]
  for size in sizes:
    if size not in DEFAULT_REMAT:
      parser.error(f'unknown model {size!r}; valid: {", ".join(DEFAULT_REMAT)}')
  rows = []
  for size in sizes:
    try:
      rows.append(run_model(size, args))
    except Exception as e:  # pylint: disable=broad-except  (an OOM row should not hide the next)
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      rows.append(dict(row=size, error='out of memory: try --remat minimal|full or --microbatches'))
  m = machine()
  print_table(m, args, rows)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'machine': m, 'args': vars(args), 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
