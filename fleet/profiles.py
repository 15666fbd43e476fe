"""``--profile lab``: short timings for a lab or a demo, one switch on the agent, the manager and ``rollout start``.

Why a 5-device, 3-wave rollout takes minutes with the defaults (docs/fleet-protocol.md "Timings"): each wave
waits for its devices' installs (health window 10 s after the swap), then bakes 60 s with its gates green before
the next wave (and after the last one); devices report every 10 s (heartbeat, telemetry), and gates read
telemetry. 3 waves x (~10 s health + up to 10 s reporting + 60 s bake) ~ 4 minutes. Production wants those
windows (a bad model shows in real traffic over a minute, not a second); a lab wants seconds. The profile only
changes defaults: an option given on the command line always wins.
"""

from __future__ import annotations

from typing import Any

import click

PROFILES: dict[str, dict[str, dict[str, str]]] = {
    "default": {"agent": {}, "manager": {}, "rollout": {}},
    "lab": {
        "agent": {"heartbeat": "1s", "telemetry_every": "1s", "health_window": "1s"},
        "manager": {"heartbeat_timeout": "5s", "offline_timeout": "30s", "health_window": "1s"},
        "rollout": {"bake": "2s", "health_window": "1s"},
    },
}


def profile_option(func: Any) -> Any:
    return click.option("--profile", type=click.Choice(sorted(PROFILES)), default="default", show_default=True,
                        help="Timing defaults: 'lab' = heartbeat/telemetry 1s, health window 1s, bake 2s,"
                             " heartbeat timeout 5s (seconds instead of minutes per rollout; options given"
                             " explicitly win).")(func)


def apply_profile(profile: str, command: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the profile's values for every option the user did not give explicitly."""
    ctx = click.get_current_context()
    out = dict(params)
    for name, value in PROFILES[profile][command].items():
        source = ctx.get_parameter_source(name)
        if source is None or source == click.core.ParameterSource.DEFAULT:
            out[name] = value
    return out
