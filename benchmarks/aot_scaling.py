"""The docs/scaling.md table: T5.1.1 and UL2-20B-shaped train steps compiled for TPU slices.

    python benchmarks/aot_scaling.py [--only xxl] [--topologies v5e:4x4,v4:2x4x4] [--json FILE]

Each row runs one `python -m t5lite.aot ... --steps train --json` in a fresh process (the command
is printed in the table, so any row can be reproduced alone) and reports the mesh, the batch,
per-chip memory against HBM, and the step time the model FLOPs imply at the chip's bf16 peak. A
row that does not fit is compiled again with the batch in 2, then 4 microbatches.
Compiling needs no TPU, only libtpu (`pip install -e '.[aot]'`); the compile time of each row on
this host is printed too. The machine's CPU is named in the output.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import subprocess
import sys
import time

from t5lite import reporting

GIB = 2**30
# (slice name, topology, chips)
SLICES = (('v5e-16', 'v5e:4x4', 16), ('v5e-256', 'v5e:16x16', 256), ('v4-64', 'v4:2x4x4', 32),
          ('v5p-128', 'v5p:4x4x4', 64))
MODELS = ('small', 'base', 'large', 'xl', 'xxl', 'ul2_20b')
# Parameters split over at most this many chips (fsdp); the rest of the slice is data parallel.
# Small models keep their weights whole (pure data parallelism: no per-layer all-gathers).
FSDP = {'small': 1, 'base': 1, 'large': 16, 'xl': 16, 'xxl': 64, 'ul2_20b': 256}
BATCH = 256  # sequences of 512 + 114 tokens per step (T5.1.1 pretrained at 2048)


def row_flags(model: str, chips: int, batch: int) -> list[str]:
  fsdp = min(FSDP[model], chips)
  return [
      f'--config=configs/pretrain_c4.py:{model}', f'--config.mesh.fsdp={fsdp}',
      '--config.mesh.data=-1', f'--config.train.batch_size={max(batch, chips)}'
  ]


def compile_row(model: str, name: str, topology: str, flags: list[str]) -> dict | None:
  """One `python -m t5lite.aot --json` in its own process; prints the row, returns the report."""
  command = ['python', '-m', 't5lite.aot', '--topology', topology, '--steps', 'train', *flags]
  start = time.perf_counter()
  done = subprocess.run(command + ['--json'], capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  shown = ' '.join(command)
  if done.returncode != 0:
    error = (done.stderr.strip().splitlines() or ['?'])[-1]
    print(f'| {model} | {name} | | | | | | | error: {error} | | {seconds:.0f} | `{shown}` |',
          flush=True)
    return None
  r = json.loads(done.stdout[done.stdout.index('{'):])
  s, mesh = r['steps']['train'], r['mesh']
  print(
      f'| {model} | {name} | {mesh["data"]}, {mesh["fsdp"]} | {r["batch_size"]} '
      f'(x{r["microbatches"]}) | {r["model"]["params"] / 1e9:.2f}B | {s["arguments"] / GIB:.2f} | '
      f'{s["temporaries"] / GIB:.2f} | {s["total"] / GIB:.1f} / {s["hbm"] / GIB:.0f} | '
      f'{"yes" if s["fits"] else "NO"} | {r["step_seconds_at_peak"] * 1e3:.0f} ms | '
      f'{seconds:.0f} | `{shown}` |', flush=True)
  return {'command': shown, 'compile_seconds': seconds, **r}


def libtpu_version() -> str:
  try:
    return importlib.metadata.version('libtpu')
  except importlib.metadata.PackageNotFoundError:
    return 'not installed'


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', default='', help='comma-separated models (default: all)')
  parser.add_argument('--topologies', default='', help='comma-separated topologies (default: all)')
  parser.add_argument('--batch', type=int, default=BATCH)
  parser.add_argument('--json', default='', help='also write the reports to this file')
  args = parser.parse_args()
  models = args.only.split(',') if args.only else MODELS
  wanted = args.topologies.split(',') if args.topologies else [t for _, t, _ in SLICES]
  print(
      f'# compiled on {cpu_name()}, python {platform.python_version()}, libtpu '
      f'{libtpu_version()}', flush=True)
  print('| model | slice | mesh (data, fsdp) | batch | params | args GiB | temp GiB | total / HBM '
        'GiB | fits | step at peak | compile s | command |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|', flush=True)
  reports = []
  for model in models:
    for name, topology, chips in SLICES:
      if topology not in wanted:
        continue
      # The batch as given first; when that does not fit, the same batch in 2, then 4
      # microbatches (gradient accumulation: activations of a half or a quarter at a time).
      for microbatches in (1, 2, 4):
        flags = row_flags(model, chips, args.batch)
        if microbatches > 1:
          flags.append(f'--config.train.microbatches={microbatches}')
        report = compile_row(model, name, topology, flags)
        if report is not None:
          reports.append(report)
        if report is None or report['steps']['train']['fits']:
          break
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(reports, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
