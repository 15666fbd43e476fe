"""Test-only fault injection: ``python crash_agent.py STATE[@VERSION] agent ARGS...`` runs ``edgeml agent``
with the agent patched to SIGKILL itself once, right after journaling STATE (for that artifact version).

Production code has no kill switch: this file is the only place that can make an agent crash on purpose,
and only the fleet tests start it.
"""

from __future__ import annotations

import os
import signal
import sys


def install_crash(spec: str) -> None:
    from edgeml.fleet import agent

    state, _, version = spec.partition("@")
    journal_state = agent.AgentCore._journal_state

    def journal_then_crash(self, desired, attempt, st, **extra):
        journal_state(self, desired, attempt, st, **extra)
        if st == state and (not version or version == (desired.get("artifact") or {}).get("version")):
            marker = self.state_dir / f"crashed-at-{st}"
            if not marker.exists():
                marker.write_text("crashed once here")
                os.kill(os.getpid(), signal.SIGKILL)

    agent.AgentCore._journal_state = journal_then_crash


if __name__ == "__main__":
    install_crash(sys.argv.pop(1))
    from edgeml.cli import main

    main()
