"""Content-addressed artifact store, its HTTP server, and the resuming downloader.

``ArtifactStore(root).publish(path)`` copies a verified ``.edgepkg`` to
``root/sha256/<hex>.edgepkg`` (atomic) and records name/version/size/signed in
``root/index.json``. ``StoreServer`` serves ``GET/HEAD /artifacts/<sha256>``
with ``Range: bytes=N-`` (206 Partial Content), so an interrupted download
continues where it stopped. ``download()`` is the client side: it appends to
``dest.part``, asks for the remaining bytes, and checks size + sha256 before
renaming into place.
"""

from __future__ import annotations


import json
import logging
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from edgeml.errors import ArtifactError, FleetError
from edgeml.runtime.fsutil import atomic_path, atomic_write_json, fsync_dir
from edgeml.runtime.signing import file_sha256
from edgeml.fleet.httpbg import BackgroundHTTPServer

log = logging.getLogger("edgeml.fleet.store")
_SHA = re.compile(r"^[0-9a-f]{64}$")



class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.Lock()

    def path_of(self, sha256: str) -> Path:
        if not _SHA.match(sha256):
            raise FleetError(f"{sha256!r} is not a sha256 digest")
        return self.root / "sha256" / f"{sha256}.edgepkg"

    def index(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / "index.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def publish(self, artifact: Path, *, trusted_keys: list[Path] | None = None) -> dict[str, Any]:
        """Verify (hashes; signature when keys given) and copy in. Returns the store record."""
        from edgeml.runtime.artifact import verify_zip
        from edgeml.runtime.signing import file_sha256

        artifact = Path(artifact)
        manifest, _, signer, _ = verify_zip(artifact, trusted_keys=trusted_keys)
        digest = file_sha256(artifact)
        dest = self.path_of(digest)
        if not dest.exists():
            with atomic_path(dest) as tmp:
                shutil.copyfile(artifact, tmp)
        record = {"sha256": digest, "size": dest.stat().st_size, "name": manifest["name"],
                  "version": manifest["version"], "target": manifest["target"],
                  "signed": (artifact_has_signature(artifact)), "signed_by": signer}
        with self._lock:
            idx = self.index()
            idx[digest] = record
            atomic_write_json(self.root / "index.json", idx)
        return record


def artifact_has_signature(path: Path) -> bool:
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return "manifest.sig" in zf.namelist()


class _Handler(BaseHTTPRequestHandler):
    store: ArtifactStore
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # route to logging, not stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def _target(self) -> Path | None:
        m = re.fullmatch(r"/artifacts/([0-9a-f]{64})(?:\.edgepkg)?", self.path.split("?")[0])
        if not m:
            self.send_error(404, "no such artifact path (use /artifacts/<sha256>)")
            return None
        path = self.store.path_of(m.group(1))
        if not path.is_file():
            self.send_error(404, "artifact not in this store")
            return None
        return path

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = self._target()
        if path is None:
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        status = 200
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                self.send_error(400, "malformed Range header")
                return
            if m.group(1):
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else size - 1
            else:  # suffix range: last N bytes
                start = max(0, size - int(m.group(2)))
            end = min(end, size - 1)
            if start >= size or start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        with open(path, "rb") as fh:
            fh.seek(start)
            left = length
            throttle = getattr(self.server, "throttle_bytes", None)
            while left > 0:
                chunk = fh.read(min(64 * 1024 if not throttle else throttle, left))
                if not chunk:
                    break
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                left -= len(chunk)
                if throttle:
                    threading.Event().wait(0.01)


class StoreServer(BackgroundHTTPServer):
    """HTTP server for a store, in a background thread. ``throttle_bytes`` slows it (tests)."""

    def __init__(self, store: ArtifactStore, host: str = "127.0.0.1", port: int = 0, public_url: str | None = None):
        super().__init__(type("StoreHandler", (_Handler,), {"store": store}), host, port, "artifact-store")
        self.httpd.throttle_bytes = None   # tests slow the server down
        self.store = store
        self.base_url = (public_url or f"http://{self.host}:{self.port}").rstrip("/")

    def url_for(self, sha256: str) -> str:
        return f"{self.base_url}/artifacts/{sha256}"


def download(url: str, dest: Path, *, sha256: str, size: int, timeout: float = 30.0,
             chunk: int = 64 * 1024, max_bytes: int | None = None) -> Path:
    """Fetch ``url`` into ``dest``, resuming from ``dest.part``; verify size and sha256.

    ``max_bytes`` stops after that many new bytes (tests use it to simulate an interruption).
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and dest.stat().st_size == size and file_sha256(dest) == sha256:
        return dest
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have < size:
        if have:
            log.info("resuming download of %s at byte %d of %d", url, have, size)
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:
                part.unlink(missing_ok=True)
            if 400 <= exc.code < 500 and exc.code not in (408, 416, 429):
                # the server answered, and the answer is "no": retrying cannot help
                raise ArtifactError(f"download of {url} failed: HTTP {exc.code} {exc.reason}",
                                    hint="check that the artifact is published in the manager's store") from None
            raise FleetError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise FleetError(f"download of {url} failed: {getattr(exc, 'reason', exc)}",
                             hint="the agent retries; check the manager's artifact URL") from None
        with resp:
            if have and resp.status != 206:   # server ignored Range: start over
                have = 0
            total = _announced_total(resp, have)
            if total is not None and total != size:
                raise ArtifactError(f"download of {url}: the server has {total} bytes; the manager said {size}",
                                    hint="the desired message's artifact.size is wrong, or the URL names another file")
            mode = "ab" if have else "wb"
            fetched = 0
            with open(part, mode, buffering=0) as fh:   # unbuffered: a kill -9 keeps what arrived
                while True:
                    want = chunk if max_bytes is None else min(chunk, max_bytes - fetched)
                    if want <= 0:
                        break
                    try:
                        data = resp.read1(want)
                    except OSError as exc:
                        raise FleetError(f"download of {url} interrupted after {have + fetched} bytes: {exc}") from None
                    if not data:
                        break
                    fh.write(data)
                    fetched += len(data)
                    if have + fetched > size:
                        break
                os.fsync(fh.fileno())
        have = part.stat().st_size
        if max_bytes is not None and have < size:
            raise FleetError(f"download of {url} stopped after {have} of {size} bytes (limit)")
    if have > size:
        part.unlink(missing_ok=True)
        raise ArtifactError(f"download of {url} gave {have} bytes; the manager said {size} (discarded)")
    if have < size:
        raise FleetError(f"download of {url} gave {have} bytes of {size} (will resume)")
    got = file_sha256(part)
    if got != sha256:
        part.unlink(missing_ok=True)
        raise ArtifactError(f"download of {url} has sha256 {got[:16]}..., expected {sha256[:16]}... (discarded)",
                            hint="the artifact in the store or in transit is corrupt; republish it")
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


def _announced_total(resp, have: int) -> int | None:
    """The full size the server announces (Content-Range total on 206, else have + Content-Length)."""
    rng = resp.headers.get("Content-Range") or ""
    if resp.status == 206 and "/" in rng:
        total = rng.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    length = resp.headers.get("Content-Length")
    return have + int(length) if length and length.isdigit() else None
