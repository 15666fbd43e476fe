"""edgeml.fleet: roll models out to device fleets over MQTT, safely.

    protocol.py   topics, message schemas (schema_version), validation, signing  -> docs/fleet-protocol.md
    transport.py  paho-mqtt 2.x wrapper: MQTT 5 -> 3.1.1 fallback, reconnect backoff + jitter, TLS, auth
    store.py      content-addressed artifact store, HTTP server with Range, resuming download
    agent.py      the device agent (AgentCore state machine + Agent with its MQTT connection)
    slots.py      install slots and the atomic journal
    serving.py    what the agent serves with (embedded ModelServer, in-process, simulator stub)
    manager.py    registry + rollouts (waves, bake, gates, rollback, audit) over SQLite (db.py)
    gates/        one module per rollout gate, registry GATES
    service.py    the long-running manager process; CommandClient for the CLI
    simulator.py  many agents in one process (model run stubbed)
    demo.py       ``edgeml fleet demo``;  cli.py  ``edgeml agent`` / ``edgeml fleet ...``
"""
