"""The batcher on a real event loop, with a numpy function standing in for the backend run."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from edgeml.runtime.server.batching import Batcher
from edgeml.runtime.server.metrics import ModelStats


def run_batches(requests, *, mode, max_batch=4, max_delay_ms=0.0, batchable=True, fail_on=None):
    """Submit every request in one loop pass; return (results in order, list of run sizes, stats)."""
    runs: list[int] = []

    def run(feeds):
        x = feeds["x"]
        runs.append(x.shape[0])
        if fail_on is not None and np.any(x == fail_on):
            raise RuntimeError(f"bad value {fail_on}")
        return {"y": x * 2}

    loop = asyncio.new_event_loop()
    stats = ModelStats()
    batcher = Batcher(run, loop, stats, max_batch=max_batch, max_delay_ms=max_delay_ms, batchable=batchable, mode=mode)
    results: list = [None] * len(requests)
    left = {"n": len(requests)}

    def submit_all():
        for i, x in enumerate(requests):
            def cb(result, queue_ms, i=i):
                results[i] = result
                left["n"] -= 1
                if left["n"] == 0:
                    loop.stop()
            batcher.submit({"x": x}, x.shape[0], cb)

    loop.call_soon(submit_all)
    timer = threading.Timer(10, loop.call_soon_threadsafe, args=(loop.stop,))
    timer.start()
    loop.run_forever()
    timer.cancel()
    batcher.close()
    loop.close()
    return results, runs, stats


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_requests_are_concatenated_up_to_max_batch_and_split_back(mode):
    reqs = [np.full((1, 3), i, np.float32) for i in range(5)] + [np.full((2, 3), 9, np.float32)]
    results, runs, stats = run_batches(reqs, mode=mode, max_batch=4)
    for x, r in zip(reqs, results):
        np.testing.assert_array_equal(r["y"], x * 2)
    assert runs == [4, 3], "5 single rows + one 2-row request, max 4 rows per run"
    assert stats.batch_size.count == 2 and stats.rows == 7


def test_requests_with_different_trailing_shapes_are_not_mixed():
    reqs = [np.ones((1, 3), np.float32), np.ones((1, 5), np.float32), np.ones((1, 3), np.float32),
            np.ones((1, 5), np.float32)]
    results, runs, _ = run_batches(reqs, mode="inline", max_batch=8)
    assert runs == [2, 2]
    assert [r["y"].shape for r in results] == [(1, 3), (1, 5), (1, 3), (1, 5)]


def test_unbatchable_models_run_one_request_at_a_time():
    reqs = [np.full((1, 2), i, np.float32) for i in range(3)]
    results, runs, _ = run_batches(reqs, mode="inline", batchable=False)
    assert runs == [1, 1, 1]
    assert [float(r["y"][0, 0]) for r in results] == [0.0, 2.0, 4.0]


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_a_failing_request_does_not_fail_its_batch_mates(mode):
    reqs = [np.full((1, 2), v, np.float32) for v in (1, 7, 2)]
    results, runs, _ = run_batches(reqs, mode=mode, fail_on=7)
    assert runs == [3, 1, 1, 1], "the failed batch is re-run request by request"
    assert isinstance(results[1], RuntimeError) and "bad value 7" in str(results[1])
    np.testing.assert_array_equal(results[0]["y"], [[2, 2]])
    np.testing.assert_array_equal(results[2]["y"], [[4, 4]])


def test_max_delay_lets_a_batch_gather_then_dispatches():
    reqs = [np.full((1, 2), i, np.float32) for i in range(3)]
    results, runs, stats = run_batches(reqs, mode="inline", max_batch=32, max_delay_ms=50)
    assert runs == [3]
    assert stats.queue_ms.sum / 3 < 50, "no request waits past max_delay_ms when nothing more arrives"
