"""Response cache: exact-input keys, bounded LRU, metrics, per version, off for non-deterministic models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from resilience_helpers import call, metric, rewrite_runtime
from serve_models import MLP_INPUTS, MLP_OUTPUTS, mlp_onnx, reference_mlp, write_onnx_artifact
from edgeml.errors import ArtifactError
from edgeml.runtime.server import ModelServer, ServerConfig
from edgeml.runtime.server.cache import ENTRY_OVERHEAD, ResponseCache

X = np.random.default_rng(7).standard_normal((2, 30)).astype(np.float32)


def body(x: np.ndarray, outputs: list[str] | None = None) -> dict:
    doc: dict = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    if outputs:
        doc["outputs"] = [{"name": n} for n in outputs]
    return doc


def probs_of(data: bytes) -> np.ndarray:
    doc = json.loads(data)
    out = next(o for o in doc["outputs"] if o["name"] == "probs")
    return np.array(out["data"], np.float32).reshape(out["shape"])


def mlp(tmp_path, version="1", scale=1.0, runtime=None):
    path = write_onnx_artifact(tmp_path / f"mlp-{version}.edgepkg", mlp_onnx(scale=scale), name="mlp",
                               version=version, inputs=MLP_INPUTS, outputs=MLP_OUTPUTS)
    return rewrite_runtime(path, runtime) if runtime else path


def test_key_covers_bytes_dtype_shape_and_model():
    c = ResponseCache(1 << 20, "a" * 64)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert c.key({"x": a}) == c.key({"x": a.copy()})
    assert c.key({"x": a}) != c.key({"x": a.reshape(3, 2)})
    assert c.key({"x": a}) != c.key({"x": a.astype(np.int32)})
    b = a.copy()
    b[1, 2] = np.nextafter(b[1, 2], np.float32(9))          # one ulp of one value
    assert c.key({"x": a}) != c.key({"x": b})
    assert c.key({"x": a}) != ResponseCache(1 << 20, "b" * 64).key({"x": a})
    assert c.key({"x": a[:, ::2]}) == c.key({"x": np.ascontiguousarray(a[:, ::2])})   # views hash their values


def test_lru_is_bounded_and_counts_evictions():
    entry = np.zeros(256, np.float32)                          # 1 KiB per entry + overhead
    c = ResponseCache(3 * (entry.nbytes + ENTRY_OVERHEAD), "s")
    for i in range(3):
        c.put(bytes([i]), {"y": entry})
    assert c.get(bytes([0])) is not None                       # 0 is now the most recent
    c.put(bytes([3]), {"y": entry})
    assert c.get(bytes([1])) is None and c.get(bytes([0])) is not None
    assert (c.evictions, len(c), c.hits, c.misses) == (1, 3, 2, 1) and c.bytes <= c.max_bytes
    c.put(b"big", {"y": np.zeros(10_000, np.float32)})          # larger than the whole budget: not kept
    assert len(c) == 3 and c.get(b"big") is None
    stored = c.get(bytes([3]))
    assert stored is not None and not stored["y"].flags.writeable


@pytest.fixture
def cached_server(tmp_path):
    srv = ModelServer(ServerConfig(port=0, cache_dir=tmp_path / "cache", cache_mb=1))
    srv.load(mlp(tmp_path, "1", 1.0), make_default=False)
    srv.load(mlp(tmp_path, "2", 2.0))
    srv.start()
    yield srv
    srv.stop()


def test_repeated_input_is_served_from_the_cache(cached_server):
    srv = cached_server
    first = call(srv, "POST", "/v2/models/mlp/versions/1/infer", body(X))
    second = call(srv, "POST", "/v2/models/mlp/versions/1/infer", body(X, ["probs"]))
    assert first[0] == second[0] == 200
    want = reference_mlp(mlp_onnx(scale=1.0), X)["probs"]
    np.testing.assert_allclose(probs_of(first[2]), want, rtol=1e-5)
    np.testing.assert_array_equal(probs_of(second[2]), probs_of(first[2]))
    assert [o["name"] for o in json.loads(second[2])["outputs"]] == ["probs"]   # only what was asked
    text = call(srv, "GET", "/metrics")[2].decode()
    assert metric(text, "edgeml_cache_hits_total", "mlp", 'version="1"') == 1
    assert metric(text, "edgeml_cache_misses_total", "mlp", 'version="1"') == 1
    assert metric(text, "edgeml_cache_entries", "mlp", 'version="1"') == 1
    assert srv.stats("mlp", "1")["batches"] == 1               # the hit never reached the backend


def test_versions_never_share_entries(cached_server):
    srv = cached_server
    v1 = probs_of(call(srv, "POST", "/v2/models/mlp/versions/1/infer", body(X))[2])
    v2 = probs_of(call(srv, "POST", "/v2/models/mlp/versions/2/infer", body(X))[2])
    np.testing.assert_allclose(v2, reference_mlp(mlp_onnx(scale=2.0), X)["probs"], rtol=1e-5)
    assert not np.allclose(v1, v2)
    text = call(srv, "GET", "/metrics")[2].decode()
    assert metric(text, "edgeml_cache_hits_total", "mlp", 'version="2"') == 0


def test_artifact_runtime_section_turns_it_on_and_config_zero_turns_it_off(tmp_path):
    art = mlp(tmp_path, runtime={"cache_mb": 2})
    for cfg_mb, expect in ((None, True), (0, False)):
        srv = ModelServer(ServerConfig(port=0, cache_dir=tmp_path / "cache", cache_mb=cfg_mb))
        lm = srv.load(art)
        assert (lm.cache is not None) is expect
        if expect:
            assert lm.cache.max_bytes == 2 << 20
        srv.stop()


def test_non_deterministic_model_is_never_cached(tmp_path):
    art = mlp(tmp_path, runtime={"deterministic": False})
    srv = ModelServer(ServerConfig(port=0, cache_dir=tmp_path / "cache", cache_mb=8))
    lm = srv.load(art)
    assert lm.cache is None and srv.models()[0]["cache"] is False
    srv.stop()


@pytest.mark.parametrize("runtime, field", [({"cache_mb": -1}, "runtime.cache_mb"),
                                            ({"cache_mb": "4"}, "runtime.cache_mb"),
                                            ({"deterministic": "no"}, "runtime.deterministic")])
def test_bad_runtime_cache_fields_name_the_field(tmp_path, runtime, field):
    import edgeml
    from artifact_helpers import base_manifest, craft, listing, tiny_onnx

    members = {"model/model.onnx": tiny_onnx()}
    art = craft(tmp_path / "bad.edgepkg", base_manifest(runtime=runtime, files=listing(members)), members)
    with pytest.raises(ArtifactError, match=field.replace(".", r"\.")):
        edgeml.load(art, cache_dir=tmp_path / "cache")
