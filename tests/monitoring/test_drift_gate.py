"""The drift_psi rollout gate decides on the `drifted` verdict (significance + effect size + sample floor), not on
the raw PSI: a no-op release with clean traffic does not breach, a shifted one does, and below the floor the
gate says "not enough data yet" while the wave bakes on. Real digits data, a real Manager on SQLite."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edgeml.benchmarks import drift_detect as B
from edgeml.fleet import drift as F
from edgeml.fleet.gates import GateContext, VersionStats, gate_from_dict, gate_to_dict, parse_gate
from edgeml.fleet.gates.drift_psi import GATE_ALPHA, DriftPsiGate
from edgeml.runtime import drift as D

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fleet"))
from test_manager import Clock, FakeFleet, Link  # noqa: E402


def _ctx(rep: F.DriftReport | None) -> GateContext:
    def drift() -> F.GateMeasure:
        m = F.GateMeasure((None if rep is None else rep.score, "test"))
        m.report = rep
        return m

    return GateContext(wave=0, wave_devices=2, failed=0, committed=2, new=VersionStats(), old=VersionStats(),
                       drift=drift)


@pytest.fixture(scope="module")
def digits():
    case = B.digits_case()
    return case, B.profile_of(case, case.reference)


def _digits_report(digits, x: np.ndarray) -> F.DriftReport:
    case, profile = digits
    return B.judge(case, profile, x, F.Settings())


def test_old_expression_parses_into_the_decision_gate():
    g = parse_gate("drift_psi<0.2")
    assert isinstance(g, DriftPsiGate) and g.threshold == 0.2 and not g.inclusive
    assert g.expression() == "drift_psi<0.2"
    again = gate_from_dict(gate_to_dict(g))
    assert isinstance(again, DriftPsiGate) and again.settings() == F.Settings(alpha=GATE_ALPHA, min_psi=0.2)


def test_clean_window_with_a_large_raw_psi_does_not_breach(digits):
    case, _ = digits
    rep = _digits_report(digits, case.held_out[:60])
    assert rep.score is not None and rep.score >= 0.2, rep.score     # what rolled back healthy releases
    res = parse_gate("drift_psi<0.2").evaluate(_ctx(rep))
    assert res.ok and res.value == pytest.approx(rep.score, abs=1e-6), res
    assert res.detail.startswith("not drifted") and not rep.drifted


def test_shifted_window_breaches_with_the_fleet_drift_verdict(digits):
    case, _ = digits
    rep = _digits_report(digits, 1.0 - case.held_out[:60])             # inverted images
    res = parse_gate("drift_psi<0.2").evaluate(_ctx(rep))
    assert not res.ok and res.detail.startswith("drifted: Holm p"), res
    # the same decision `edgeml fleet drift --alpha GATE_ALPHA --min-psi 0.2` makes on these windows
    assert rep.p_value is not None and rep.p_value < GATE_ALPHA and rep.score is not None and rep.score >= 0.2


def test_significant_but_small_shift_does_not_breach_a_higher_threshold(digits):
    case, _ = digits
    rep = _digits_report(digits, 1.0 - case.held_out[:60])
    assert rep.score is not None
    assert parse_gate(f"drift_psi<{rep.score + 0.01:.3f}").evaluate(_ctx(rep)).ok       # effect below the limit
    assert not parse_gate(f"drift_psi<{rep.score - 0.01:.3f}").evaluate(_ctx(rep)).ok


def test_below_the_floor_the_gate_waits(digits):
    case, _ = digits
    rep = _digits_report(digits, 1.0 - case.held_out[:40])             # shifted, but only 40 samples
    res = parse_gate("drift_psi<0.2").evaluate(_ctx(rep))
    assert res.ok and res.value is None and res.detail.startswith("not enough data yet (40 of 50 samples"), res
    nothing = parse_gate("drift_psi<0.2").evaluate(GateContext(0, 1, 0, 1, VersionStats(), VersionStats()))
    assert nothing.ok and nothing.value is None and nothing.detail.startswith("no data yet")


def test_inclusive_gate_allows_exactly_the_limit():
    s = F.Settings(alpha=0.01, min_psi=0.2)
    assert F.verdict(60, 0.2, 0.001, s) and not F.verdict(60, 0.2, 0.001, s, inclusive=True)
    assert not F.verdict(49, 0.9, 1e-9, s)                              # the floor
    assert not F.verdict(60, 0.9, 0.02, s)                              # not significant


# ----------------------------------------------------------------------------- through the manager
def _profiled_artifact(path: Path, version: str, key: Path) -> Path:
    """A tiny model artifact with a reference drift profile (as the compiler writes it from the eval split)."""
    import onnxruntime as ort

    from edgeml.compiler.profile import build_profile
    from edgeml.fleet.testing import make_artifact
    from edgeml.runtime.artifact import read_manifest, write_artifact

    base = make_artifact(path.with_suffix(".base.edgepkg"), "tiny", version)
    manifest, files = read_manifest(base), _members(base)
    manifest.pop("files", None)
    ref = np.random.default_rng(1).standard_normal((360, 4)).astype(np.float32)
    y = ort.InferenceSession(files["model/model.onnx"], providers=["CPUExecutionProvider"]).run(None, {"x": ref})[0]
    manifest["drift_profile"] = build_profile({"y": y}, {"x": ref}, ["y"])
    return write_artifact(path, manifest, files, sign_key=key)


def _members(path: Path) -> dict[str, bytes]:
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist() if n not in ("manifest.json", "signature.json")}


def _send_drift(m, device: str, version: str, x: np.ndarray, now: float) -> None:
    import onnxruntime as ort

    profile = F.profile_of(m.db, m.store.root, "tiny", version)
    assert profile is not None
    row = m.db.one("SELECT sha256 FROM artifacts WHERE name = 'tiny' AND version = ?", (version,))
    model = _members(m.store.root / "sha256" / f"{row['sha256']}.edgepkg")["model/model.onnx"]
    y = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    sketch = D.Sketch(profile)
    for i in range(0, len(x), D.MAX_ROWS_PER_SAMPLE):
        sketch.add({"x": x[i: i + D.MAX_ROWS_PER_SAMPLE]}, {"y": y[i: i + D.MAX_ROWS_PER_SAMPLE]})
    F.record(m.db, {"device_id": device, "drift": [D.wire("tiny", version, sketch, 1.0)]}, now=now)


@pytest.mark.parametrize("traffic", ["too few", "clean", "shifted"])
def test_rollout_waits_passes_or_rolls_back_on_the_verdict(tmp_path, keys, traffic):
    from edgeml.fleet.manager import Manager, ManagerConfig

    clock, link = Clock(), Link()
    m = Manager(ManagerConfig(db=tmp_path / "fleet.db", heartbeat_timeout_s=30, offline_timeout_s=100,
                              install_timeout_s=1000), link, clock=clock, artifact_base_url="http://store")
    m.publish_artifact(_profiled_artifact(tmp_path / "tiny-2.edgepkg", "2.0.0", keys["key"]), "t")
    fleet = FakeFleet(m, 2)
    r = m.start_rollout("tiny@2.0.0", selector={}, waves=[1.0], max_failure_rate=0.0, bake_s=60,
                        gates=["drift_psi<0.2"], actor="t")
    m.tick()
    fleet.answer(link)
    m.tick()                                                 # committed: the bake starts
    rng = np.random.default_rng(7)
    n = {"too few": 20, "clean": 150, "shifted": 150}[traffic]
    for dev in ("d00", "d01"):
        x = rng.standard_normal((n, 4)).astype(np.float32) + (2.0 if traffic == "shifted" else 0.0)
        _send_drift(m, dev, "2.0.0", x, clock())
    clock.advance(10)
    m.tick()
    s = m.rollout_status(r["id"])
    gate = next(g for g in s["gates"] if g["gate"] == "drift_psi")
    if traffic == "shifted":
        assert s["state"] in ("rolling_back", "rolled_back") and not gate["ok"], s
        assert "gate drift_psi breached" in s["reason"] and "drifted: Holm p" in s["reason"]
        return
    assert s["state"] == "running" and gate["ok"], s                  # baking: neither breach nor pass yet
    if traffic == "too few":
        assert gate["value"] is None and gate["detail"].startswith("not enough data yet (40 of 50"), gate
    else:
        assert gate["value"] is not None and gate["detail"].startswith("not drifted"), gate
    clock.advance(60)                                        # the bake bounds the wait
    m.tick()
    assert m.rollout_status(r["id"])["state"] == "completed"
