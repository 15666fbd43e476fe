#!/usr/bin/env python3
"""Run every input class of issue 9 against the real surfaces and publish what happened.

    .venv/bin/python scripts/fault_table.py                 # all surfaces; writes docs/security-faults.md
    .venv/bin/python scripts/fault_table.py --only cli,protocol --no-write

Surfaces: ``server`` (a real ``edgeml serve`` subprocess on a free loopback port, raw HTTP), ``artifact``
(crafted .edgepkg files through ``edgeml inspect`` subprocesses, peak RSS measured), ``protocol`` (the fleet
message gate ``fleet.protocol.validate``) and ``cli`` (user mistakes, as subprocesses). Each row's "actual" is
what was observed; the verdict compares it with the expectation. Exit status 1 when any row FAILs.
Every probe has a timeout; the whole run takes well under two minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_probes import Observed, artifact_rows, cli_rows, protocol_rows, server_rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SURFACES: dict[str, Callable[[Path], list["Row"]]] = {}


@dataclass
class Row:
    surface: str
    input: str
    expected: str
    actual: str
    ok: bool

    def markdown(self) -> str:
        cells = [self.surface, self.input, self.expected, self.actual, "pass" if self.ok else "**FAIL**"]
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _rows(surface: str, observed: list[Observed]) -> list[Row]:
    return [Row(surface, o.input, o.expected, o.actual, o.ok) for o in observed]


def run(surfaces: list[str], work: Path) -> list[Row]:
    probes = {"server": server_rows, "artifact": artifact_rows, "protocol": protocol_rows, "cli": cli_rows}
    rows: list[Row] = []
    for name in surfaces:
        start = time.monotonic()
        folder = work / name
        folder.mkdir()
        try:
            # temp paths say nothing to a reader of the table: show them as $TMP
            rows += [Row(r.surface, r.input, r.expected, r.actual.replace(str(work), "$TMP"), r.ok)
                     for r in _rows(name, probes[name](folder))]
        except Exception as exc:  # noqa: BLE001 - a probe harness failure is itself a FAIL row, not a crash
            rows.append(Row(name, "(probe harness)", "runs", f"harness error {type(exc).__name__}: {exc}", False))
        print(f"# {name}: {time.monotonic() - start:.1f}s", file=sys.stderr)
    return rows


def render(rows: list[Row], command: str) -> str:
    failed = sum(not r.ok for r in rows)
    head = [
        "<!-- GENERATED FILE: do not edit by hand. -->",
        "# Fault table (generated)",
        "",
        f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by `{command}`.",
        "Every row was run against the real surface; **actual** is what was observed, never typed.",
        f"{len(rows)} rows, {failed} FAIL. See docs/security.md for the threat model.",
        "",
        "| surface | input | expected | actual | verdict |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + [r.markdown() for r in rows]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="server,artifact,protocol,cli",
                        help="comma-separated surfaces: server, artifact, protocol, cli")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "security-faults.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--json", action="store_true", help="print rows as JSON instead of Markdown")
    args = parser.parse_args(argv)
    surfaces = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in surfaces if s not in ("server", "artifact", "protocol", "cli")]
    if unknown:
        parser.error(f"unknown surface(s) {unknown}; choose from server, artifact, protocol, cli")
    with tempfile.TemporaryDirectory(prefix="edgeml-faults-") as work:
        rows = run(surfaces, Path(work))
    command = "python scripts/fault_table.py" + ("" if args.only == parser.get_default("only") else f" --only {args.only}")
    text = render(rows, command)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
    else:
        print(text, end="")
    if not args.no_write:
        from edgeml.runtime.fsutil import atomic_write_bytes

        atomic_write_bytes(args.output, text.encode())
        print(f"# wrote {args.output}", file=sys.stderr)
    return 1 if any(not r.ok for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
