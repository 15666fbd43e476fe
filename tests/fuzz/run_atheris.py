#!/usr/bin/env python3
"""Coverage-guided runs (atheris / libFuzzer) of the same properties the hypothesis suite checks.

    .venv/bin/pip install atheris                      # optional; a cp311 manylinux wheel exists
    .venv/bin/python tests/fuzz/run_atheris.py artifact -max_total_time=300
    .venv/bin/python tests/fuzz/run_atheris.py v2 -runs=100000
    .venv/bin/python tests/fuzz/run_atheris.py fleet -max_total_time=60

atheris drives each hypothesis test through ``test.hypothesis.fuzz_one_input``: libFuzzer mutates the
choice bytes hypothesis turns into crafted inputs, guided by the coverage of the instrumented edgeml
modules. A property failure is raised as the test's exception and libFuzzer writes the crashing input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "runtime")]

with atheris.instrument_imports(include=["edgeml"]):
    import test_fuzz_artifact
    import test_fuzz_fleet_protocol
    import test_fuzz_v2_decoder

TARGETS = {
    "artifact": test_fuzz_artifact.test_fuzz_crafted_artifacts_only_edgeml_errors,
    "artifact-bytes": test_fuzz_artifact.test_fuzz_random_bytes_only_edgeml_errors,
    "v2": test_fuzz_v2_decoder.test_fuzz_json_and_binary_requests_batched_model,
    "v2-bytes": test_fuzz_v2_decoder.test_fuzz_raw_bytes_only_bad_request,
    "fleet": test_fuzz_fleet_protocol.test_fuzz_validate_refuses_or_accepts_usable_messages,
    "fleet-bytes": test_fuzz_fleet_protocol.test_fuzz_validate_raw_bytes_only_message_rejected,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: run_atheris.py {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target.hypothesis.fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
