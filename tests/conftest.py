"""Test set-up: 8 simulated CPU devices (must be set before JAX initialises)."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# libtpu (test extra, for t5lite.aot's TPU compiles): no TPU metadata-server queries, and no
# machine-wide lock file, so that xdist workers and their subprocesses can all compile at once.
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import dataclasses
import socket
import sys
from http import HTTPStatus

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
      # a fixed token keeps tensorstore from probing for Google credentials (the emulator takes any)
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
  }


def _send_generations() -> None:
  """The emulator leaves out the x-goog-generation / x-goog-metageneration headers that GCS
  sends with every media download; tensorstore's OCDBT manifest reads need them (without them, a
  save of a real model fails with 'Malformed StorageGeneration'). Added here, as GCS does."""
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  original = objects.download
  if getattr(original, 't5lite_generations', False):
    return

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = str(obj['generation'])
      response['x-goog-metageneration'] = str(obj['metageneration'])

  download.t5lite_generations = True
  objects.download = download  # objects.get(alt=media) calls it through the module
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is original:
        handlers[method] = download


def _quiet_disconnects(httpd) -> None:
  """A client that hangs up before the emulator has answered (tensorstore cancels reads it no
  longer needs) makes the server print a BrokenPipeError traceback; any other error still prints."""
  original = httpd.handle_error

  def handle_error(request, client_address):
    if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
      original(request, client_address)

  httpd.handle_error = handle_error


@pytest.fixture(scope='session')
def gcs_endpoint():
  """One emulator per test process, started in-process on a free port of 127.0.0.1."""
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  _send_generations()
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  server = create_server('127.0.0.1', port, in_memory=True, default_bucket=GCS_BUCKET)
  server.start()
  _quiet_disconnects(server._api._httpd)  # pylint: disable=protected-access
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
