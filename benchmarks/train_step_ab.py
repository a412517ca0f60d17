"""The train step of two source trees side by side: e.g. a commit before a change (a git worktree)
against the working tree, the latter with the device-side Watch on (issue 14).

    git worktree add /tmp/base 00df996
    python benchmarks/train_step_ab.py --base /tmp/base --new . --reps 5 --steps 10
    git worktree remove /tmp/base

Each (tree, shape, repetition) runs in its own subprocess with PYTHONPATH at its tree (t5lite and
that tree's benchmarks/train_throughput.py, whose build_config and random_batch define the rows:
AdamW with clipping, z-loss on, no padding); the trees alternate, so slow drifts of the machine's
load hit both alike. Reported: per repetition the median step time, then the median over
repetitions and new / base.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {
    # configs/quickstart.py's model and batch in its dtype (the default run).
    'quickstart-bf16': dict(name='quickstart', batch=32, inputs=128, targets=32, size='quickstart',
                            dtype='bfloat16'),
    # T5.1.1-small width and vocabulary (32128) with 2+2 layers: the loss over the vocabulary is a
    # larger share of the step than with 8+8 layers, so a change there shows more.
    'small-2L-f32': dict(name='small-2L', batch=8, inputs=512, targets=114, size='small', layers=2,
                         dtype='float32'),
}


def worker(tree: str, shape_key: str, steps: int, watch: bool) -> dict:
  sys.path[:0] = [tree, os.path.join(tree, 'benchmarks')]
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_enable_compilation_cache', False)
  import train_throughput as tt  # pylint: disable=import-outside-toplevel  (the tree's own)
  import t5lite  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from t5lite import host_memory, optim, partitioning, trainer
  from t5lite.models.presets import ModelConfig  # pylint: disable=import-outside-toplevel
  from t5lite.models.t5 import make_model  # pylint: disable=import-outside-toplevel
  assert os.path.realpath(t5lite.__file__).startswith(os.path.realpath(tree)), t5lite.__file__

  spec = dict(SHAPES[shape_key])
  dtype = spec.pop('dtype')
  shape = tt.Shape(**spec)
  config = tt.build_config(shape, dtype)
  host_memory.keep_freed_memory(config.keep_host_memory)
  rules = config.partitioning.rules
  mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  model = make_model(ModelConfig.from_config(config.model))
  tx, schedule = optim.make_optimizer(config)
  batch = tt.random_batch(shape, config.model.vocab_size)
  state, shardings = trainer.init_train_state(model, tx, mesh, rules, batch, config.train.seed)
  train_step = trainer.make_train_step(model, tx, schedule, config.train, dropout=False)
  global_batch = partitioning.host_to_global(batch, partitioning.batch_sharding(mesh, rules))
  if watch:
    jitted = trainer.jit_train_step(train_step, shardings, mesh, rules, watch=True)
    carry = trainer.initial_watch(mesh)

    def step(state):
      nonlocal carry
      state, metrics, carry = jitted(state, global_batch, carry)
      return state, (metrics, carry)
  else:
    jitted = trainer.jit_train_step(train_step, shardings, mesh, rules)
    step = lambda state: jitted(state, global_batch)

  times, cpu = [], []
  for _ in range(2 + steps):  # the first (compile) and one warm-up step are not timed
    start, start_cpu = time.perf_counter(), time.process_time()
    state, out = step(state)
    jax.block_until_ready((state, out))
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return {
      'cpu': cpu[2:], 'times': times[2:],
      'loss': float(jax.device_get(out)[0]['loss'] if watch else out['loss'])
  }


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--base', help='the tree before the change')
  parser.add_argument('--new', help='the tree after it (its step run watched)')
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--shapes', default=','.join(SHAPES))
  parser.add_argument('--loss-reps', type=int, default=0,
                      help='also time the loss function alone, in one process, this many times')
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    spec = json.loads(args.worker)
    print('RESULT ' + json.dumps(worker(**spec)), flush=True)
    return 0
  if not (args.base and args.new):
    parser.error('--base and --new are required')
  trees = {'base': os.path.abspath(args.base), 'new': os.path.abspath(args.new)}
  if args.loss_reps:
    loss_ab(trees['base'], trees['new'], args.loss_reps)
  results = {(s, v): [] for s in args.shapes.split(',') for v in trees}
  for rep in range(args.reps):
    for shape_key in args.shapes.split(','):
      order = ('base', 'new') if rep % 2 == 0 else ('new', 'base')  # alternate who goes first
      for variant in order:
        spec = dict(tree=trees[variant], shape_key=shape_key, steps=args.steps,
                    watch=variant == 'new')
        env = dict(os.environ, PYTHONPATH=trees[variant])
        load = os.getloadavg()[0]
        done = subprocess.run(
            [sys.executable,
             os.path.abspath(__file__), '--worker',
             json.dumps(spec)], capture_output=True, text=True, env=env, cwd=trees[variant])
        lines = [l for l in done.stdout.splitlines() if l.startswith('RESULT ')]
        if not lines:
          print(done.stderr[-3000:], file=sys.stderr)
          return 1
        result = json.loads(lines[-1][len('RESULT '):])
        median = statistics.median(result['times'])
        cpu = statistics.median(result['cpu'])
        results[(shape_key, variant)].append((median, cpu))
        print(
            f'rep {rep + 1} {shape_key} {variant}: {median * 1e3:.1f} ms/step, CPU '
            f'{cpu * 1e3:.1f} ms/step (load {load:.1f}, loss {result["loss"]:.4f})',
            file=sys.stderr, flush=True)
  if not args.reps:
    return 0

  print(
      '| shape | base wall ms/step | new + watch wall ms/step | new / base wall | '
      'base CPU ms/step | new CPU ms/step | new / base CPU | base reps (wall) | new reps (wall) |')
  print('|---|---|---|---|---|---|---|---|---|')
  for shape_key in args.shapes.split(','):
    base, new = results[(shape_key, 'base')], results[(shape_key, 'new')]
    b, n = (statistics.median(x[0] for x in r) for r in (base, new))
    bc, nc = (statistics.median(x[1] for x in r) for r in (base, new))
    print(f'| {shape_key} | {b * 1e3:.1f} | {n * 1e3:.1f} | {n / b:.3f} | {bc * 1e3:.1f} | '
          f'{nc * 1e3:.1f} | {nc / bc:.3f} | {" ".join(f"{x[0] * 1e3:.0f}" for x in base)} | '
          f'{" ".join(f"{x[0] * 1e3:.0f}" for x in new)} |')
  return 0


def loss_ab(base: str, new: str, reps: int) -> None:
  """cross_entropy_sums (forward + gradient, z-loss on) of both trees' losses.py in one process,
  interleaved: the accuracy change is the only part of the step that reads [B, L, V] anew."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  def module(tree, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(tree, 't5lite', 'losses.py'))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m

  fns = {}
  for variant, tree in (('base', base), ('new', new)):
    losses = module(tree, f'losses_{variant}')

    def f(logits, targets, weights, losses=losses):
      sums = losses.cross_entropy_sums(logits, targets, weights, 1e-4)
      return sums['loss_sum'] + sums['z_loss_sum'], sums

    fns[variant] = jax.jit(jax.grad(f, has_aux=True))
  print('| loss fn (fwd + grad), logits | base ms | new ms | new / base |')
  print('|---|---|---|---|')
  for shape in ((8, 114, 32128), (32, 32, 2048)):
    rng = np.random.RandomState(0)
    logits = jnp.asarray(rng.randn(*shape), jnp.float32)
    targets = jnp.asarray(rng.randint(0, shape[-1], shape[:2]))
    weights = jnp.ones(shape[:2], jnp.float32)
    times = {'base': [], 'new': []}
    for variant in fns:  # compile
      jax.block_until_ready(fns[variant](logits, targets, weights))
    for _ in range(reps):
      for variant in fns:
        start = time.perf_counter()
        jax.block_until_ready(fns[variant](logits, targets, weights))
        times[variant].append(time.perf_counter() - start)
    b, n = (statistics.median(times[v]) for v in ('base', 'new'))
    print(f'| {"x".join(map(str, shape))} f32 | {b * 1e3:.2f} | {n * 1e3:.2f} | {n / b:.3f} |',
          flush=True)


if __name__ == '__main__':
  sys.exit(main())
