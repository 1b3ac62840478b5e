"""Bytes from where shards live: local files, http(s) URLs with Range resume, and ``pipe:`` shell commands.

`open_url(url)` returns a binary stream for any of them; `shard_url(manifest_location, file)` says where a
shard named in a manifest lives, in the manifest's own kind of location; `manifest_location(source)` turns
what a user passes as ``data.shards`` into the manifest's location. Nothing here knows about samples, labels
or tar files: `cxrdist.data` reads the streams.

``pipe:`` runs a shell command (as WebDataset's ``pipe:`` does): whoever writes ``data.shards`` can run
commands as the training user, exactly as with any shell script they could write. What comes from the
*manifest* never reaches the shell unchecked: shard names are validated against the packer's pattern
(`shard_tools.schema.SHARD_FILE`) when the manifest is read, and quoted with `shlex.quote` when substituted.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

from shard_tools.errors import CxrdistError
from shard_tools.schema import MANIFEST_NAME, ManifestError

log = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 60  # per connect / read; a stalled server fails the run instead of hanging it
# A dropped or failed http(s) request is retried, continuing where the data stopped, after 1, 2, 4, 8 s.
# HTTP_ATTEMPTS counts consecutive attempts that deliver no new byte; then the run fails naming the URL.
HTTP_ATTEMPTS = 5
HTTP_BACKOFF_S = 1.0  # delay before the first retry; doubles with each further one


class DataError(CxrdistError):
    """Shards cannot be read, or do not hold what their manifest says. The message names them.

    (A manifest that is missing or breaks the format is a `shard_tools.schema.ManifestError`.)"""


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


class _PipeStream(io.RawIOBase):
    """stdout of a ``pipe:`` shell command as a readable stream.

    Reaching EOF checks the exit status, so a failed ``aws s3 cp`` is an error rather than a short shard.
    Closing early (the training loader stops mid-shard at the end of an epoch) ends the command quietly.
    Our own class rather than webdataset's `Pipe`, whose close raises on the SIGPIPE such an early stop
    causes.
    """

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        # A session of its own, so that closing early can end the whole command, not only the shell.
        self.proc = subprocess.Popen(
            url[len("pipe:") :], shell=True, stdout=subprocess.PIPE, start_new_session=True
        )

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.proc.stdout.readinto(buffer)
        if n == 0 and self.proc.wait() != 0:
            raise DataError(f"{self.url}: the command exited with status {self.proc.returncode}")
        return n

    def close(self) -> None:
        if not self.closed:
            self.proc.stdout.close()
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            self.proc.wait()
        super().close()


class _HTTPStream(io.RawIOBase):
    """The body of an http(s) URL that survives dropped connections and server errors.

    A connection that breaks mid-body (reset, fewer bytes than Content-Length, or a server that stalls:
    no byte for `HTTP_TIMEOUT_S`, the bytes it did send kept) is reopened
    with ``Range: bytes=<offset>-``, so the reader (a tar parser) continues at the byte where it stopped:
    restarting from byte 0 would repeat samples. A server that ignores Range (200 instead of 206) is read
    from the start again, discarding the bytes already delivered. If the resource changed in between
    (another ETag, Last-Modified or size), continuing would splice two files, so that is an error.

    Retries wait `HTTP_BACKOFF_S`, doubling; after `HTTP_ATTEMPTS` consecutive attempts without a new
    byte, `DataError` names the URL, the byte offset and the last error. 4xx answers fail at once.
    """

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.offset = 0  # bytes delivered to the reader
        self.size: int | None = None  # the whole body, when the server said (Content-Length)
        self.version: tuple[str | None, str | None] | None = None  # (ETag, Last-Modified)
        self.failures = 0  # consecutive failed attempts since the last new byte
        self.resp: Any = None
        self._connect()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self.resp is None:
                self._connect()
            try:
                # readinto1: what has arrived (one socket read), not a full buffer. readinto would block
                # until the 1 MiB buffer fills, so a server stalling mid-body would time out with the bytes
                # it did send discarded, and every retry would restart at the same offset and stall again.
                n = self.resp.readinto1(buffer)
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                error: Exception = e
            else:
                if n or len(buffer) == 0:
                    self.offset += n
                    self.failures = 0
                    return n
                if self.size is None or self.offset >= self.size:
                    return 0  # the end of the body
                error = http.client.IncompleteRead(b"", self.size - self.offset)
            self._drop()
            self._failed(error)

    def close(self) -> None:
        self._drop()
        super().close()

    def _drop(self) -> None:
        if self.resp is not None:
            self.resp.close()
            self.resp = None

    def _failed(self, error: Exception) -> None:
        """Count a failed attempt; wait before the next one, or give up with the URL named."""
        self.failures += 1
        where = f"at byte {self.offset}" + (f" of {self.size}" if self.size is not None else "")
        if self.failures >= HTTP_ATTEMPTS:
            raise DataError(
                f"{self.url}: failed {self.failures} times in a row {where}; last error: {error!r}. "
                "Check the server or the network, then run again (training continues with --resume)."
            ) from error
        delay = HTTP_BACKOFF_S * 2 ** (self.failures - 1)
        log.warning("%s: %r %s; retrying in %.3g s", self.url, error, where, delay)
        time.sleep(delay)

    def _connect(self) -> None:
        """Open the URL positioned at `self.offset`, retrying as the class docstring says."""
        while True:
            headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
            try:
                resp = urllib.request.urlopen(
                    urllib.request.Request(self.url, headers=headers), timeout=HTTP_TIMEOUT_S
                )
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code not in (408, 429):  # 404, 403: retrying will not help
                    raise DataError(f"{self.url}: HTTP {e.code} {e.reason}") from None
                self._failed(e)
                continue
            except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
                self._failed(e)
                continue
            try:
                self._position(resp)
            except (OSError, http.client.HTTPException) as e:  # dropped while skipping
                resp.close()
                self._failed(e)
                continue
            except BaseException:
                resp.close()
                raise
            self.resp = resp
            return

    def _position(self, resp: Any) -> None:
        """Check that `resp` continues the same body at `self.offset`; skip ahead if it starts at 0."""
        version = (resp.headers.get("ETag"), resp.headers.get("Last-Modified"))
        if resp.status == 206:
            first, total = _content_range(resp.headers.get("Content-Range", ""))
            if first != self.offset:
                raise DataError(f"{self.url}: asked for bytes from {self.offset}, got bytes from {first}")
        else:
            total, first = resp.length, 0
        if self.version is None:  # the first answer
            self.version, self.size = version, total
            return
        if version != self.version or (None not in (total, self.size) and total != self.size):
            raise DataError(
                f"{self.url}: changed on the server while being read (ETag, Last-Modified or size "
                "differ); run again once the upload is complete"
            )
        todo = self.offset - first  # the server ignored Range: read past the bytes already delivered
        while todo > 0:
            chunk = resp.read(min(todo, 1 << 20))
            if not chunk:
                raise http.client.IncompleteRead(b"", todo)
            todo -= len(chunk)


def _content_range(value: str) -> tuple[int, int | None]:
    """``bytes 100-999/1000`` -> (100, 1000); the total is None when the server wrote ``*``."""
    try:
        unit, _, spec = value.strip().partition(" ")
        span, _, total = spec.partition("/")
        if unit != "bytes":
            raise ValueError(value)
        return int(span.split("-")[0]), None if total == "*" else int(total)
    except ValueError:
        raise http.client.HTTPException(f"bad Content-Range {value!r}") from None


def open_url(url: str) -> BinaryIO:
    """Open a local path, ``file://``, ``http(s)://`` URL or ``pipe:`` command for binary reading."""
    if is_pipe(url):
        return io.BufferedReader(_PipeStream(url), buffer_size=1 << 20)
    if is_http(url):
        return io.BufferedReader(_HTTPStream(url), buffer_size=1 << 20)
    path = urllib.parse.urlparse(url).path if url.startswith("file://") else url
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"{url}: {e.strerror}") from None


def shard_url(manifest_location: str, file: str) -> str:
    """Where shard `file` (a plain name next to the manifest) lives, in the manifest's own kind of location.

    ``pipe:aws s3 cp s3://b/x/manifest.json -`` -> ``pipe:aws s3 cp s3://b/x/train-000000.tar -``: the
    manifest's name in the command is replaced by the shard's, shell-quoted.
    """
    if is_http(manifest_location):
        return urllib.parse.urljoin(manifest_location, file)
    if is_pipe(manifest_location):
        head, _, tail = manifest_location.rpartition(MANIFEST_NAME)
        return head + shlex.quote(file) + tail
    return str(Path(manifest_location).parent / file)


def manifest_location(source: str) -> str:
    """The manifest's location for a ``data.shards`` value: a shard folder or its manifest.json (local or
    ``file://``), an http(s) URL of either, or a ``pipe:`` command printing the manifest."""
    source = source.strip()
    if is_pipe(source):
        if MANIFEST_NAME not in source:
            raise ManifestError(
                f"{source}: a pipe: manifest command must name '{MANIFEST_NAME}', so that shard commands "
                f"can be made by replacing it with each shard's name"
            )
        return source
    if is_http(source):
        if urllib.parse.urlparse(source).path.endswith(".json"):
            return source
        return source.rstrip("/") + "/" + MANIFEST_NAME
    if source.startswith("file://"):
        source = urllib.parse.urlparse(source).path
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{source}: no {MANIFEST_NAME} found. Point data.shards at the folder made by "
            "`python -m shard_tools.pack`, or at its manifest.json"
        )
    return str(path.resolve())
