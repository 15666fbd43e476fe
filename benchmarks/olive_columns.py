"""The Olive peer columns of benchmarks/compile_speed.py (main-environment side).

benchmarks/olive_peer.py runs in Olive's own venv and writes Olive's optimized ONNX files; this module
scores each on the eval data (the same metric for edgeml's artifact and Olive's variants), adds every
variant within the tolerance to compile_speed's interleaved runners, and picks Olive's best by the p50
measured in that same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

TOLERANCE = 1.0          # points, like the compiler's default --max-accuracy-drop
OLIVE_TIMEOUT_S = 900
GOAL = 1.2               # edgeml >= 1.2x faster than Olive's best at equal or better accuracy
PEER_SCRIPT = Path(__file__).resolve().parent / "olive_peer.py"
_RUNS: dict[str, dict[str, Any]] = {}   # model name -> Olive's result (a transformer is measured twice)


def check_python(path: Path | None) -> tuple[Path | None, str | None]:
    """(the Olive venv's python, None) or (None, why the columns are skipped)."""
    if path is None:
        return None, "no --olive-python (or EDGEML_OLIVE_PYTHON) given; create a venv with olive-ai (docs/compiler.md)"
    path = Path(path)
    if not (path.is_file() and os.access(path, os.X_OK)):
        return None, f"--olive-python {path} is not an executable file"
    probe = subprocess.run([str(path), "-c", "import olive, onnxruntime; print(olive.__version__)"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return None, f"{path} cannot import olive and onnxruntime: {probe.stderr.strip().splitlines()[-1:]}"
    return path, None


def _run_olive(name: str, onnx_path: Path, calib: Path, work: Path, python: Path, transformer: bool,
               say: Callable[[str], None]) -> dict[str, Any]:
    if name in _RUNS:
        return _RUNS[name]
    out = work / "olive" / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(python), str(PEER_SCRIPT), "--model", str(onnx_path), "--calib", str(calib), "--out", str(out)]
    if transformer:
        cmd.append("--transformer")
    say(f"[{name}] Olive: {' '.join(cmd[2:])}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=OLIVE_TIMEOUT_S)
    report = out / "olive.json"
    if proc.returncode != 0 or not report.is_file():
        _RUNS[name] = {"error": f"olive_peer.py exited {proc.returncode}: {proc.stderr.strip()[-400:]}"}
    else:
        _RUNS[name] = json.loads(report.read_text())
    return _RUNS[name]


def _first_output(run: Callable[[dict[str, np.ndarray]], Any], eval_inputs: dict[str, np.ndarray]) -> np.ndarray:
    n = len(next(iter(eval_inputs.values())))
    rows = []
    for i in range(n):   # the reference models are exported at batch 1
        out = run({k: v[i: i + 1] for k, v in eval_inputs.items()})
        rows.append(np.asarray(out[0] if isinstance(out, (list, tuple)) else next(iter(out.values()))))
    return np.concatenate(rows)


def score(out: np.ndarray, ref: np.ndarray, labels: np.ndarray | None, encoder: bool) -> tuple[str, float]:
    """(metric, points): top-1 vs labels, else argmax agreement with ORT FP32; encoders: mean cosine x 100."""
    if encoder:
        a, b = out.reshape(len(out), -1), ref.reshape(len(ref), -1)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-24)
        return "cosine x100", float(cos.mean() * 100.0)
    if labels is not None:
        return "top1", float((out.argmax(-1) == labels).mean() * 100.0)
    return "fp32_agreement", float((out.argmax(-1) == ref.argmax(-1)).mean() * 100.0)


def _scores(name: str, sess: Any, model: Any, eval_file: Path, encoder: bool,
            olive: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    data = np.load(eval_file)
    inputs = {i.name: data[i.name] for i in sess.get_inputs()}
    labels = data["labels"] if "labels" in data.files else None
    ref = _first_output(_session_runner(sess), inputs)
    metric, fp32 = score(ref, ref, labels, encoder)
    edgeml = score(_first_output(model.predict, inputs), ref, labels, encoder)[1]
    scored: dict[str, Any] = {"metric": metric, "fp32": round(fp32, 3), "edgeml": round(edgeml, 3), "variants": {}}
    for variant, info in olive.items():
        if not isinstance(info, dict):
            continue
        if "error" in info:
            scored["variants"][variant] = {"status": "failed", "error": info["error"]}
            continue
        so = ort.SessionOptions()
        so.log_severity_level = 3
        vsess = ort.InferenceSession(info["model"], so, providers=["CPUExecutionProvider"])
        value = score(_first_output(_session_runner(vsess), inputs), ref, labels, encoder)[1]
        ok = fp32 - value <= TOLERANCE + 1e-9
        scored["variants"][variant] = {"status": "passed" if ok else "rejected", "accuracy": round(value, 3),
                                       "passes": info.get("passes"), "olive_seconds": info.get("seconds"),
                                       "session": vsess}
    return scored


def _session_runner(sess: Any) -> Callable[[dict[str, np.ndarray]], Any]:
    return lambda feeds: sess.run(None, feeds)


def _bound_runner(sess: Any, feeds: dict[str, np.ndarray]) -> Callable[[], Any]:
    return lambda: sess.run(None, feeds)


def prepare(name: str, onnx_path: Path, data: dict[str, Path], work: Path, python: Path, sess: Any, model: Any,
            feeds: dict[str, np.ndarray], runners: dict[str, Callable[[], Any]],
            say: Callable[[str], None]) -> dict[str, Any]:
    """Run Olive, score its variants, and add the passing ones to ``runners`` as ``olive:<variant>``."""
    from edgeml.benchmarks import models

    encoder = name in models.TRANSFORMERS
    olive = _run_olive(name, onnx_path, data["calib"], work, python, encoder, say)
    if "error" in olive:
        return {"error": olive["error"]}
    scored = _scores(name, sess, model, data["eval"], encoder, olive)
    for variant, info in scored["variants"].items():
        vsess = info.pop("session", None)
        if info["status"] == "passed" and vsess is not None:
            runners[f"olive:{variant}"] = _bound_runner(vsess, feeds)
    scored["olive_version"] = olive.get("olive_version")
    return scored


def finish(info: dict[str, Any], p50: dict[str, float]) -> None:
    """Olive's best = its fastest passing variant in this run; edgeml's speed-up over it."""
    timed = {k.split(":", 1)[1]: v for k, v in p50.items() if k.startswith("olive:")}
    for variant, value in timed.items():
        info["variants"][variant]["p50_ms"] = value
    if not timed:
        info["best"] = None
        return
    best = min(timed, key=lambda k: timed[k])
    info["best"] = best
    info["best_p50_ms"] = timed[best]
    info["best_accuracy"] = info["variants"][best]["accuracy"]
    info["speedup_edgeml_vs_olive"] = round(timed[best] / p50["edgeml"], 3)


def format_lines(entries: list[dict[str, Any]]) -> list[str]:
    rows = [e for e in entries if "olive" in e and "error" not in e]
    if not rows:
        return []
    head = (f"{'model':<14}{'olive best':<20}{'olive ms':>10}{'edgeml ms':>10}{'x olive':>9}"
            f"{'metric':>16}{'fp32':>8}{'olive':>8}{'edgeml':>8}  verdict")
    lines = ["", "edgeml vs Olive's best CPU optimization (same run; acc on the eval file, batch 1)", head,
             "-" * len(head)]
    met = []
    for e in rows:
        o = e["olive"]
        if "error" in o or not o.get("best"):
            why = o.get("error") or "; ".join(f"{k}: {v.get('status')} {v.get('accuracy', v.get('error', ''))}"
                                              for k, v in o.get("variants", {}).items())
            lines.append(f"{e['model']:<14}no Olive variant measured: {str(why)[:120]}")
            continue
        x = o["speedup_edgeml_vs_olive"]
        acc_ok = o["edgeml"] >= o["best_accuracy"] - 1e-9
        verdict = "met" if x >= GOAL and acc_ok else ("NOT met" + ("" if acc_ok else " (edgeml less accurate)"))
        met.append(verdict == "met")
        lines.append(f"{e['model']:<14}{o['best']:<20}{o['best_p50_ms']:>10.3f}{e['p50_ms']['edgeml']:>10.3f}"
                     f"{x:>9.2f}{o['metric']:>16}{o['fp32']:>8.2f}{o['best_accuracy']:>8.2f}{o['edgeml']:>8.2f}"
                     f"  {verdict}")
        others = [f"{k} {v['status']} acc {v.get('accuracy', '-')}" + (f" p50 {v['p50_ms']:.3f}" if "p50_ms" in v else "")
                  for k, v in o["variants"].items() if k != o["best"]]
        if others:
            lines.append(f"{'':<14}other Olive variants: {'; '.join(others)}")
    lines.append(f"goal edgeml >= {GOAL}x Olive's best at equal or better accuracy: "
                 f"{sum(met)}/{len(rows)} models")
    return lines


if __name__ == "__main__":  # pragma: no cover
    print(check_python(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
