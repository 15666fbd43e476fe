"""scripts/fault_table.py runs its probes for real: the CLI, fleet-protocol and server surfaces here
(about 15 s; the artifact surface builds a 1 GiB zip bomb and runs in the full script only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fault_table_cli_protocol_and_server_rows_all_pass(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fault_table.py"), "--only", "cli,protocol,server",
                           "--no-write", "--json"], capture_output=True, text=True, timeout=240)
    rows = json.loads(proc.stdout)
    failed = [r for r in rows if not r["ok"]]
    assert proc.returncode == (1 if failed else 0), proc.stderr
    assert {r["surface"] for r in rows} == {"cli", "protocol", "server"}
    inputs = {r["input"] for r in rows}
    assert {"run --output /proc/version", "keygen ''", "serve --port 99999", "30,000-deep JSON array",
            "slowloris: one header byte every 0.5 s"} <= inputs
    assert all(r["actual"] for r in rows)  # every verdict rests on something observed
    assert not failed, "\n".join(f"{r['surface']} | {r['input']} | {r['actual']}" for r in failed)


def test_fault_table_writes_a_generated_markdown_file(tmp_path):
    out = tmp_path / "faults.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fault_table.py"), "--only", "protocol",
                           "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert text.startswith("<!-- GENERATED FILE") and "python scripts/fault_table.py --only protocol" in text
    assert "| surface | input | expected | actual | verdict |" in text
