"""The Generator's scheduling on a real compiled decoder: fair interleaving, the KV budget, cancellation."""

from __future__ import annotations

import threading

import pytest

from edgeml.errors import UsageError


@pytest.fixture(scope="module")
def model(compiled, tmp_path_factory):
    from edgeml.runtime.textgen import TextGenModel

    path, _ = compiled
    m = TextGenModel.open(path, cache_dir=tmp_path_factory.mktemp("gen-cache"))
    yield m
    m.close()


def _collect(model, prompt, params, order, tag, gone=None):
    done = threading.Event()
    events = []

    def emit(ev):
        events.append(ev)
        order.append(tag)
        if ev.finish is not None:
            done.set()

    job = model.generator.submit(model.encode(prompt), params, emit, gone=gone)
    return job, events, done


def test_two_sequences_interleave_token_by_token(model):
    from edgeml.runtime.textgen import SamplingParams

    order: list[str] = []
    p = SamplingParams(max_tokens=30, temperature=1.0, seed=3)
    _, ea, da = _collect(model, "class A:\n", p, order, "a")
    _, eb, db = _collect(model, "import sys\n", p, order, "b")
    assert da.wait(60) and db.wait(60)
    # neither finishes before the other has started: both progress turn by turn
    assert order.index("b") < len(order) - order[::-1].index("a") - 1
    assert order.index("a") < len(order) - order[::-1].index("b") - 1


def test_kv_budget_queues_what_does_not_fit_and_refuses_what_never_fits(model):
    from edgeml.runtime.textgen import SamplingParams

    gen = model.generator
    per_token = gen.kv_bytes_per_token
    saved = gen.kv_budget_bytes
    try:
        gen.kv_budget_bytes = per_token * 60               # room for one 40-token sequence at a time
        with pytest.raises(UsageError, match="KV cache"):
            gen.submit([1] * 10, SamplingParams(max_tokens=60), lambda ev: None)
        order: list[str] = []
        p = SamplingParams(max_tokens=30, temperature=1.0, seed=5)
        _, ea, da = _collect(model, "x = 1\n", p, order, "a")
        _, eb, db = _collect(model, "y = 2\n", p, order, "b")
        assert da.wait(60) and db.wait(60)
        # the second waited for the first's reservation: strictly one after the other
        assert order == sorted(order)
        assert gen.load()["kv_reserved_bytes"] == 0
    finally:
        gen.kv_budget_bytes = saved


def test_a_gone_client_is_cancelled_even_while_waiting(model):
    from edgeml.runtime.textgen import SamplingParams

    gone = threading.Event()
    order: list[str] = []
    _, events, done = _collect(model, "def f():\n", SamplingParams(max_tokens=200, temperature=1.0, seed=1), order,
                               "a", gone=gone.is_set)
    gone.set()
    assert done.wait(60)
    assert events[-1].finish == "cancelled" and events[-1].completion_tokens < 200


def test_chunked_prefill_gives_the_same_greedy_text(model):
    from edgeml.runtime.textgen import SamplingParams

    prompt = "def parse(text):\n    for line in text.splitlines():\n        if line.startswith('#'):\n"
    assert len(model.encode(prompt)) > 7
    texts = []
    for chunk in (1000, 3):                      # whole prompt in one step; three tokens per turn
        model.generator.prefill_chunk = chunk
        try:
            _, events, done = _collect(model, prompt, SamplingParams(max_tokens=12), [], "a")
            assert done.wait(60)
        finally:
            model.generator.prefill_chunk = 64
        texts.append("".join(e.text for e in events))
    assert texts[0] == texts[1] and texts[0]
