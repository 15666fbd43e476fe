"""The serving benchmark script runs end to end (tiny duration, no MLServer) and prints its table."""

from __future__ import annotations

import pytest

from edgeml.benchmarks import serve_bench


@pytest.mark.slow
def test_serve_bench_prints_the_side_by_side_table(capsys):
    assert serve_bench.main(["--duration", "1", "--concurrency", "2", "--no-mlserver", "--loadgen", "python"]) == 0
    out = capsys.readouterr().out
    assert "edgeml serve  req/s" in out and "MLServer column: skipped (--no-mlserver)" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("2 |"))
    assert float(row.split("|")[1].split()[0]) > 50, f"the server answered too few requests: {row}"
    assert "(0 err)" not in row and " err)" not in row, row
    assert "backend alone before" in out
