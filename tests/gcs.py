"""A Google Cloud Storage API emulator for the tests: gs:// work dirs without the cloud.

A test module imports the fixtures (`from gcs import gcs_emulator, gs_dir  # noqa: F401`).
`gcs_emulator` (one per session) runs gcp-storage-emulator, a pure-Python server from PyPI
with an in-memory store, in a subprocess on a free loopback port (this file is its launcher),
creates BUCKET, and points every client the trainer uses at it, in this process and in the
subprocesses the tests start (they inherit os.environ); `gs_dir` is a fresh gs://BUCKET/...
directory for one test.

What each client needs, found by trying (see `_environment`):
  - etils.epath -> fsspec -> gcsfs (the work directory, metrics, orbax's metadata files):
    STORAGE_EMULATOR_HOST, anonymous credentials, and gcsfs's plain GCSFileSystem;
  - tensorstore (orbax's array data): TENSORSTORE_GCS_HTTP_URL and a fixed token; and two
    behaviours of GCS the emulator lacks, which the launcher adds (see `_serve`).
"""

import argparse
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from etils import epath

BUCKET = "parti-jax-tests"


def _environment(url: str) -> dict[str, str]:
  """The variables that send every client of the trainer to the emulator at `url`."""
  return {
      # gcsfs (and google-cloud-storage) send every request here instead of to Google.
      "STORAGE_EMULATOR_HOST": url,
      # etils.epath opens gs:// with fsspec.filesystem("gcs") and no credentials, so gcsfs
      # would look for some: Google's application-default credentials (a developer's real
      # ones would be sent to the emulator), then the GCE metadata server. fsspec reads
      # FSSPEC_<PROTOCOL>_<ARGUMENT> when imported: anonymous, in the subprocesses too.
      "FSSPEC_GCS_TOKEN": "anon",
      # Recent gcsfs (2026.10 here) makes an ExtendedGcsFileSystem by default, which asks
      # the Storage Control API (gRPC, which the emulator does not serve) whether a bucket
      # is zonal or hierarchical and waits 60 s for the answer, again and again in one run.
      # Read when gcsfs is imported.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      # tensorstore's gcs driver (orbax writes and reads array data through it) connects
      # here instead of https://storage.googleapis.com; read once, at its first request.
      "TENSORSTORE_GCS_HTTP_URL": url,
      # tensorstore then takes this bearer token instead of looking for credentials
      # (GOOGLE_APPLICATION_CREDENTIALS, gcloud's file, the metadata server). Without any it
      # goes anonymous after logging an error, but real ones would be used where there are.
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      # tensorstore's curl honours http_proxy; a loopback request must not go to a proxy.
      "no_proxy": ",".join(filter(None, [os.environ.get("no_proxy"), "127.0.0.1"])),
      "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"])),
  }


def _serve(port: int, bucket: str) -> None:
  """Runs the emulator until killed, with two behaviours of GCS that tensorstore relies on.

  orbax's OCDBT checkpoints read a manifest and write it back on the condition that nobody
  changed it, which tensorstore expresses with object generations:
    - a read learns the generation from the `x-goog-generation` response header, which the
      emulator does not send (tensorstore then takes generation 0 and refuses the next
      conditional write: "Malformed StorageGeneration");
    - `ifGenerationMatch` / `ifGenerationNotMatch` make a request conditional (0: the object
      must not exist), answered 412 Precondition Failed (304 Not Modified for a read whose
      copy is current) by GCS; the emulator ignores them and always writes.
  Each request handler of the emulator is wrapped to do both; everything else is its own.
  """
  from http import HTTPStatus

  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound

  def object_name(request) -> str | None:
    if "object_id" in request.params:
      return request.params["object_id"]
    if "name" in request.query:  # an upload names its object in the query ...
      return request.query["name"][0]
    data = request.data  # ... or in its JSON metadata (parsed once, kept for the handler)
    if isinstance(data, dict):
      return (data.get("meta") or data).get("name")
    return None

  def generation(storage, bucket_name: str, name: str) -> int:
    try:
      return int(storage.get_file_obj(bucket_name, name)["generation"])
    except NotFound:
      return 0

  def faithful(handler):
    def handle(request, response, storage, *args, **kwargs):
      bucket_name = (request.params or {}).get("bucket_name")
      conditions = {"ifGenerationMatch", "ifGenerationNotMatch"} & set(request.query)
      if bucket_name and conditions and (name := object_name(request)):
        current = generation(storage, bucket_name, name)
        match = request.query.get("ifGenerationMatch", [None])[0]
        not_match = request.query.get("ifGenerationNotMatch", [None])[0]
        if (match is not None and current != int(match)) or (
            not_match is not None and current == int(not_match)):
          if request.method == "GET" and match is None:
            response.status = HTTPStatus.NOT_MODIFIED
          else:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "Precondition Failed"}})
          return
      handler(request, response, storage, *args, **kwargs)
      if (request.method == "GET" and bucket_name and "object_id" in request.params
          and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT)):
        try:
          obj = storage.get_file_obj(bucket_name, request.params["object_id"])
        except NotFound:
          return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
    return handle

  # The router looks HANDLERS up at each request: its handlers, wrapped.
  server.HANDLERS = tuple((pattern, {method: faithful(handler)
                                     for method, handler in handlers.items()})
                          for pattern, handlers in server.HANDLERS)
  logging.basicConfig(level=logging.ERROR)  # the emulator logs each request at INFO
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(log_path) -> tuple[subprocess.Popen, str]:
  """The emulator's process and URL, once it answers (a taken port: try another)."""
  no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  for _ in range(3):
    port = _free_port()  # free a moment ago: another process may take it first
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:  # the test's own scratch file, not a user path
      process = subprocess.Popen(
          [sys.executable, __file__, "--port", str(port), "--bucket", BUCKET],
          stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while process.poll() is None and time.time() < deadline:
      try:
        no_proxy.open(url + "/", timeout=1).read()  # the emulator's health check
        return process, url
      except OSError:
        time.sleep(0.1)
    process.kill()
    process.wait()
  raise RuntimeError(f"the GCS emulator did not start; its log: {log_path}")


@contextlib.contextmanager
def emulated_bucket(scratch):
  """gs://BUCKET on an emulator while the context lasts; yields the emulator's URL.

  `scratch`: a local directory for the emulator's log. Sets the clients' variables in
  os.environ (inherited by subprocesses) and fsspec's live configuration, and undoes both.
  """
  process, url = _start(os.path.join(scratch, "emulator.log"))
  with pytest.MonkeyPatch.context() as patch:
    for name, value in _environment(url).items():
      patch.setenv(name, value)
    # No test may reach a real key file (its tokens would be refreshed against Google).
    patch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    # fsspec read its FSSPEC_* variables when it was imported, before this fixture: the same
    # anonymous credentials go into its live configuration.
    import fsspec
    import gcsfs.core
    patch.setitem(fsspec.config.conf, "gcs", {**fsspec.config.conf.get("gcs", {}),
                                              "token": "anon"})
    # gcsfs may have been imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT was set: name
    # the plain file system for gs:// and gcs:// in this process, and forget file systems
    # made before (fsspec keeps one per set of arguments, made with the old settings).
    for protocol in ("gs", "gcs"):
      fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    try:
      yield url
    finally:
      process.kill()
      process.wait()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  """gs://BUCKET on an emulator for the session; yields the emulator's URL."""
  with emulated_bucket(tmp_path_factory.mktemp("gcs_emulator")) as url:
    yield url


def new_dir() -> epath.Path:
  """A directory of the emulator's bucket that nothing else uses (with `gcs_emulator`)."""
  return epath.Path(f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}")


@pytest.fixture
def gs_dir(gcs_emulator) -> epath.Path:
  """A directory of the emulator's bucket for one test."""
  return new_dir()


def listing(directory, pattern: str = "*") -> list[epath.Path]:
  """`directory.glob(pattern)`, sorted: glob lists a bucket afresh, where gcsfs would answer
  iterdir from a listing cached earlier (missing what another process wrote since)."""
  return sorted(epath.Path(directory).glob(pattern))


def _mount(bucket: str, mount_point: str) -> None:
  """Serves gs://BUCKET as a FUSE file system at `mount_point` until unmounted.

  On a pod the launchers mount the data's bucket with Cloud Storage FUSE (gcsfuse), which
  cannot reach the emulator; fsspec's FUSE server over gcsfs gives the same POSIX view of
  it. Listings are not cached: objects written by other processes show at once.
  """
  import datetime

  import gcsfs.core
  from fsspec import fuse

  class Operations(fuse.FUSEr):
    def getattr(self, path, fh=None):
      # gcsfs gives times as datetimes; FUSE wants seconds.
      return {k: v.timestamp() if isinstance(v, datetime.datetime) else v
              for k, v in super().getattr(path, fh).items()}

  fs = gcsfs.core.GCSFileSystem(token="anon", use_listings_cache=False)
  fuse.run(fs, bucket + "/", mount_point, foreground=True, threads=True, ready_file=True,
           ops_class=Operations)


def fuse_available() -> bool:
  try:
    import fuse  # noqa: F401  fusepy, which loads libfuse
  except (ImportError, OSError, EnvironmentError):
    return False
  return os.path.exists("/dev/fuse") and bool(shutil.which("fusermount"))


@contextlib.contextmanager
def mounted_bucket(root):
  """The emulator's bucket (with `emulated_bucket`) mounted at ROOT/BUCKET through FUSE
  while the context lasts, and PARTI_GCS_MOUNT=ROOT, as the pod launchers name gcsfuse's
  mount: ArrayRecord reads gs:// shard sets through it. Yields ROOT."""
  mount_point = os.path.join(root, BUCKET)
  os.makedirs(mount_point, exist_ok=True)
  log_path = os.path.join(root, "..", f"{os.path.basename(root)}_mount.log")
  with open(log_path, "ab") as log:  # our own scratch file
    process = subprocess.Popen([sys.executable, __file__, "--mount", mount_point,
                                "--bucket", BUCKET], stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 30
  while not os.path.ismount(mount_point) and time.time() < deadline and process.poll() is None:
    time.sleep(0.1)
  try:
    if not os.path.ismount(mount_point):
      raise RuntimeError(f"the bucket was not mounted at {mount_point}; log: {log_path}")
    with pytest.MonkeyPatch.context() as patch:
      patch.setenv("PARTI_GCS_MOUNT", str(root))
      yield root
  finally:
    subprocess.run(["fusermount", "-u", "-z", mount_point], check=False)
    process.kill()
    process.wait()


@pytest.fixture(scope="session")
def gcs_mount(gcs_emulator, tmp_path_factory):
  """The emulator's bucket mounted through FUSE for the session (see `mounted_bucket`)."""
  if not fuse_available():
    pytest.skip("FUSE is not available (apt-get install libfuse2 fuse; pip install fusepy)")
  with mounted_bucket(tmp_path_factory.mktemp("gcs_mount")) as root:
    yield root


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description="the tests' GCS emulator (see _serve) or a "
                                   "FUSE mount of its bucket (see _mount)")
  parser.add_argument("--port", type=int)
  parser.add_argument("--mount")
  parser.add_argument("--bucket", required=True)
  args = parser.parse_args()
  if args.mount:
    _mount(args.bucket, args.mount)
  else:
    _serve(args.port, args.bucket)
