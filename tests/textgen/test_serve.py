"""edgeml serve with a text-generation artifact: v2 generate(_stream), OpenAI /v1 endpoints, limits, cancellation.

Real server, real OpenVINO model, real sockets: a plain HTTP client (http.client, curl) and the `openai` package.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest


@pytest.fixture(scope="module")
def server(compiled, tmp_path_factory):
    from edgeml.runtime.server.app import ModelServer, ServerConfig

    path, _ = compiled
    srv = ModelServer(ServerConfig(port=0, cache_dir=tmp_path_factory.mktemp("serve-cache")))
    srv.load(path, name="tiny")
    srv.start()
    yield srv
    srv.stop()


def _post(srv, path: str, body, headers=None) -> tuple[int, dict]:
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=60)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, raw, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


def _sse(srv, path: str, body) -> tuple[int, str, list]:
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    ctype = resp.getheader("content-type")
    text = resp.read().decode()
    conn.close()
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    return resp.status, ctype, events


def _greedy_reference(compiled, prompt: str, n: int) -> str:
    """What greedy decoding must give: the artifact's own engine stepped by hand, no server."""
    from tokenizers import Tokenizer

    from edgeml.runtime.artifact import open_artifact
    from edgeml.runtime.textgen import DecoderEngine

    path, _ = compiled
    art = open_artifact(path)
    try:
        gen = art.typed.info["generation"]
        tok = Tokenizer.from_file(str(art.member(gen["tokenizer"])))
        s = gen["shape"]
        engine = DecoderEngine(art.entrypoint, s["layers"], s["kv_heads"], s["head_dim"], art.typed.precision)
        ids = tok.encode(prompt).ids
        out: list[int] = []
        keys = values = None
        pos, feed = 0, ids
        for _ in range(n):
            logits, keys, values = engine.step(np.asarray(feed, np.int64), pos, keys, values)
            pos += len(feed)
            token = int(np.argmax(logits[-1]))
            if token == gen["eos_token_id"]:
                break
            out.append(token)
            feed = [token]
        return tok.decode(out)
    finally:
        art.release()


PROMPT = "def main(argv):\n    "


def test_v2_generate_is_greedy_decoding_and_stream_gives_the_same_text(server, compiled):
    want = _greedy_reference(compiled, PROMPT, 24)
    status, doc = _post(server, "/v2/models/tiny/generate", {"text_input": PROMPT, "parameters": {"max_tokens": 24}})
    assert status == 200, doc
    assert doc["text_output"] == want and doc["model_name"] == "tiny"
    assert doc["finish_reason"] in ("length", "stop") and doc["usage"]["completion_tokens"] <= 24
    status, ctype, events = _sse(server, "/v2/models/tiny/generate_stream",
                                 {"text_input": PROMPT, "parameters": {"max_tokens": 24}})
    assert status == 200 and ctype.startswith("text/event-stream")
    docs = [json.loads(e) for e in events]
    assert len(docs) > 1 and "".join(d["text_output"] for d in docs) == want
    assert docs[-1]["finish_reason"] == doc["finish_reason"]


def test_stop_sequence_ends_the_text_before_it(server, compiled):
    want = _greedy_reference(compiled, PROMPT, 24)
    stop = want[4:7]
    assert len(stop) == 3
    status, doc = _post(server, "/v2/models/tiny/generate",
                        {"text_input": PROMPT, "parameters": {"max_tokens": 24, "stop": [stop]}})
    assert status == 200 and doc["finish_reason"] == "stop"
    assert doc["text_output"] == want[:want.find(stop)]


def test_openai_client_completions_and_chat_stream_and_not(server, compiled):
    openai = pytest.importorskip("openai", reason="the OpenAI client (pip install openai) is not installed")
    host, port = server.address
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0)
    want = _greedy_reference(compiled, PROMPT, 20)
    done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    assert done.choices[0].text == want and done.usage.completion_tokens <= 20
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stream=True))
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks) == want
    msgs = [{"role": "user", "content": "print a list"}]
    chat = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    text = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and isinstance(text, str)
    streamed = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                                   stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text
    assert streamed[-1].choices[0].finish_reason in ("length", "stop")
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_curl_reads_the_event_stream(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    host, port = server.address
    out = subprocess.run(["curl", "-sN", "-H", "Content-Type: application/json", "-d",
                          json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "stream": True}),
                          f"http://{host}:{port}/v1/completions"], capture_output=True, text=True, timeout=60)
    lines = [x for x in out.stdout.split("\n") if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 2
    assert json.loads(lines[0][6:])["object"] == "text_completion"


@pytest.mark.parametrize("path,body,status,words", [
    ("/v2/models/tiny/generate", b'{"text_input": "\xff\xfe bad"}', 400, "UTF-8"),
    ("/v2/models/tiny/generate", b'{"text_input": "\\ud800"}', 400, "UTF-8"),
    ("/v2/models/tiny/generate", {"text_input": "x", "parameters": {"stop": ["s" * (1 << 20)]}}, 400, "stop"),
    ("/v2/models/tiny/generate", {"text_input": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, 400, "stop"),
    ("/v2/models/tiny/generate", {"text_input": "x", "parameters": {"max_tokens": -1}}, 400, "max_tokens"),
    ("/v2/models/tiny/generate", {"text_input": "x", "parameters": {"max_tokens": 10 ** 12}}, 400, "max_tokens"),
    ("/v2/models/tiny/generate", {"text_input": "x", "parameters": {"max_tokens": "many"}}, 400, "max_tokens"),
    ("/v2/models/tiny/generate", {"text_input": "x" * 200_000}, 400, "prompt"),
    ("/v2/models/tiny/generate", {"text_input": "import os\n" * 300}, 400, "tokens"),
    ("/v2/models/tiny/generate", {"text_input": 5}, 400, "text_input"),
    ("/v2/models/nope/generate", {"text_input": "x"}, 404, "nope"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 3}, 400, "'n'"),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 9}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
])
def test_hostile_requests_get_a_one_line_4xx(server, path, body, status, words):
    got, doc = _post(server, path, body)
    assert got == status, doc
    assert set(doc) == {"error"} and "\n" not in doc["error"] and words in doc["error"]


def _stats(server):
    from edgeml.runtime.server.generate import registry

    return registry(server)["tiny"].stats()


def test_a_client_that_goes_away_cancels_its_sequence_and_frees_the_kv_cache(server):
    before = _stats(server)["cancelled"]
    host, port = server.address
    sock = socket.create_connection((host, port), timeout=30)
    body = json.dumps({"text_input": PROMPT, "parameters": {"max_tokens": 200, "temperature": 1.0, "seed": 1}})
    sock.sendall(f"POST /v2/models/tiny/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    got = b""
    while b"data: " not in got:                      # the stream started
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    sock.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = _stats(server)
        if st["cancelled"] > before and st["kv_reserved_bytes"] == 0 and st["active"] == 0:
            break
        time.sleep(0.05)
    assert st["cancelled"] == before + 1 and st["kv_reserved_bytes"] == 0, st


def test_metrics_report_time_to_first_token_and_inter_token_latency(server):
    _post(server, "/v2/models/tiny/generate", {"text_input": PROMPT, "parameters": {"max_tokens": 8}})
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    count = [ln for ln in text.splitlines() if ln.startswith('edgeml_time_to_first_token_ms_count{model="tiny"')]
    assert count and float(count[0].split()[-1]) >= 1
    assert any(ln.startswith("edgeml_inter_token_ms_bucket") for ln in text.splitlines())
    assert any(ln.startswith('edgeml_generated_tokens_total{model="tiny"') for ln in text.splitlines())


def test_inference_endpoints_still_answer_for_ordinary_models_beside(server):
    got, doc = _post(server, "/v2/models/tiny/infer", {"inputs": []})
    assert got == 404 and "error" in doc


def test_a_client_too_far_behind_is_dropped_and_its_sequence_cancelled(server, monkeypatch):
    from edgeml.runtime.server import generate

    # a bound of -1 bytes: every streaming client counts as too far behind at its first event
    monkeypatch.setattr(generate, "MAX_UNSENT_BYTES", -1)
    before = _stats(server)["cancelled"]
    host, port = server.address
    sock = socket.create_connection((host, port), timeout=30)
    body = json.dumps({"text_input": PROMPT, "parameters": {"max_tokens": 200, "temperature": 1.0, "seed": 2}})
    sock.sendall(f"POST /v2/models/tiny/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    got = b""
    while True:                                      # the server closes the connection (abort)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    sock.close()
    assert got.startswith(b"HTTP/1.1 200") and b"data: " not in got
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = _stats(server)
        if st["cancelled"] > before and st["kv_reserved_bytes"] == 0:
            break
        time.sleep(0.05)
    assert st["cancelled"] == before + 1 and st["kv_reserved_bytes"] == 0, st
    assert st["responses"].get("499", 0) >= 1
