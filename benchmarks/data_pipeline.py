"""Data pipeline throughput: tokens/s of host-local batches.

    python benchmarks/data_pipeline.py [--batches 50]

Measures the quickstart task (embedded_span_corruption, inputs 128, batch 8) and the
T5.1.1-small shapes (inputs 512 / targets 114, batch 8) for span corruption and UL2,
counting non-padding encoder + decoder tokens. Compare with the train step's
tokens/s (benchmarks/train_step.py) measured in the same run: the issue asks for >= 10x.
"""

import argparse
import time

from t5lite.data import pipeline


def measure(task, lengths, batch, batches):
  it = pipeline.make_task_iterator(task, feature_lengths=lengths, global_batch_size=batch,
                                   seed=0, process_index=0, process_count=1)
  next(it)  # warm-up: vocabulary, tokenized corpus, threads
  t0 = time.perf_counter()
  tokens = 0
  for _ in range(batches):
    b = next(it)
    tokens += int((b['encoder_input_tokens'] != 0).sum() + (b['decoder_target_tokens'] != 0).sum())
  dt = time.perf_counter() - t0
  return tokens / dt, batches / dt


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--batches', type=int, default=50)
  args = p.parse_args()
  for task, lengths in [('embedded_span_corruption', {'inputs': 128, 'targets': 29}),
                        ('embedded_span_corruption', {'inputs': 512, 'targets': 114}),
                        ('embedded_ul2', {'inputs': 512, 'targets': 114})]:
    tps, bps = measure(task, lengths, 8, args.batches)
    print(f'{task:28s} {lengths}  batch 8: {tps:12,.0f} tokens/s  {bps:8.1f} batches/s')


if __name__ == '__main__':
  main()
