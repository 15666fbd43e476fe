"""Device-side experiments on a real v2 server with two real ONNX models (tiny 1.0.0 and 2.0.0).

Shadowing never changes what a client receives; A/B routing is sticky and splits as asked; feedback
is recorded per arm; Thompson sampling moves traffic to the better arm."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from edgeml.runtime.experiments import Experiment, ExperimentSpec


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    pytest.importorskip("onnx", reason="building the test artifacts needs the onnx package")
    from edgeml.fleet.testing import make_artifact

    d = tmp_path_factory.mktemp("exp-artifacts")
    return make_artifact(d / "t1.edgepkg", "tiny", "1.0.0"), make_artifact(d / "t2.edgepkg", "tiny", "2.0.0")


@pytest.fixture
def server(pair, tmp_path):
    from edgeml.runtime.server import ModelServer, ServerConfig

    srv = ModelServer(ServerConfig(port=0, cache_dir=tmp_path / "cache"))
    srv.load(pair[0], name="tiny", version="1.0.0", make_default=True)
    srv.load(pair[1], name="tiny", version="2.0.0", make_default=False)
    host, port = srv.start()
    srv.base = f"http://{host}:{port}"
    yield srv
    if srv.experiments is not None:
        srv.experiments.close()
    srv.stop(drain_timeout=2)


def _post(url: str, doc: dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def _infer(srv, x: np.ndarray, headers: dict | None = None, version: str | None = None):
    path = f"/v2/models/tiny/versions/{version}/infer" if version else "/v2/models/tiny/infer"
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    status, doc, hdrs = _post(srv.base + path, body, headers)
    assert status == 200, doc
    return doc, hdrs


def _spec(mode: str, **kw) -> ExperimentSpec:
    return ExperimentSpec(id="e1", model="tiny", champion="1.0.0", challenger="2.0.0", mode=mode, **kw)


def test_shadow_never_changes_what_the_client_receives_and_reports_agreement(server):
    xs = np.random.default_rng(0).standard_normal((40, 2, 4)).astype(np.float32)
    before = [_infer(server, x)[0] for x in xs]
    server.experiments = exp = Experiment(_spec("shadow", sample=1.0), server)
    during = [_infer(server, x)[0] for x in xs]
    exp.wait_idle()
    assert [d["outputs"] for d in during] == [d["outputs"] for d in before]      # byte-for-byte the same numbers
    assert {d["model_version"] for d in during} == {"1.0.0"}
    rep = exp.report()
    challenger = [_infer(server, x, version="2.0.0")[0]["outputs"] for x in xs[:3]]
    assert challenger != [d["outputs"] for d in before[:3]]                     # the challenger does differ
    sh = rep["shadow"]
    assert sh["mirrored"] + sh["dropped"] == 40 and sh["compared"] == 2 * sh["mirrored"] and sh["failures"] == 0
    assert 0 <= sh["agree"] <= sh["compared"]
    arms = {a["version"]: a for a in rep["arms"]}
    assert arms["1.0.0"]["requests"] == 40 and arms["2.0.0"]["requests"] == 0


def test_a_busy_challenger_drops_mirrored_requests_and_counts_them(server):
    xs = np.random.default_rng(1).standard_normal((120, 1, 4)).astype(np.float32)
    expected = [_infer(server, x)[0]["outputs"] for x in xs]
    server.experiments = exp = Experiment(_spec("shadow", sample=1.0), server)
    lm = server.repo.resolve("tiny", "2.0.0")
    real = lm.model.predict

    def slow_predict(feeds, **kw):        # the challenger is a real model made slow: the queue fills
        time.sleep(0.2)
        return real(feeds, **kw)

    lm.model.predict = slow_predict
    got = [_infer(server, x)[0]["outputs"] for x in xs]
    assert got == expected
    sh = exp.report()["shadow"]
    assert sh["dropped"] > 0 and sh["mirrored"] + sh["dropped"] == 120


def test_ab_split_by_request_is_sticky_and_feedback_is_recorded_per_arm(server):
    server.experiments = exp = Experiment(_spec("ab", split=0.5), server)
    x = np.ones((1, 4), np.float32)
    seen = {_infer(server, x, {"X-Experiment-Key": "user-7"})[0]["model_version"] for _ in range(10)}
    assert len(seen) == 1                                       # same key, same arm
    versions = [_infer(server, x)[0]["model_version"] for _ in range(200)]
    assert 70 <= versions.count("2.0.0") <= 130                 # ~50 % by request id
    doc, hdrs = _infer(server, x, {"X-Request-ID": "req-42"})
    ok, rec, _ = _post(server.base + "/v2/models/tiny/feedback", {"id": "req-42", "reward": 1})
    assert ok == 200 and rec == {"id": "req-42", "version": doc["model_version"], "reward": 1.0}
    again, err, _ = _post(server.base + "/v2/models/tiny/feedback", {"id": "req-42", "reward": 1})
    assert again == 404 and "unknown" in err["error"]
    arms = {a["version"]: a for a in exp.report()["arms"]}
    assert arms[doc["model_version"]]["feedback"] == 1 and arms[doc["model_version"]]["reward_sum"] == 1.0
    assert sum(a["requests"] for a in arms.values()) == 211


def test_label_feedback_scores_the_prediction_and_bad_feedback_gets_one_clear_error(server):
    server.experiments = Experiment(_spec("ab", split=0.0), server)
    x = np.ones((1, 4), np.float32)
    doc, _ = _infer(server, x, {"X-Request-ID": "r-1"})
    top1 = int(np.argmax(doc["outputs"][0]["data"]))
    status, rec, _ = _post(server.base + "/v2/models/tiny/feedback", {"id": "r-1", "label": top1})
    assert status == 200 and rec["reward"] == 1.0
    for body, words in (({"label": 1}, "'id'"), ({"id": "x", "label": 1, "reward": 1}, "exactly one"),
                        ({"id": "x", "reward": "a"}, "finite number"), ({"id": "x", "reward": 1, "z": 1}, "unknown")):
        status, err, _ = _post(server.base + "/v2/models/tiny/feedback", body)
        assert status == 400 and words in err["error"], err
    _infer(server, x, {"X-Request-ID": "r-2"})
    status, err, _ = _post(server.base + "/v2/models/tiny/feedback", {"id": "r-2", "reward": 0.5})
    assert status == 400 and "binary" in err["error"]


def test_feedback_without_an_experiment_is_a_404_naming_why(server):
    status, err, _ = _post(server.base + "/v2/models/tiny/feedback", {"id": "a", "reward": 1})
    assert status == 404 and "no experiment" in err["error"]


def test_thompson_sampling_moves_traffic_to_the_better_arm(server):
    """Arm 2.0.0 succeeds 60 % of the time, 1.0.0 20 %: after feedback most traffic goes to 2.0.0."""
    import random

    server.experiments = Experiment(_spec("bandit"), server, rng=random.Random(5))
    rng = np.random.default_rng(6)
    x = np.ones((1, 4), np.float32)
    chosen = []
    for i in range(300):
        doc, hdrs = _infer(server, x, {"X-Request-ID": f"b-{i}"})
        v = doc["model_version"]
        chosen.append(v)
        reward = int(rng.random() < (0.6 if v == "2.0.0" else 0.2))
        _post(server.base + "/v2/models/tiny/feedback", {"id": f"b-{i}", "reward": reward})
    assert chosen[-100:].count("2.0.0") >= 80
