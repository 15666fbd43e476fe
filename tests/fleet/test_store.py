"""Artifact store + HTTP server with Range + resuming download (real HTTP on loopback)."""

from __future__ import annotations

import urllib.request

import pytest

from edgeml.errors import ArtifactError, FleetError
from edgeml.fleet.store import ArtifactStore, StoreServer, download


@pytest.fixture
def served(tmp_path, artifacts):
    store = ArtifactStore(tmp_path / "store")
    rec = store.publish(artifacts["v1"])
    srv = StoreServer(store).start()
    yield store, srv, rec
    srv.stop()


def test_publish_is_content_addressed(served, artifacts):
    store, _, rec = served
    assert store.path_of(rec["sha256"]).read_bytes() == artifacts["v1"].read_bytes()
    assert rec["signed"] and rec["name"] == "tiny" and rec["version"] == "1.0.0"
    assert store.publish(artifacts["v1"]) == rec          # idempotent
    assert store.index()[rec["sha256"]]["version"] == "1.0.0"


def test_range_requests(served):
    _, srv, rec = served
    req = urllib.request.Request(srv.url_for(rec["sha256"]), headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 10-19/{rec['size']}"
        assert len(resp.read()) == 10
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(srv.url_for(rec["sha256"]), headers={"Range": f"bytes={rec['size']}-"}))
    assert err.value.code == 416
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(srv.url_for("0" * 64))
    assert err.value.code == 404


def test_download_resumes_after_interruption(served, tmp_path, artifacts):
    _, srv, rec = served
    dest = tmp_path / "dl" / "a.edgepkg"
    with pytest.raises(FleetError, match="stopped after"):
        download(srv.url_for(rec["sha256"]), dest, sha256=rec["sha256"], size=rec["size"], max_bytes=500)
    part = dest.with_name(dest.name + ".part")
    assert part.stat().st_size == 500 and not dest.exists()
    download(srv.url_for(rec["sha256"]), dest, sha256=rec["sha256"], size=rec["size"])
    assert dest.read_bytes() == artifacts["v1"].read_bytes() and not part.exists()


def test_download_refuses_wrong_hash(served, tmp_path):
    _, srv, rec = served
    dest = tmp_path / "x.edgepkg"
    with pytest.raises(ArtifactError, match="sha256"):
        download(srv.url_for(rec["sha256"]), dest, sha256="f" * 64, size=rec["size"])
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
    with pytest.raises(FleetError, match="download of"):
        download("http://127.0.0.1:9/artifacts/x", dest, sha256="f" * 64, size=1, timeout=2)
