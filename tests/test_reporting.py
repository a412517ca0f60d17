"""MetricWriter: metrics.jsonl lines and TensorBoard events, including the purge marker that a
resumed run writes so TensorBoard shows replayed steps once."""
import glob
import json
import struct
import time

from tensorboardX.proto import event_pb2

from t5lite import reporting


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
