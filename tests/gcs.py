"""A Cloud Storage API on localhost for the gs:// tests: `gcp-storage-emulator`, in memory.

`emulator()` starts it on a free port with one bucket, points the clients at it through their
environment variables (gcsfs and google-cloud-storage: STORAGE_EMULATOR_HOST; orbax's tensorstore:
TENSORSTORE_GCS_HTTP_URL; both reach subprocesses), and stops it at the end. TensorFlow's own GCS
client (tf.io.gfile, used by TFDS and by tf.data's file readers) has no such setting: it always
calls www.googleapis.com, so data sets stay local in these tests.

The emulator is started through `serve` below, which adds what real GCS sends with every media
download and the emulator leaves out: the object's generation headers. Without them tensorstore
cannot revalidate a cached object (orbax's OCDBT manifest, re-read while a checkpoint of a few
hundred arrays is written) and fails with "Malformed StorageGeneration".
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

BUCKET = "swiftformer-test"


@contextlib.contextmanager
def emulator(bucket: str = BUCKET):
    from conftest import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(port), bucket],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    variables = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        # gcsfs asks Storage Control (gRPC, googleapis.com) for each bucket's layout; the emulator
        # has no such API, so use the plain JSON-API client.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GOOGLE_CLOUD_PROJECT": "test",
        "NO_GCE_CHECK": "true",  # no credentials to look for on a metadata server
    }
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"gcp-storage-emulator did not start on port {port}") from None
                time.sleep(0.2)
        yield f"gs://{bucket}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def serve(port: int, bucket: str) -> None:
    """Run the emulator (in memory, one bucket) until killed, generation headers added."""
    from http import HTTPStatus

    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])

    objects.download = download_with_generation  # before the server module reads its routes
    from gcp_storage_emulator.server import create_server

    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    import logging

    logging.disable(logging.CRITICAL)
    serve(int(sys.argv[1]), sys.argv[2])
