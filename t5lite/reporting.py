"""Metrics out: one printed line, TensorBoard events and WORKDIR/metrics.jsonl; FLOPs and MFU.

Only process 0 writes. WORKDIR may be a URL (gs://...): an object cannot be appended to, so there
metrics.jsonl is kept in memory and uploaded whole (and the TensorBoard event file, which
tensorboardX's gs:// writer also uploads whole) at most every `flush_s` seconds, at every
checkpoint (`flush()`, called by train.py before each save, so that a resumed run finds every
line up to its checkpoint) and at the end. Locally each line is appended and flushed at once.

Model FLOPs are counted from the shapes (matmuls only, the standard
convention of Kaplan et al. 2020 / PaLM's MFU): a training step costs 3x the forward pass
(backward = 2x forward); rematerialisation is not counted, as MFU measures useful work.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time

import jax
import jax.numpy as jnp

from t5lite import files

# Dense bf16 peak FLOP/s per device from vendor data sheets, looked up by jax device_kind.
log = logging.getLogger(__name__)

KNOWN_PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA A100': 312e12,
}


def forward_flops_per_example(model_cfg, inputs_length: int, targets_length: int) -> float:
  """Matmul FLOPs of one forward pass for one (inputs, targets) example of the given lengths.

  2 FLOPs per multiply-add. Attention scores and the weighted sum count the full L x L square
  (masking does not skip work). For decoder-only models, `targets_length` is the sequence.
  """
  d, ff, inner = model_cfg.d_model, model_cfg.d_ff, model_cfg.num_heads * model_cfg.head_dim
  # Gated MLPs have wi_0, wi_1, wo; relu has wi, wo. (ModelConfig.gated's rule, spelled out for
  # the config.model ConfigDict too: '' takes the variant's activation, gated only for v1_1.)
  activation = (model_cfg.mlp_activation
                or ('gated-gelu' if model_cfg.variant == 'v1_1' else 'relu'))
  mlp_mats = 3 if activation.startswith('gated-') else 2
  mlp = 2 * d * ff * mlp_mats
  projections = 2 * 4 * d * inner  # q, k, v, out

  def attention(q_len, k_len):
    return 2 * 2 * q_len * k_len * inner  # scores and weighted sum

  dec_len = targets_length
  flops = 2 * d * model_cfg.vocab_size * dec_len  # logits
  per_dec_layer = dec_len * (projections + mlp) + attention(dec_len, dec_len)
  if model_cfg.architecture == 'encoder_decoder':
    enc_len = inputs_length
    per_enc_layer = enc_len * (projections + mlp) + attention(enc_len, enc_len)
    # cross-attention: q/out on decoder tokens, k/v on encoder tokens
    per_dec_layer += (dec_len * 2 * 2 * d * inner + enc_len * 2 * 2 * d * inner
                      + attention(dec_len, enc_len))
    flops += model_cfg.num_encoder_layers * per_enc_layer
  flops += model_cfg.num_decoder_layers * per_dec_layer
  return float(flops)


def train_flops_per_step(model_cfg, batch_size: int, inputs_length: int,
                         targets_length: int) -> float:
  return 3.0 * batch_size * forward_flops_per_example(model_cfg, inputs_length, targets_length)


def measure_matmul_peak(dtype: str, m: int = 2048, k: int = 512, n: int = 1024,
                        repeats: int = 8) -> float:
  """FLOP/s of one matmul on the first device, the best of `repeats`; operands in `dtype` with
  float32 accumulation, like the model's. Used as the CPU "peak", measured in the same run: the
  best run, not the median, since a peak is what the hardware can do, and on a shared machine a
  median moved by 2x between runs."""
  device = jax.devices()[0]
  a = jax.device_put(jnp.ones((m, k), dtype), device)
  b = jax.device_put(jnp.ones((k, n), dtype), device)
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2.0 * m * k * n / min(times)


def cpu_name() -> str:
  """The host CPU's model name (/proc/cpuinfo), for the machine line of logs and benchmarks."""
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def peak_flops_per_device(configured: float, dtype: str) -> tuple[float, str]:
  """(peak FLOP/s per device, how it was obtained). 0 configured: table, or measured on CPU."""
  if configured > 0:
    return configured, 'config'
  device = jax.devices()[0]
  if device.platform == 'cpu':
    # Simulated CPU devices share the same cores: split the machine's rate between them.
    per_device = measure_matmul_peak(dtype) / jax.local_device_count()
    return per_device, 'measured matmul on CPU'
  for kind, flops in KNOWN_PEAK_FLOPS.items():
    if device.device_kind.startswith(kind):
      return flops, f'data sheet ({kind})'
  return 0.0, f'unknown device kind {device.device_kind!r}: set reporting.peak_flops_per_device'


class MetricWriter:
  """Writes a dict of scalars per logged step; a no-op on processes other than 0."""

  def __init__(self, workdir: str, tensorboard: bool = True, purge_step: int | None = None,
               flush_s: float = 60.0):
    """`purge_step`: the first step a resumed run logs again. TensorBoard event files are
    append-only; the purge marker makes TensorBoard drop the earlier run's events from that step
    on, so replayed steps show once (metrics.jsonl is trimmed the same way, in train.py).
    `flush_s`: on a URL workdir, the most seconds between two uploads (see the module
    docstring); unused locally."""
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._remote = files.is_url(workdir)
    self._lines: list[str] = []  # a URL's metrics.jsonl, uploaded whole
    self._dirty = False
    self._flush_s, self._flushed_at = flush_s, time.monotonic()
    if not self.active:
      return
    if self._remote:
      self._path = files.to_path(workdir) / 'metrics.jsonl'
      if self._path.exists():
        self._lines = [
            line if line.endswith('\n') else line + '\n'
            for line in self._path.read_text().splitlines()
        ]
    else:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    if tensorboard:
      from tensorboardX import SummaryWriter  # imported lazily: optional at run time
      self._tb = SummaryWriter(files.join(workdir, 'tensorboard'), purge_step=purge_step)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.active:
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    if self._tb is not None:
      for key, value in metrics.items():
        self._tb.add_scalar(f'train/{key}', float(value), int(step))
    if self._remote:
      self._lines.append(json.dumps(record) + '\n')
      self._dirty = True
      if time.monotonic() - self._flushed_at >= self._flush_s:
        self.flush()
    else:
      self._jsonl.write(json.dumps(record) + '\n')
      self._jsonl.flush()
      if self._tb is not None:
        self._tb.flush()
    log.info(format_line(step, metrics))

  def flush(self) -> None:
    """Everything written so far is in the files (on a URL: uploaded whole, if anything
    changed since the last upload)."""
    if not self.active:
      return
    if self._remote and self._dirty:
      files.write_text(self._path, ''.join(self._lines))
      self._dirty = False
    if self._tb is not None:
      self._tb.flush()
    self._flushed_at = time.monotonic()

  def close(self) -> None:
    if not self.active:
      return
    if self._remote:
      self.flush()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Throughput:
  """Steps/s, tokens/s, MFU and ETA over the steps since the last log line.

  The first step of a run includes compilation, so timing starts when it has finished
  (`start`); time spent evaluating is taken out with `pause` so it does not count as training.
  """

  def __init__(self, flops_per_step: float, total_peak_flops: float, total_steps: int):
    self.flops_per_step, self.total_peak, self.total_steps = (flops_per_step, total_peak_flops,
                                                              total_steps)
    self.since, self.steps, self.tokens = None, 0, 0

  def start(self) -> None:
    self.since, self.steps, self.tokens = time.perf_counter(), 0, 0

  def count(self, tokens: int) -> None:
    """One more timed step of `tokens` (this process's rows) tokens."""
    self.steps += 1
    self.tokens += tokens

  def pause(self, seconds: float) -> None:
    if self.since is not None:
      self.since += seconds

  def values(self, step: int, process_count: int) -> dict[str, float]:
    """The rates since the last call (none before the first timed step); restarts the interval."""
    now, out = time.perf_counter(), {}
    if self.steps > 0:
      elapsed = now - self.since
      step_time = elapsed / self.steps
      out['steps_per_sec'] = 1.0 / step_time
      # Every process counted its own rows: scale to the global batch.
      out['tokens_per_sec'] = self.tokens * process_count / elapsed
      if self.total_peak > 0:
        out['mfu'] = self.flops_per_step / step_time / self.total_peak
      out['eta_seconds'] = step_time * (self.total_steps - step)
    self.since, self.steps, self.tokens = now, 0, 0
    return out


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def format_line(step: int, m: dict[str, float]) -> str:
  """One line per logged step; only the values present are printed."""
  fields = (('loss', 'loss {:.4f}'), ('distill_kl', 'kl {:.4f}'), ('accuracy', 'acc {:.3f}'),
            ('learning_rate', 'lr {:.3g}'), ('grad_norm', 'gnorm {:.3f}'),
            ('steps_per_sec', '{:.2f} steps/s'), ('tokens_per_sec', '{:.0f} tok/s'),
            ('eval/loss', 'eval loss {:.4f}'), ('eval/accuracy', 'eval acc {:.3f}'))
  parts = [f'step {step}'] + [fmt.format(m[key]) for key, fmt in fields if key in m]
  if 'mfu' in m:
    parts.append(f'MFU {100 * m["mfu"]:.1f}%')
  if 'eta_seconds' in m:
    parts.append(f'ETA {_duration(m["eta_seconds"])}')
  return ' | '.join(parts)
