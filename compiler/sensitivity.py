"""Rank nodes by how much quantization hurts them (for accuracy-aware int8).

The FP32 model and its QDQ twin share tensor names. For a tensor ``T`` of the
FP32 model, what the QDQ model's consumers see is ``DequantizeLinear(
QuantizeLinear(T))`` (or ``T`` itself when it is not quantized); exposing both
sides as graph outputs lets us compare them on a few calibration samples. A
node's loss is the drop in signal-to-quantization-noise ratio (dB) from its
worst input to its output: error the node *adds*, not error it inherits. A
Relu/Clip folded into the quantization by the QDQ quantizer is treated as part
of the node before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# Ops whose quantization an exclusion can undo (weights or requantized arithmetic).
RANKED_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Concat", "AveragePool",
              "GlobalAveragePool", "Resize", "Sigmoid", "Softmax"}
FOLDED_ACTIVATIONS = {"Relu", "Clip"}
CLEAN_DB = 200.0


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = float(np.sum((ref - got.astype(np.float64)) ** 2))
    if noise <= 0.0:
        return CLEAN_DB
    return float(10.0 * np.log10(max(float(np.sum(ref ** 2)), 1e-30) / noise))


def _seen_by_consumers(model) -> dict[str, str]:
    """FP32 tensor name -> the QDQ model tensor its consumers read (the DequantizeLinear output)."""
    q_of = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    dq_of = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {t: dq_of[q] for t, q in q_of.items() if q in dq_of}


def _run(model, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    import onnx
    import onnxruntime as ort

    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    names = sorted({n for n in names if n in produced})
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for name, value in zip(names, sess.run(names, feed)):
            parts[name].append(np.asarray(value).reshape(-1))
    return {n: np.concatenate(v) for n, v in parts.items() if v}


def rank_nodes(fp32_path: Path, qdq_path: Path, calib: dict[str, np.ndarray], samples: int = 16) -> list[dict[str, Any]]:
    """Nodes of ``fp32_path`` sorted by SQNR loss, worst first: ``[{node, op, loss_db, sqnr_db}]``."""
    import onnx

    fp32 = onnx.load(str(fp32_path))
    qdq = onnx.load(str(qdq_path))
    init = {t.name for t in fp32.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in fp32.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def effective_output(node) -> str:
        out = node.output[0]
        after = consumers.get(out, [])
        if len(after) == 1 and after[0].op_type in FOLDED_ACTIVATIONS:
            return after[0].output[0]
        return out

    nodes = [n for n in fp32.graph.node if n.op_type in RANKED_OPS and n.name]
    tensors = {effective_output(n) for n in nodes} | {i for n in nodes for i in n.input if i and i not in init}
    seen = _seen_by_consumers(qdq)
    count = min(samples, len(next(iter(calib.values()))))
    feeds = [{k: np.ascontiguousarray(v[i:i + 1]) for k, v in calib.items()} for i in range(count)]
    ref = _run(fp32, list(tensors), feeds)
    got = _run(qdq, [seen.get(t, t) for t in tensors], feeds)
    sqnr = {}
    for t in tensors:
        if t in ref and seen.get(t, t) in got and ref[t].shape == got[seen.get(t, t)].shape:
            sqnr[t] = _sqnr_db(ref[t], got[seen.get(t, t)])
    ranked = []
    for node in nodes:
        out = effective_output(node)
        ins = [sqnr[i] for i in node.input if i and i not in init and i in sqnr]
        if out not in sqnr or not ins:
            continue
        ranked.append({"node": node.name, "op": node.op_type, "sqnr_db": round(sqnr[out], 2),
                       "loss_db": round(max(0.0, min(ins) - sqnr[out]), 2)})
    ranked.sort(key=lambda r: (-r["loss_db"], r["sqnr_db"], r["node"]))
    return ranked
