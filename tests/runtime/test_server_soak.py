"""The soak script (benchmarks/soak.py) runs ~5 s against a real `edgeml serve` and finds RSS and threads flat."""

from __future__ import annotations

from edgeml.benchmarks import soak


def test_soak_under_mixed_good_and_bad_traffic_stays_flat(capsys):
    code = soak.main(["--duration", "5", "--slow-sockets", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "soak: PASS" in out and "answered correctly (100.00%)" in out
    for kind, status in (("bad-json", 400), ("zero-rows", 400), ("oversize", 413), ("too-many-rows", 413)):
        assert any(line.strip().startswith("bad traffic") and kind in line and f"-> {status}:" in line
                   for line in out.splitlines()), (kind, out)
    assert "slow-head -> 408" in out and "slow-body -> 408" in out
