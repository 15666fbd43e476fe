"""AgentCore logic with real artifacts, real ONNX Runtime and a real HTTP store; the MQTT link is a recorder."""

from __future__ import annotations

import json
import threading

import pytest

from edgeml.fleet import protocol as P
from edgeml.fleet.agent import AgentConfig, AgentCore
from edgeml.fleet.serving import LocalServing
from edgeml.fleet.store import ArtifactStore, StoreServer


class Recorder:
    def __init__(self):
        self.sent = []
        self.lock = threading.Lock()

    def publish(self, topic, payload, qos=1, retain=False):
        with self.lock:
            self.sent.append((topic, json.loads(payload), qos, retain))
        return True

    def events(self):
        return [(m["deployment_id"], m["state"], m["reason"]) for t, m, *_ in self.sent if m["type"] == "event"]


@pytest.fixture
def store(tmp_path, artifacts):
    s = ArtifactStore(tmp_path / "store")
    recs = {k: s.publish(p) for k, p in artifacts.items()}
    srv = StoreServer(s).start()
    yield srv, recs
    srv.stop()


def make_core(tmp_path, keys, **kw):
    cfg = AgentConfig("dev-1", tmp_path / "state", labels={"hw": "x"}, trusted_keys=[keys["pub"]],
                      health_window_s=0.1, health_probe_s=0.02, **kw)
    link = Recorder()
    return AgentCore(cfg, link, LocalServing(tmp_path / "state" / "cache")), link


def desired(srv, rec, seq, dep, keys, key="key", **kw):
    art = {"name": rec["name"], "version": rec["version"], "url": srv.url_for(rec["sha256"]),
           "sha256": rec["sha256"], "size": rec["size"]}
    msg = P.desired("dev-1", deployment_id=dep, seq=seq, artifact=art, **kw)
    return P.encode(P.sign(msg, keys[key]) if key else msg)


def deliver(core, payload):
    core.on_message(P.topic("dev-1", "desired"), payload)
    core.step_pending()


def test_install_commit_then_failed_selftest_keeps_previous(tmp_path, keys, store):
    srv, recs = store
    core, link = make_core(tmp_path, keys)
    core.start(threads=False)
    deliver(core, desired(srv, recs["v1"], 1, "d1", keys))
    assert link.events()[-1] == ("d1", "committed", None)
    states = [s for d, s, _ in link.events() if d == "d1"]
    assert states == ["received", "downloading", "verifying", "staged", "selftest", "swapped", "health", "committed"]
    assert core.active()["version"] == "1.0.0"
    out = core.serving.predict({"x": __import__("numpy").ones((1, 4), "float32")})
    assert out["y"].shape == (1, 3)

    deliver(core, desired(srv, recs["bad"], 2, "d2", keys))
    dep, state, reason = link.events()[-1]
    assert (dep, state) == ("d2", "failed") and "golden" in reason
    assert core.active()["version"] == "1.0.0" and core.serving.active()["version"] == "1.0.0"

    # rollback ordered to v1 (where it already is): committed without a download
    deliver(core, desired(srv, recs["v1"], 3, "d3", keys, rollback=True))
    assert link.events()[-1][:2] == ("d3", "committed")


def test_unsigned_and_foreign_artifacts_refused(tmp_path, keys, store):
    srv, recs = store
    core, link = make_core(tmp_path, keys)
    core.start(threads=False)
    deliver(core, desired(srv, recs["unsigned"], 1, "d1", keys))
    assert link.events()[-1][1] == "failed" and "unsigned" in link.events()[-1][2]
    deliver(core, desired(srv, recs["other_signer"], 2, "d2", keys))
    assert link.events()[-1][1] == "failed" and "not among the trusted keys" in link.events()[-1][2]
    assert core.active() is None


def test_allow_unsigned(tmp_path, keys, store):
    srv, recs = store
    core, link = make_core(tmp_path, keys, allow_unsigned=True)
    core.start(threads=False)
    deliver(core, desired(srv, recs["unsigned"], 1, "d1", keys, key=None))
    assert link.events()[-1][:2] == ("d1", "committed")


def test_bad_replayed_and_duplicate_messages_change_nothing(tmp_path, keys, store):
    srv, recs = store
    core, link = make_core(tmp_path, keys)
    core.start(threads=False)
    deliver(core, desired(srv, recs["v2"], 5, "d5", keys))
    before = (tmp_path / "state" / "journal.json").read_bytes()
    n_events = len(link.events())
    bad = [
        b"not json",
        b"{" + b" " * P.MAX_MESSAGE_BYTES + b"}",                     # oversized
        desired(srv, recs["v1"], 9, "d9", keys, key="other"),         # signed by an untrusted key
        desired(srv, recs["v1"], 9, "d9", keys, key=None),            # unsigned
        desired(srv, recs["v1"], 4, "d4", keys),                      # replay: older seq
        json.dumps(dict(json.loads(desired(srv, recs["v1"], 9, "d9", keys)), seq=10)).encode(),  # tampered
    ]
    for payload in bad:
        deliver(core, payload)
    assert core.refused == len(bad)
    assert any("replayed" in r for r in core.refusals) and any("bad signature" in r for r in core.refusals)
    deliver(core, desired(srv, recs["v2"], 5, "d5", keys))   # redelivery of the committed desired: ignored
    assert core.refused == len(bad)
    assert (tmp_path / "state" / "journal.json").read_bytes() == before
    assert len(link.events()) == n_events and core.active()["version"] == "2.0.0"


def test_restart_resumes_interrupted_install(tmp_path, keys, store):
    srv, recs = store
    core, link = make_core(tmp_path, keys)
    core.start(threads=False)
    deliver(core, desired(srv, recs["v1"], 1, "d1", keys))
    # a crash right after the journal said "selftest" for v2
    j = core.journal.data
    msg = json.loads(desired(srv, recs["v2"], 2, "d2", keys))
    j["pending"] = {"desired": msg, "attempt": 1, "state": "selftest", "slot": None}
    core.journal.save()
    core.serving.close()

    core2, link2 = make_core(tmp_path, keys)
    core2.start(threads=False)
    assert core2.serving.active()["version"] == "1.0.0"      # the committed model serves first
    assert core2.step_pending()
    assert link2.events()[-1][:2] == ("d2", "committed")
    assert core2.active()["version"] == "2.0.0"
    assert core2.journal.data["previous"]["version"] == "1.0.0"


def test_gives_up_after_max_attempts(tmp_path, keys, store):
    srv, recs = store
    core, link = make_core(tmp_path, keys, max_attempts=2)
    core.start(threads=False)
    msg = json.loads(desired(srv, recs["v2"], 2, "d2", keys))
    core.journal.data["pending"] = {"desired": msg, "attempt": 2, "state": "swapped", "slot": None}
    core.journal.save()
    core2, link2 = make_core(tmp_path, keys, max_attempts=2)
    core2.start(threads=False)
    assert link2.events()[-1][1] == "failed" and "gave up after 2 attempts" in link2.events()[-1][2]
    assert core2.journal.data["pending"] is None


def test_heartbeat_and_telemetry_messages_validate(tmp_path, keys, store):
    srv, recs = store
    core, link = make_core(tmp_path, keys)
    core.start(threads=False)
    deliver(core, desired(srv, recs["v1"], 1, "d1", keys))
    core.on_connect()
    core.publish_telemetry()
    for topic, msg, *_ in link.sent:
        P.validate(topic, P.encode(msg))
    tel = [m for t, m, *_ in link.sent if m["type"] == "telemetry"][-1]
    assert tel["models"][0]["requests"] >= 1 and tel["active"]["version"] == "1.0.0" and tel["memory_mb"] > 0
    assert tel["models"][0]["latency_buckets_ms"]["+Inf"] == tel["models"][0]["requests"]


def test_agent_embeds_the_model_server(tmp_path, keys, store):
    """With HttpServing the active model answers KServe v2 HTTP requests; a hot swap keeps serving."""
    import urllib.request

    pytest.importorskip("edgeml.runtime.server", reason="edgeml.runtime.server (serve issue) is not installed")
    from edgeml.fleet.serving import HttpServing

    srv, recs = store
    cfg = AgentConfig("dev-1", tmp_path / "state", trusted_keys=[keys["pub"]], health_window_s=0.2, health_probe_s=0.02)
    link = Recorder()
    serving = HttpServing(tmp_path / "state" / "cache", port=0)
    core = AgentCore(cfg, link, serving)
    core.start(threads=False)
    try:
        deliver(core, desired(srv, recs["v1"], 1, "d1", keys))
        assert link.events()[-1][:2] == ("d1", "committed")
        host, port = serving.address
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/v2/models/tiny/infer", data=body)) as r:
            assert json.loads(r.read())["model_version"] == "1.0.0"
        deliver(core, desired(srv, recs["v2"], 2, "d2", keys))
        assert link.events()[-1][:2] == ("d2", "committed")
        with urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/v2/models/tiny/infer", data=body)) as r:
            assert json.loads(r.read())["model_version"] == "2.0.0"
        rows = {r["version"]: r for r in serving.stats()}
        assert rows["1.0.0"]["requests"] >= 2 and rows["2.0.0"]["requests"] >= 2      # probes + our request
        assert set(rows["2.0.0"]["latency_buckets_ms"]) == {*(str(k) for k in ("0.25", "0.5", 1, 2, 5, 10, 20, 50, 100,
                                                                               200, 500, 1000, 2000, 5000)), "+Inf"}
        tel = core.telemetry_message()
        P.validate(P.topic("dev-1", "telemetry"), P.encode(tel))
        deliver(core, desired(srv, recs["bad"], 3, "d3", keys))
        assert link.events()[-1][1] == "failed"
        with urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/v2/models/tiny/infer", data=body)) as r:
            assert json.loads(r.read())["model_version"] == "2.0.0"
    finally:
        serving.close()


def test_health_window_breach_after_swap_rolls_back(tmp_path, keys, store):
    srv, recs = store
    core, link = make_core(tmp_path, keys)
    core.start(threads=False)
    deliver(core, desired(srv, recs["v1"], 1, "d1", keys))
    core.config.health_max_p95_ms = 1e-6          # no real model is this fast: the health window fails
    deliver(core, desired(srv, recs["v2"], 2, "d2", keys))
    states = [s for d, s, _ in link.events() if d == "d2"]
    assert states[-3:] == ["swapped", "health", "rolled_back"]
    assert "p95" in link.events()[-1][2]
    assert core.serving.active()["version"] == "1.0.0" and core.active()["version"] == "1.0.0"
    assert core.journal.data["last_failed"]["deployment_id"] == "d2"


# ------------------------------------------------------------------ issue 9 row 4: re-verify the committed slot
def _two_commits(tmp_path, keys, store):
    srv, recs = store
    core, link = make_core(tmp_path, keys)
    core.start(threads=False)
    deliver(core, desired(srv, recs["v1"], 1, "d1", keys))
    deliver(core, desired(srv, recs["v2"], 2, "d2", keys))
    assert core.active()["version"] == "2.0.0"
    core.serving.close()
    return core.journal.data, recs


def _restart(tmp_path, keys):
    core, link = make_core(tmp_path, keys)
    core.start(threads=False)
    core.on_connect()
    return core, link


def test_swapped_committed_slot_is_refused_and_the_previous_one_served(tmp_path, keys, store, artifacts):
    journal, recs = _two_commits(tmp_path, keys, store)
    slot = journal["committed"]["slot"]
    # while the agent is down, someone replaces the slot with another (validly signed) artifact
    with open(slot, "wb") as fh:
        fh.write(artifacts["bad"].read_bytes())
    core, link = _restart(tmp_path, keys)
    try:
        assert core.serving.active()["version"] == "1.0.0"        # the previous good slot, not the swapped file
        assert core.active()["sha256"] == recs["v1"]["sha256"]
        presence = [m for t, m, *_ in link.sent if m["type"] == "presence"][-1]
        heartbeat = [m for t, m, *_ in link.sent if m["type"] == "heartbeat"][-1]
        assert presence["active"]["sha256"] == recs["v1"]["sha256"] != recs["v2"]["sha256"]
        assert heartbeat["last_failed"]["code"] == "slot_invalid" and heartbeat["active"]["version"] == "1.0.0"
        failed = [m for t, m, *_ in link.sent if m["type"] == "event" and m["state"] == "failed"]
        assert failed and failed[-1]["deployment_id"] == "d2" and failed[-1]["code"] == "slot_invalid"
        assert "sha256" in failed[-1]["reason"]
        for topic, msg, *_ in link.sent:
            P.validate(topic, P.encode(msg))
    finally:
        core.serving.close()


def test_both_slots_swapped_serves_nothing_and_says_so(tmp_path, keys, store, artifacts):
    journal, _ = _two_commits(tmp_path, keys, store)
    for rec in (journal["committed"], journal["previous"]):
        with open(rec["slot"], "wb") as fh:
            fh.write(artifacts["unsigned"].read_bytes())
    core, link = _restart(tmp_path, keys)
    try:
        assert core.serving.active() is None and core.active() is None
        presence = [m for t, m, *_ in link.sent if m["type"] == "presence"][-1]
        assert presence["active"] is None
        codes = [m["code"] for t, m, *_ in link.sent if m["type"] == "event"]
        assert codes.count("slot_invalid") == 2
    finally:
        core.serving.close()


def test_same_sha_but_signature_checked_when_keys_are_configured(tmp_path, keys, store):
    """The sha256 matches what was recorded, but the agent now trusts only another key: refused too."""
    journal, _ = _two_commits(tmp_path, keys, store)
    cfg = AgentConfig("dev-1", tmp_path / "state", trusted_keys=[keys["other_pub"]], health_window_s=0.1)
    core = AgentCore(cfg, Recorder(), LocalServing(tmp_path / "state" / "cache"))
    core.start(threads=False)
    try:
        assert core.serving.active() is None
        assert "fails verification" in core.journal.data["last_failed"]["reason"]
    finally:
        core.serving.close()


# ------------------------------------------------------------------ issue 9 row 12: downloads that cannot succeed
@pytest.mark.parametrize("case, reason", [("404", "HTTP 404"), ("size_up", "the server has"),
                                          ("size_down", "the server has")])
def test_download_that_cannot_succeed_fails_at_once_with_the_reason(tmp_path, keys, store, case, reason):
    srv, recs = store
    rec = dict(recs["v1"])
    if case == "404":
        rec["sha256"] = "0" * 64
    else:
        rec["size"] += 7 if case == "size_up" else -7
    core, link = make_core(tmp_path, keys, download_patience_s=60)
    core.start(threads=False)
    deliver(core, desired(srv, rec, 1, "d1", keys))
    ev = [m for t, m, *_ in link.sent if m["type"] == "event"][-1]
    assert ev["state"] == "failed" and ev["code"] == "download" and reason in ev["reason"], ev
    assert "attempts" not in ev["reason"]          # not retried as a network error


# ------------------------------------------------------------------ issue 9 row 5 (agent side)
def test_agent_notices_its_model_stopped_serving(tmp_path, keys, store):
    """Unloading the model behind the agent's back (what the repository API allowed) is noticed from the
    embedded server's own readiness, reported (event + heartbeat state), and the committed slot re-activated."""
    pytest.importorskip("edgeml.runtime.server", reason="edgeml.runtime.server is not installed")
    from edgeml.fleet.serving import HttpServing

    srv, recs = store
    cfg = AgentConfig("dev-1", tmp_path / "state", trusted_keys=[keys["pub"]], health_window_s=0.1, health_probe_s=0.02)
    link = Recorder()
    serving = HttpServing(tmp_path / "state" / "cache", port=0)
    core = AgentCore(cfg, link, serving)
    core.start(threads=False)
    try:
        deliver(core, desired(srv, recs["v1"], 1, "d1", keys))
        assert serving.ready()
        serving.server.unload("tiny", "1.0.0", wait=True)
        assert not serving.ready()
        core.check_serving()
        core.publish_heartbeat()
        hb = [m for t, m, *_ in link.sent if m["type"] == "heartbeat"][-1]
        assert hb["state"] == "not_serving" and hb["serving"] is False
        ev = [m for t, m, *_ in link.sent if m["type"] == "event"][-1]
        assert ev["state"] == "not_serving" and ev["code"] == "not_ready" and ev["deployment_id"] == "d1"
        assert serving.ready()                       # re-activated from the re-verified committed slot
        core.check_serving()
        assert [m for t, m, *_ in link.sent if m["type"] == "event"][-1]["state"] == "serving"
        for topic, msg, *_ in link.sent:
            P.validate(topic, P.encode(msg))
    finally:
        serving.close()


def test_embedded_server_has_no_repository_api_without_a_token(tmp_path):
    import urllib.error
    import urllib.request

    pytest.importorskip("edgeml.runtime.server", reason="edgeml.runtime.server is not installed")
    from edgeml.fleet.serving import HttpServing

    serving = HttpServing(tmp_path / "cache", port=0)
    try:
        assert serving.server.config.admin_token is None
        host, port = serving.address
        req = urllib.request.Request(f"http://{host}:{port}/v2/repository/models/tiny/unload", data=b"{}",
                                     method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 403
    finally:
        serving.close()
