"""Decoding speed: greedy and beam search, with and without the key/value cache.

    python benchmarks/decoding.py          # quickstart and T5.1.1-small shapes (a few minutes)
    python benchmarks/decoding.py --quick  # tiny lengths, quickstart shape only: checks it runs

Shapes: `quickstart` is configs/quickstart.py's model (tiny T5.1.1, vocab 2048, inputs 128);
`small` is T5.1.1-small (vocab 32128) with short inputs and outputs. Parameters are random and
EOS is disabled (eos_id=-1), so every row decodes exactly `--length` tokens. "Uncached"
re-runs the decoder over the whole fixed-size token buffer at every step (the encoder still runs
once); its tokens must equal the cached ones, which the table checks. Tokens/s counts generated
output tokens (batch x length), not beams. Rows run interleaved in rounds so that machine noise
spreads over all of them; the median round is reported.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from t5lite import reporting
from t5lite.models import decoding
from t5lite.models.presets import ModelConfig, model_config
from t5lite.models.t5 import make_model

SHAPES = {  # name: (size, vocab, default batch, inputs length, decode length)
    'quickstart': ('tiny', 2048, 8, 128, 32),
    'small': ('small', 32128, 4, 64, 16),
}
METHODS = [('greedy', dict(method='greedy')), ('beam4', dict(method='beam', num_beams=4))]


def random_params(model, seed=0):
  """Random parameters drawn in numpy from the abstract shapes (fast even for 77M
  parameters); N(0, 1/fan_in) like the model's initialiser, embeddings N(0, 1)."""
  example = {
      'encoder_input_tokens': jnp.ones((1, 1), jnp.int32), 'decoder_input_tokens': jnp.ones(
          (1, 1), jnp.int32)
  }
  abstract = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), **example)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'scale':
      return np.ones(leaf.shape, np.float32)
    std = 1.0 if name in ('embedding', 'rel_embedding') else leaf.shape[0]**-0.5
    return (std * rng.standard_normal(leaf.shape, np.float32)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract['params'])


def machine() -> str:
  return (f'{reporting.cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__} devices: '
          f'{", ".join(str(d) for d in jax.devices())}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', default='quickstart,small')
  parser.add_argument('--batch', type=int, default=None, help='default: per shape')
  parser.add_argument('--inputs', type=int, default=None, help='encoder length; default per shape')
  parser.add_argument('--length', type=int, default=None, help='decode length; default per shape')
  # float32 by default so that cached and uncached tokens must agree exactly; in bfloat16
  # rounding differs between the two paths and can flip near-tied tokens.
  parser.add_argument('--dtype', default='float32', choices=['bfloat16', 'float32'])
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--quick', action='store_true', help='quickstart shape, batch 2, 16 -> 4')
  args = parser.parse_args()
  if args.quick:
    args.shapes, args.batch, args.inputs, args.length, args.rounds = 'quickstart', 2, 16, 4, 1

  rows = []
  for shape in args.shapes.split(','):
    size, vocab, batch, inputs, length = SHAPES[shape]
    batch, inputs, length = args.batch or batch, args.inputs or inputs, args.length or length
    c = model_config(size, variant='v1_1', vocab_size=vocab)
    c.dtype = args.dtype
    model = make_model(ModelConfig.from_config(c))
    params = jax.device_put(random_params(model))
    tokens = np.random.default_rng(1).integers(2, vocab, (batch, inputs)).astype(np.int32)
    data = {'encoder_input_tokens': tokens}
    for method, kw in METHODS:
      cfg = decoding.DecodeConfig(max_decode_length=length, eos_id=-1, **kw)
      for use_cache in (True, False):
        start = time.perf_counter()
        out = decoding.decode(model, params, data, cfg, use_cache=use_cache)
        jax.block_until_ready(out)
        rows.append(
            dict(shape=shape, method=method, cache=use_cache, batch=batch,
                 lengths=f'{inputs}->{length}', compile=time.perf_counter() - start, times=[],
                 run=(model, params, data, cfg, use_cache), tokens=np.asarray(out.tokens)))
  for _ in range(args.rounds):
    for row in rows:
      model, params, data, cfg, use_cache = row['run']
      start = time.perf_counter()
      jax.block_until_ready(decoding.decode(model, params, data, cfg, use_cache=use_cache))
      row['times'].append(time.perf_counter() - start)

  print(f'machine: {machine()}')
  print(f'dtype {args.dtype}, random parameters, EOS disabled, median of {args.rounds} rounds\n')
  header = ('shape', 'method', 'cache', 'batch', 'in->out', 'compile+1st s', 'decode s', 'tokens/s',
            'cache speed-up', 'same tokens')
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  for row in rows:
    seconds = float(np.median(row['times']))
    row['seconds'] = seconds
    cached = next(r for r in rows
                  if r['shape'] == row['shape'] and r['method'] == row['method'] and r['cache'])
    speedup = f"{seconds / cached['seconds']:.1f}x" if not row['cache'] else ''
    same = 'yes' if np.array_equal(row['tokens'], cached['tokens']) else 'NO'
    tokens_per_s = row['batch'] * int(row['lengths'].split('->')[1]) / seconds
    print(f"| {row['shape']} | {row['method']} | {'yes' if row['cache'] else 'no'} | "
          f"{row['batch']} | {row['lengths']} | {row['compile']:.1f} | {seconds:.3f} | "
          f'{tokens_per_s:.0f} | {speedup} | {same} |')


if __name__ == '__main__':
  main()
