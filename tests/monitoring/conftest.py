"""Monitoring tests reuse the fleet fixtures (real Mosquitto, keys, manager, agent subprocesses)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("edgeml_fleet_test_fixtures",
                                               Path(__file__).resolve().parent.parent / "fleet" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_fleet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fleet)

mosquitto_bin = _fleet.mosquitto_bin
broker = _fleet.broker
keys = _fleet.keys
start_manager = _fleet.start_manager
agents = _fleet.agents
