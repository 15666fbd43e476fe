"""``edgeml serve``: a thin layer over ``ModelServer``."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from edgeml.cli import emit, handle_errors, json_option


@click.command("serve")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port (0 picks a free one).")
@click.option("--grpc-port", type=int, default=None,
              help="Also serve the v2 gRPC protocol on this port (0 picks a free one; needs edgeml[serve]).")
@click.option("--max-batch", default=32, show_default=True, type=int, help="Rows per backend run (dynamic batching).")
@click.option("--max-delay-ms", default=2.0, show_default=True, type=float, help="Longest a request waits for its batch to fill.")
@click.option("--max-body-mb", default=64.0, show_default=True, type=float, help="Largest request body accepted.")
@click.option("--threads", type=int, default=None, help="Backend intra-op threads (default: the artifact's choice).")
@click.option("--batch-mode", type=click.Choice(["auto", "inline", "thread"]), default="auto", show_default=True,
              help="Run batches on the event loop (inline) or a worker thread; auto picks by model speed.")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path),
              help="Public key whose signature artifacts must carry (repeatable).")
@click.option("--allow-unsigned", is_flag=True, help="With --trusted-key: still accept unsigned artifacts.")
@click.option("--repository", "repository_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder from which POST /v2/repository/models/NAME/load may load new artifacts.")
@click.option("--access-log", is_flag=True, help="Log every request (errors are always logged).")
@json_option
@handle_errors
def serve_cmd(artifacts, host, port, grpc_port, max_batch, max_delay_ms, max_body_mb, threads, batch_mode, trusted_keys,
              allow_unsigned, repository_dir, access_log, as_json) -> None:
    """Serve ARTIFACTS over the Open Inference Protocol (KServe v2 HTTP) until SIGINT/SIGTERM.

    Logs are JSON lines on stderr with --json (text otherwise); the listening address is printed on stdout.
    """
    from edgeml.runtime.server import ModelServer, ServerConfig

    config = ServerConfig(
        host=host, port=port, max_batch=max_batch, max_delay_ms=max_delay_ms,
        max_body_bytes=int(max_body_mb * (1 << 20)), trusted_keys=list(trusted_keys),
        require_signature=False if allow_unsigned else None, threads=threads, log_json=as_json,
        batch_mode=batch_mode, repository_dir=repository_dir, access_log=access_log, grpc_port=grpc_port)
    server = ModelServer(config)
    for artifact in artifacts:
        server.load(artifact)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    bound_host, bound_port = server.start()
    result = {"listening": f"http://{bound_host}:{bound_port}", "models": server.models()}
    if server.grpc_address is not None:
        result["grpc"] = "{}:{}".format(*server.grpc_address)
    emit(result, as_json, lambda r: f"serving {', '.join(m['name'] + ':' + m['version'] for m in r['models'])} on "
         f"{r['listening']}" + (f" and gRPC {r['grpc']}" if "grpc" in r else ""))
    import sys

    sys.stdout.flush()
    while not stop.wait(0.5):
        pass
    server.stop()
