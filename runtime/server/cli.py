"""``edgeml serve``: a thin layer over ``ModelServer``."""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path

import click

from edgeml.cli import DurationType, PortType, check_trusted_keys, emit, examples, handle_errors, json_option, port_in_use


def _finite(lo: float, hi: float, *, low_open: bool = False):
    """A click callback: a finite number in [lo, hi] (click.FloatRange lets nan through)."""

    def check(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
        if value is None:
            return None
        if not math.isfinite(value) or value > hi or value < lo or (low_open and value == lo):
            above = f"above {lo:g}" if low_open else f"from {lo:g}"
            raise click.BadParameter(f"{value!r} is not a number {above} to {hi:g}")
        return value

    return check


_MS, _S = DurationType("ms"), DurationType("s")   # 2ms / 0.5s / 1m everywhere; bare numbers keep the option's unit
_PORT = PortType()      # one range check and message for every port option (edgeml/cli.py)


@click.command("serve", epilog=examples(
    "edgeml serve digits.edgepkg --port 8000",
    "curl -s -H 'Content-Type: application/json' -d @digit.json localhost:8000/v2/models/digits-cnn/infer",
    "edgeml serve a.edgepkg b.edgepkg --grpc-port 8001 --max-inflight 64 --cache-mb 32",
    "(docs/serving.md: every endpoint, limits, admission, breaker, cache, fallback)"))
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=_PORT, help="Port (0 picks a free one).")
@click.option("--grpc-port", type=_PORT, default=None,
              help="Also serve the v2 gRPC protocol on this port (0 picks a free one; needs edgeml[serve]).")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 65536),
              help="Rows per backend run (dynamic batching).")
@click.option("--max-delay-ms", default=2.0, show_default=True, type=_MS, callback=_finite(0, 60_000),
              help="Longest a request waits for its batch to fill (2ms, 0.5s; a bare number is ms).")
@click.option("--max-body-mb", default=16.0, show_default=True, type=float, callback=_finite(0, 4096, low_open=True),
              help="Largest request body accepted (413 past it).")
@click.option("--max-request-rows", type=click.IntRange(1, 1 << 24), default=None,
              help="Most rows one request may carry (413 past it; default: --max-batch).")
@click.option("--max-connections", default=1024, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Open HTTP connections; more are answered 503 and closed.")
@click.option("--header-timeout", "header_timeout_s", default=10.0, show_default=True, type=_S,
              callback=_finite(0, 86_400, low_open=True),
              help="How long a client has to send a request's headers (10s, 500ms; a bare number is seconds).")
@click.option("--body-timeout", "body_timeout_s", default=60.0, show_default=True, type=_S,
              callback=_finite(0, 86_400, low_open=True),
              help="How long a client has to send a request's body (60s, 2m; a bare number is seconds).")
@click.option("--threads", type=click.IntRange(1, 4096), default=None,
              help="Backend intra-op threads (default: the artifact's choice).")
@click.option("--batch-mode", type=click.Choice(["auto", "inline", "thread"]), default="auto", show_default=True,
              help="Run batches on the event loop (inline) or a worker thread; auto picks by model speed.")
@click.option("--trusted-key", "trusted_keys", multiple=True, envvar="EDGEML_TRUSTED_KEYS", show_envvar=True,
              type=click.Path(path_type=Path),
              help="Public key whose signature artifacts must carry (repeatable).")
@click.option("--allow-unsigned", is_flag=True, help="With --trusted-key: still accept unsigned artifacts.")
@click.option("--repository", "repository_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder from which POST /v2/repository/models/NAME/load may load new artifacts.")
@click.option("--admin-token", envvar="EDGEML_ADMIN_TOKEN", default=None, show_envvar=True,
              help="Enable the repository API (load/unload/index) for requests with 'Authorization: Bearer TOKEN'"
                   " (at least 8 characters). Without it the repository API answers 403.")
@click.option("--access-log", is_flag=True, help="Log every request (errors are always logged).")
@click.option("--max-inflight", type=click.IntRange(1, 1 << 20), default=None,
              help="Per model: requests admitted and not yet answered; more get 429 + Retry-After at once.")
@click.option("--max-queue-ms", type=_MS, default=None, callback=_finite(0, 3_600_000, low_open=True),
              help="Per model: longest a request may wait for its batch to start; past it 503 + Retry-After"
                   " (250ms, 1s; a bare number is ms).")
@click.option("--cache-mb", type=float, default=None, callback=_finite(0, 65536),
              help="Response cache per model, in MiB (0 = off; default: the artifact's runtime.cache_mb).")
@click.option("--breaker-failures", type=click.IntRange(0, 1 << 20), default=5, show_default=True,
              help="Consecutive backend failures that open a model's circuit breaker (0 = no breaker).")
@click.option("--breaker-open-s", type=_S, default=5.0, show_default=True, callback=_finite(0, 86_400, low_open=True),
              help="How long the breaker stays open before a probe, doubling at each re-open up to 300s"
                   " (5s, 500ms; a bare number is seconds).")
@click.option("--fallback", "fallbacks", multiple=True, metavar="ART=FALLBACK",
              help="Serve FALLBACK (an .edgepkg of the same model) when ART fails to load or its breaker is open.")
@json_option
@handle_errors
def serve_cmd(artifacts, host, port, grpc_port, max_batch, max_delay_ms, max_body_mb, max_request_rows,
              max_connections, header_timeout_s, body_timeout_s, threads, batch_mode, trusted_keys,
              allow_unsigned, repository_dir, admin_token, access_log, max_inflight, max_queue_ms, cache_mb,
              breaker_failures, breaker_open_s, fallbacks, as_json) -> None:
    """Serve ARTIFACTS over the Open Inference Protocol (KServe v2 HTTP) until SIGINT/SIGTERM.

    Logs are JSON lines on stderr with --json (text otherwise); the listening address is printed on stdout.
    """
    if admin_token is not None and len(admin_token) < 8:
        raise click.BadParameter("the token must be at least 8 characters", param_hint="'--admin-token'")
    from edgeml.errors import ServeError
    from edgeml.runtime.server import ModelServer, ServerConfig
    from edgeml.runtime.server.breaker import BreakerConfig

    check_trusted_keys(trusted_keys)
    fallback_of = _fallback_map(fallbacks, artifacts)

    config = ServerConfig(
        host=host, port=port, max_batch=max_batch, max_delay_ms=max_delay_ms,
        max_body_bytes=max(1, int(max_body_mb * (1 << 20))), trusted_keys=list(trusted_keys),
        max_request_rows=max_request_rows, max_connections=max_connections, header_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s, admin_token=admin_token,
        require_signature=False if allow_unsigned else None, threads=threads, log_json=as_json,
        batch_mode=batch_mode, repository_dir=repository_dir, access_log=access_log, grpc_port=grpc_port,
        max_inflight=max_inflight, max_queue_ms=max_queue_ms, cache_mb=cache_mb,
        breaker=BreakerConfig(failures=breaker_failures, open_s=breaker_open_s,
                              max_open_s=max(300.0, breaker_open_s)))
    server = ModelServer(config)
    for artifact in artifacts:
        server.load(artifact, fallback=fallback_of.get(str(artifact)))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        bound_host, bound_port = server.start()
    except ServeError as exc:      # a taken port: the same message and exit code (2) as the manager and agent
        err = port_in_use(exc, "--port", port)
        if err is None:
            raise
        server.stop()
        raise err from None
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


def _fallback_map(pairs: tuple[str, ...], artifacts: tuple[Path, ...]) -> dict[str, Path]:
    """``--fallback ART=FALLBACK`` pairs; ART must be one of the served artifacts, FALLBACK a file."""
    out: dict[str, Path] = {}
    served = {str(a) for a in artifacts}
    for pair in pairs:
        art, sep, fb = pair.partition("=")
        if not sep or not art or not fb:
            raise click.BadParameter(f"{pair!r} is not ART=FALLBACK", param_hint="'--fallback'")
        if art not in served:
            raise click.BadParameter(f"{art!r} is not one of the artifacts served ({sorted(served)})",
                                     param_hint="'--fallback'")
        if not Path(fb).is_file():
            raise click.BadParameter(f"fallback {fb!r} is not a file", param_hint="'--fallback'")
        out[art] = Path(fb)
    return out
