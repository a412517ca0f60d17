"""Test set-up: 8 simulated CPU devices (must be set before JAX initialises)."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import dataclasses
import socket

import pytest

GCS_BUCKET = 't5lite-test'  # tensorstore refuses bucket names under 3 characters


@dataclasses.dataclass
class FakeGcs:
  """A GCS API on 127.0.0.1 (gcp-storage-emulator, in memory) and one fresh folder in its bucket.

  `url` is gs://t5lite-test/<test>; `env` is what a subprocess needs to talk to the emulator (the
  test's own process has it set already); `objects()` lists every object under `url`."""
  url: str
  env: dict
  endpoint: str

  def objects(self) -> list[str]:
    from etils import epath  # pylint: disable=import-outside-toplevel

    def walk(folder):
      for entry in folder.iterdir():
        yield from walk(entry) if entry.is_dir() else [os.fspath(entry)]

    return sorted(walk(epath.Path(self.url)))


def _emulator_env(endpoint: str) -> dict:
  return {
      'STORAGE_EMULATOR_HOST': endpoint,  # gcsfs and google-cloud-storage
      'TENSORSTORE_GCS_HTTP_URL': endpoint,  # tensorstore, under orbax
      'GOOGLE_CLOUD_PROJECT': 't5lite-test',
      # gcsfs's bucket-layout lookup needs real credentials and warns at every call without them
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
  }


@pytest.fixture(scope='session')
def gcs_endpoint():
  """One emulator per test process, started in-process on a free port of 127.0.0.1."""
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  server = create_server('127.0.0.1', port, in_memory=True, default_bucket=GCS_BUCKET)
  server.start()
  endpoint = f'http://127.0.0.1:{port}'
  saved = {k: os.environ.get(k) for k in _emulator_env(endpoint)}
  os.environ.update(_emulator_env(endpoint))
  try:
    yield endpoint
  finally:
    server.stop()
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


@pytest.fixture
def gcs(gcs_endpoint, request):
  """A fresh gs:// folder for this test on the emulator; see FakeGcs."""
  name = request.node.name.replace('[', '-').replace(']', '').replace('/', '-')
  env = dict(os.environ, **_emulator_env(gcs_endpoint))
  return FakeGcs(url=f'gs://{GCS_BUCKET}/{name}', env=env, endpoint=gcs_endpoint)
