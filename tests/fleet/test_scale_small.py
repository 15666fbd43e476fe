"""A small (500-device) run of benchmarks/fleet_scale.py: the batched ingest stores every device on SQLite and
PostgreSQL, the 3-wave rollout completes, and the partly failing one is rolled back on every updated device.
No speed is asserted (figures come from the benchmark script, docs/scale.md)."""

from __future__ import annotations

import pytest

from benchmarks import fleet_scale


@pytest.mark.mqtt
def test_small_scale_run(mosquitto_bin, capsys):
    o = fleet_scale.run(devices=500, ingest=3000, pg=True)
    assert o["ingest_sqlite"]["devices_stored"] == 500
    if "ingest_postgres" in o:
        assert o["ingest_postgres"]["devices_stored"] == 500
    else:
        print("PostgreSQL ingest not measured: no server answered")
    v1, v2 = o["simulation"]["rollouts"]
    assert v1["state"] == "completed" and sum(w.get("committed", 0) for w in v1["per_wave"]) == 500
    assert v2["state"] == "rolled_back"
    updated = sum(n for w in v2["per_wave"] for s, n in w.items() if s not in ("pending", "skipped"))
    assert updated > 0 and v2["rollback"] == {"done": updated}
    assert o["simulation"]["final_versions"] == {"tiny@1.0.0": 500}
    assert "| 3-wave rollout" in fleet_scale.table(o)
