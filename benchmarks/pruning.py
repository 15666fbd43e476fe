"""Structured (channel) pruning with torch-pruning: latency and accuracy before/after, from this script.

    python -m edgeml.benchmarks.pruning [--ratios 0.25,0.5] [--models digits,resnet18]

For each model and ratio: ``torch_pruning.pruner.MagnitudePruner`` (group L2 importance over DepGraph, the
classifier layer kept) removes that fraction of channels from every prunable group; the digits CNN is then
fine-tuned for a few epochs on its training split (examples/digits/train.py's loop and data) and its top-1
measured on the eval split; ResNet-18 has random weights, so only its latency means anything. Each model is
exported to ONNX (batch 1) and timed on ONNX Runtime FP32 (interleaved rounds, p50).

The decision mirrors the compiler's selection rule: a pruned variant is kept only when it is faster AND within
the tolerance (1 top-1 point). The script also times the same model with 50 % of its conv weights zeroed
(unstructured magnitude sparsity): ONNX Runtime's CPU kernels do not skip zeros, so that "sparsity" is
reported with its (unchanged) latency, not claimed as speed. Pruning is not yet a compile candidate.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1.0
FINE_TUNE_EPOCHS = 8


def _digits_train():
    spec = importlib.util.spec_from_file_location("edgeml_digits_train", REPO / "examples" / "digits" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prune(model, example, ratio: float):
    """Remove ``ratio`` of the channels of every prunable group (the final Linear keeps its outputs)."""
    import torch
    import torch_pruning as tp

    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=head)
    pruner.step()
    return model


def zero_half_of_conv_weights(model):
    """Unstructured 50 % magnitude sparsity (zeros in place, shapes unchanged)."""
    import torch

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                w = m.weight
                w[w.abs() <= w.abs().flatten().median()] = 0.0
    return model


def export(model, example, path: Path) -> Path:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], do_constant_folding=True)
    return path


def time_onnx(paths: dict[str, Path], x: np.ndarray, rounds: int = 8, seconds: float = 0.4) -> dict[str, float]:
    """p50 ms per model on ONNX Runtime FP32, interleaved round by round."""
    import onnxruntime as ort

    runs: dict[str, Callable[[], Any]] = {}
    for label, path in paths.items():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        runs[label] = _runner(sess, x)
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds):
        for label in list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]:
            runs[label]()
            end = time.perf_counter() + seconds / len(runs)
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                runs[label]()
                samples[label].append(time.perf_counter() - t0)
    return {k: round(statistics.median(v) * 1000, 4) for k, v in samples.items()}


def _runner(sess: Any, x: np.ndarray) -> Callable[[], Any]:
    return lambda: sess.run(None, {"input": x})


def bench_digits(ratios: list[float], work: Path) -> dict[str, Any]:
    import copy

    import torch

    train = _digits_train()
    train.set_determinism()
    splits = train.load_splits()
    base = train.build_model()
    with torch.enable_grad():
        train.train(base, *splits["train"])
    base.eval()
    example = torch.zeros(1, 1, 8, 8)
    paths = {"dense": export(base, example, work / "digits-dense.onnx")}
    acc = {"dense": train.accuracy(base, *splits["eval"])}
    for ratio in ratios:
        label = f"pruned-{int(ratio * 100)}%"
        pruned = prune(copy.deepcopy(base), example, ratio)
        with torch.enable_grad():
            train.train(pruned, *splits["train"], epochs=FINE_TUNE_EPOCHS)
        pruned.eval()
        acc[label] = train.accuracy(pruned, *splits["eval"])
        paths[label] = export(pruned, example, work / f"digits-{label}.onnx")
    sparse = zero_half_of_conv_weights(copy.deepcopy(base))
    acc["unstructured-50%"] = train.accuracy(sparse, *splits["eval"])
    paths["unstructured-50%"] = export(sparse, example, work / "digits-unstructured.onnx")
    x = splits["eval"][0][:1]
    return _rows("digits", paths, acc, time_onnx(paths, x), params=_params(paths))


def bench_resnet18(ratios: list[float], work: Path) -> dict[str, Any]:
    import copy

    import torch

    from edgeml.benchmarks import models

    base = models.build("resnet18").eval()
    example = torch.zeros(1, 3, 224, 224)
    paths = {"dense": export(base, example, work / "resnet18-dense.onnx")}
    for ratio in ratios:
        label = f"pruned-{int(ratio * 100)}%"
        paths[label] = export(prune(copy.deepcopy(base), example, ratio), example, work / f"resnet18-{label}.onnx")
    paths["unstructured-50%"] = export(zero_half_of_conv_weights(copy.deepcopy(base)), example,
                                       work / "resnet18-unstructured.onnx")
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    return _rows("resnet18", paths, {}, time_onnx(paths, x, rounds=6, seconds=2.0), params=_params(paths))


def _params(paths: dict[str, Path]) -> dict[str, int]:
    import onnx

    out = {}
    for label, path in paths.items():
        model = onnx.load(str(path))
        out[label] = int(sum(np.prod(t.dims) for t in model.graph.initializer))
    return out


def _rows(model: str, paths: dict[str, Path], acc: dict[str, float], p50: dict[str, float],
          params: dict[str, int]) -> dict[str, Any]:
    rows = []
    for label in paths:
        speedup = p50["dense"] / p50[label]
        drop = (acc["dense"] - acc[label]) if label in acc else None
        if label == "dense":
            verdict = "baseline"
        elif label.startswith("unstructured"):
            verdict = f"sparsity not exploited by ONNX Runtime CPU kernels ({speedup:.2f}x)"
        elif drop is None:
            verdict = f"{speedup:.2f}x; accuracy not measurable (random weights)"
        elif speedup > 1.0 and drop <= TOLERANCE:
            verdict = f"keep: {speedup:.2f}x within {TOLERANCE:g} point"
        else:
            verdict = f"drop: {speedup:.2f}x, top-1 drop {drop:.2f} points"
        rows.append({"variant": label, "p50_ms": p50[label], "params": params[label],
                     "top1": None if label not in acc else round(acc[label], 2), "verdict": verdict})
    return {"model": model, "rows": rows}


def format_table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<10}{'variant':<18}{'params':>10}{'p50 ms':>10}{'top1':>8}  verdict"]
    for r in results:
        for row in r["rows"]:
            top1 = "" if row["top1"] is None else f"{row['top1']:.2f}"
            lines.append(f"{r['model']:<10}{row['variant']:<18}{row['params']:>10}{row['p50_ms']:>10.3f}{top1:>8}  "
                         f"{row['verdict']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeml.benchmarks.pruning", description=__doc__.splitlines()[0])
    p.add_argument("--ratios", default="0.25,0.5")
    p.add_argument("--models", default="digits,resnet18")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    a = p.parse_args(argv)
    if importlib.util.find_spec("torch_pruning") is None:
        print("error: this script needs torch-pruning (pip install torch-pruning)", file=sys.stderr)
        return 2
    ratios = [float(r) for r in a.ratios.split(",") if r]
    work = a.out / "pruning_work"
    work.mkdir(parents=True, exist_ok=True)
    benches = {"digits": bench_digits, "resnet18": bench_resnet18}
    results = [benches[m](ratios, work) for m in a.models.split(",") if m in benches]
    table = format_table(results)
    print(table)
    (a.out / "pruning-latest.json").write_text(json.dumps({"results": results, "table": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
