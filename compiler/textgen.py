"""``edgeml compile MODEL_DIR --task text-generation``: a Hugging Face Llama decoder -> a signed .edgepkg.

Steps: export the FP32 OpenVINO IR with an explicit KV cache (``textgen_export``); build the precision
candidates (FP32; BF16 where the target and this host have it; INT8 weights per channel; INT4 weights in
groups, symmetric and asymmetric, by NNCF ``compress_weights``); judge each by held-out perplexity against
FP32 (``max_perplexity_increase`` percent, default 5); measure each in its own process (decode tokens/s,
time to first token, peak RSS), interleaved; select the fastest passing candidate (within 5 % of the
fastest, the one with the smallest weights); write the artifact with the tokenizer inside, the KV-cache
budget, a greedy self-test and every candidate's evidence in the manifest.

The held-out text is ``eval`` (a UTF-8 text file, or a folder of ``*.py``/``*.txt`` files) or, by default,
the held-out files of the Python standard library (``textgen_train``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeml.errors import CompileError, UsageError

DEFAULT_MAX_PERPLEXITY_INCREASE = 5.0      # percent of the FP32 perplexity
DEFAULT_EVAL_TOKENS = 8192
DEFAULT_KV_SEQUENCES = 4                   # the default KV budget holds this many full-context sequences
SPEED_TIE = 0.05                           # candidates within 5 % of the fastest are a tie: smallest wins
PRECISION_CHOICES = ("auto", "fp32", "bf16", "int8", "int4")
CALIB_WINDOWS, CALIB_LENGTH = 32, 128      # data-aware INT4: 32 windows of 128 tokens of calibration text


@dataclass
class Candidate:
    label: str
    precision: str                  # manifest precision: fp32 | bf16 | int8 | int4
    mode: str | None                # NNCF CompressWeightsMode value, None = not compressed
    group_size: int | None = None
    data_aware: bool = False        # AWQ + scale estimation on calibration text
    xml: Path | None = None
    status: str = "pending"         # passed | rejected | failed
    reason: str | None = None
    perplexity: float | None = None
    increase_pct: float | None = None
    weights_bytes: int | None = None
    measures: list[dict[str, float]] = field(default_factory=list)
    selected: bool = False

    def best(self, key: str) -> float | None:
        values = [m[key] for m in self.measures if key in m]
        if not values:
            return None
        return max(values) if key == "decode_tokens_per_s" else min(values)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "precision": self.precision, "weight_compression": self.mode,
                "group_size": self.group_size, "data_aware": self.data_aware, "status": self.status, "reason": self.reason,
                "perplexity": _round(self.perplexity), "perplexity_increase_pct": _round(self.increase_pct),
                "weights_bytes": self.weights_bytes, "decode_tokens_per_s": _round(self.best("decode_tokens_per_s")),
                "ttft_ms": _round(self.best("ttft_ms")), "peak_rss_mb": _round(self.best("peak_rss_mb")),
                "selected": self.selected}


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


@dataclass
class TextGenResult:
    path: Path
    manifest: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {"output": str(self.path), "task": "text-generation", "name": m["name"], "version": m["version"],
                "target": m["target"], "precision": m["precision"], "backend": m["backend"],
                "candidates": m["candidates"], "selection": m["selection"], "quality": m["quality"],
                "generation": {k: v for k, v in m["generation"].items() if k != "selftest"},
                "seconds": round(self.seconds, 1)}


def group_size_for(shape: Any, wanted: int = 128) -> int:
    """The largest power of two <= wanted dividing every matmul's input channels (NNCF's group rule)."""
    dims = (shape.hidden_size, shape.intermediate_size, shape.heads * shape.head_dim)
    g = wanted
    while g > 8 and any(d % g for d in dims):
        g //= 2
    return g


def candidates_for(precision: str, target: Any, group: int) -> list[Candidate]:
    from edgeml.targets import host_features

    if precision not in PRECISION_CHOICES:
        raise UsageError(f"--precision {precision!r} is not one of {list(PRECISION_CHOICES)} for text generation")
    out = [Candidate("openvino/fp32", "fp32", None)]
    bf16_ok = "bf16" in target.precisions and {"avx512_bf16", "amx_bf16"} & host_features()
    if precision in ("auto", "bf16") and bf16_ok:
        out.append(Candidate("openvino/bf16", "bf16", None))
    if precision in ("auto", "int8"):
        out.append(Candidate("openvino/int8-weights", "int8", "int8_asym"))
    if precision in ("auto", "int4"):
        out.append(Candidate(f"openvino/int4-sym-g{group}", "int4", "int4_sym", group))
        out.append(Candidate(f"openvino/int4-asym-g{group}", "int4", "int4_asym", group))
        out.append(Candidate(f"openvino/int4-asym-awq-g{group}", "int4", "int4_asym", group, data_aware=True))
    if precision == "bf16" and not bf16_ok:
        raise UsageError(f"--precision bf16: target {target.name} or this host has no BF16 hardware")
    return out


def eval_text(eval_path: Path | None, max_chars: int, option: str = "--eval") -> tuple[str, str]:
    """(text, description) of the held-out evaluation text."""
    if eval_path is None:
        from edgeml.compiler.textgen_train import heldout_text

        return heldout_text(max_chars), "python-stdlib-heldout"
    path = Path(eval_path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".py", ".txt", ".md") and p.is_file())
        from edgeml.compiler.textgen_train import read_text

        return read_text(files, max_chars)[:max_chars], str(path)
    try:
        return path.read_text(encoding="utf-8")[:max_chars], str(path)
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: no such file; give a UTF-8 text file or a folder of text files") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{option} {path} is not UTF-8 text (byte {exc.start}); give a UTF-8 text file") from None


def calibration_items(tokens: list[int], shape: Any, windows: int = CALIB_WINDOWS, length: int = CALIB_LENGTH,
                      ) -> list[dict[str, Any]]:
    """Model inputs for NNCF's data-aware compression: consecutive windows from an empty KV cache."""
    import numpy as np

    empty = np.zeros((shape.layers, 1, shape.kv_heads, 0, shape.head_dim), np.float32)
    length = min(length, shape.context)
    return [{"input_ids": np.asarray(tokens[i * length:(i + 1) * length], np.int64)[None],
             "position_ids": np.arange(length, dtype=np.int64)[None], "past_keys": empty, "past_values": empty}
            for i in range(min(windows, len(tokens) // length))]


def calib_text(calib: Path | None, max_chars: int) -> tuple[str, str]:
    """(text, description) for data-aware INT4: ``calib`` or the standard library's *training* files."""
    if calib is None:
        from edgeml.compiler.textgen_train import read_text, stdlib_files

        return read_text(stdlib_files()[0], max_chars)[:max_chars], "python-stdlib-train"
    return eval_text(calib, max_chars, "--calib")


def compress(fp32_xml: Path, cand: Candidate, out_xml: Path, calib: list[dict[str, Any]] | None = None) -> None:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32_xml))
    kwargs: dict[str, Any] = {"mode": nncf.CompressWeightsMode(cand.mode)}
    if cand.group_size:
        kwargs.update(group_size=cand.group_size, ratio=1.0)
    if cand.data_aware:
        if not calib:
            raise CompileError(f"{cand.label} needs calibration text (--calib) and none was long enough")
        kwargs.update(dataset=nncf.Dataset(calib), awq=True, scale_estimation=True, subset_size=len(calib))
    compressed = nncf.compress_weights(model, **kwargs)
    from edgeml.compiler.textgen_export import save_ir

    save_ir(compressed, out_xml)


def measure_in_subprocess(cand: Candidate, shape: Any, prompt: list[int], new_tokens: int,
                          threads: int | None, timeout_s: float = 300) -> dict[str, float]:
    """Load + prefill + greedy decode in a fresh process: its peak RSS is the candidate's alone."""
    job = {"xml": str(cand.xml), "precision": cand.precision, "layers": shape.layers, "kv_heads": shape.kv_heads,
           "head_dim": shape.head_dim, "prompt": prompt, "new_tokens": new_tokens, "threads": threads}
    try:
        proc = subprocess.run([sys.executable, "-m", "edgeml.compiler.textgen", "measure", json.dumps(job)],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise CompileError(f"measuring {cand.label} took over {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise CompileError(f"measuring {cand.label} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure_main(job: dict[str, Any]) -> dict[str, float]:
    import numpy as np

    from edgeml.runtime.textgen import DecoderEngine, peak_rss_mb

    t0 = time.perf_counter()
    engine = DecoderEngine(Path(job["xml"]), job["layers"], job["kv_heads"], job["head_dim"], job["precision"],
                           job["threads"])
    load_s = time.perf_counter() - t0
    prompt = np.asarray(job["prompt"], np.int64)
    engine.step(prompt[:4], 0, None, None)                    # warm-up (first-inference allocations)
    t1 = time.perf_counter()
    logits, keys, values = engine.step(prompt, 0, None, None)
    ttft = time.perf_counter() - t1
    token, pos = int(np.argmax(logits[-1])), len(prompt)
    t2 = time.perf_counter()
    for _ in range(job["new_tokens"]):
        logits, keys, values = engine.step(np.asarray([token], np.int64), pos, keys, values)
        token, pos = int(np.argmax(logits[-1])), pos + 1
    decode = time.perf_counter() - t2
    return {"decode_tokens_per_s": job["new_tokens"] / decode, "ttft_ms": ttft * 1000, "load_s": load_s,
            "peak_rss_mb": peak_rss_mb()}


def _golden(xml: Path, precision: str, shape: Any, prompt: list[int], n: int) -> list[int]:
    import numpy as np

    from edgeml.runtime.textgen import DecoderEngine

    engine = DecoderEngine(xml, shape.layers, shape.kv_heads, shape.head_dim, precision)
    out: list[int] = []
    keys = values = None
    pos, feed = 0, prompt
    for _ in range(n):
        logits, keys, values = engine.step(np.asarray(feed, np.int64), pos, keys, values)
        pos += len(feed)
        out.append(int(np.argmax(logits[-1])))
        feed = out[-1:]
    return out


def compile_text_generation(
    model_dir: Any, *, target: str, output: Any, precision: str = "auto", eval: Any = None,  # noqa: A002
    calib: Any = None,
    max_perplexity_increase: float = DEFAULT_MAX_PERPLEXITY_INCREASE, eval_tokens: int = DEFAULT_EVAL_TOKENS,
    kv_budget_mb: float | None = None, name: str | None = None, version: str = "0.1.0", sign_key: Any = None,
    benchmark: bool = True, measure_rounds: int = 2, new_tokens: int = 64, threads: int | None = None,
    progress: Callable[[str], None] | None = None, **unused: Any,
) -> TextGenResult:
    from edgeml.compiler.manifest import created_timestamp, host_info, source_date_epoch, tool_versions
    from edgeml.compiler.textgen_export import export_openvino, read_shape
    from edgeml.runtime.artifact import write_artifact
    from edgeml.runtime.textgen import DecoderEngine, perplexity
    from edgeml.targets import get_target

    say = progress or (lambda m: None)
    ignored = sorted(k for k, v in unused.items() if v not in (None, False, "", (), [], "auto", 1.0, "0.1.0"))
    if ignored:
        raise UsageError(f"option(s) {ignored} do not apply to --task text-generation")
    t_start = time.perf_counter()
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UsageError(f"{model_dir} is not a folder; --task text-generation takes a Hugging Face model folder "
                         "(config.json, *.safetensors, tokenizer.json)")
    if not math.isfinite(max_perplexity_increase) or max_perplexity_increase < 0:
        raise UsageError(f"--max-perplexity-increase must be a percentage >= 0, got {max_perplexity_increase}")
    if eval_tokens < 64:
        raise UsageError(f"--eval-tokens must be at least 64, got {eval_tokens}")
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise UsageError(f"{model_dir} has no tokenizer.json (a `tokenizers` fast tokenizer); the artifact "
                         "carries it so a device can encode prompts")
    tgt = get_target(target)
    if "openvino" not in tgt.backends:
        raise UsageError(f"target {tgt.name} does not list the openvino backend, the one text generation uses")
    output = Path(output)
    shape = read_shape(model_dir)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tok_file))
    text, eval_name = eval_text(eval, eval_tokens * 16)
    tokens = tokenizer.encode(text).ids[: eval_tokens + 1]
    if len(tokens) < 65:
        raise UsageError(f"the evaluation text {eval_name} has {len(tokens)} tokens; give at least 65")
    window = min(shape.context, 256)
    group = group_size_for(shape)
    cands = candidates_for(precision, tgt, group)
    calib_items: list[dict[str, Any]] | None = None
    calib_name = None
    work = Path(tempfile.mkdtemp(prefix="edgeml-textgen-"))
    try:
        say(f"export {model_dir} to OpenVINO IR ({shape.layers} layers, context {shape.context})")
        fp32_xml = work / "fp32" / "model.xml"
        export_openvino(model_dir, fp32_xml)
        for c in cands:
            try:
                if c.mode is None:
                    c.xml = fp32_xml
                else:
                    say(f"{c.label}: NNCF compress_weights({c.mode}{f', group {c.group_size}' if c.group_size else ''})")
                    c.xml = work / c.label.replace("/", "_") / "model.xml"
                    if c.data_aware and calib_items is None:
                        ctext, calib_name = calib_text(Path(calib) if calib else None, CALIB_WINDOWS * CALIB_LENGTH * 16)
                        calib_items = calibration_items(tokenizer.encode(ctext).ids, shape)
                    compress(fp32_xml, c, c.xml, calib_items)
                c.weights_bytes = c.xml.with_suffix(".bin").stat().st_size
                engine = DecoderEngine(c.xml, shape.layers, shape.kv_heads, shape.head_dim, c.precision, threads)
                c.perplexity = perplexity(engine, tokens, window)
                del engine
            except Exception as exc:  # noqa: BLE001 - one candidate failing leaves the others
                c.status, c.reason = "failed", f"{type(exc).__name__}: {str(exc)[:300]}"
                say(f"{c.label}: failed: {c.reason}")
        ref = cands[0]
        if ref.perplexity is None:
            raise CompileError(f"the FP32 reference could not be evaluated: {ref.reason}")
        for c in cands:
            if c.perplexity is None:
                continue
            c.increase_pct = (c.perplexity / ref.perplexity - 1.0) * 100.0
            if c.increase_pct <= max_perplexity_increase:
                c.status = "passed"
            else:
                c.status, c.reason = "rejected", (f"perplexity {c.perplexity:.3f} is {c.increase_pct:+.2f} % over "
                                                  f"FP32's {ref.perplexity:.3f} (max {max_perplexity_increase:g} %)")
            say(f"{c.label}: perplexity {c.perplexity:.3f} ({c.increase_pct:+.2f} %), {c.status}")
        passed = [c for c in cands if c.status == "passed"]
        prompt = tokens[:32]
        if benchmark:
            for r in range(max(1, measure_rounds)):                # interleaved rounds: A B C, A B C
                for c in passed:
                    c.measures.append(measure_in_subprocess(c, shape, prompt, new_tokens, threads))
                say(f"measure round {r + 1}: " + ", ".join(
                    f"{c.label} {c.measures[-1]['decode_tokens_per_s']:.0f} tok/s" for c in passed))
            fastest = max(c.best("decode_tokens_per_s") or 0.0 for c in passed)
            ties = [c for c in passed if (c.best("decode_tokens_per_s") or 0.0) >= (1 - SPEED_TIE) * fastest]
            chosen = min(ties, key=lambda c: (c.weights_bytes or 0))
            how = {"method": "measured", "reason": f"fastest decode (ties within {SPEED_TIE:.0%}: smallest weights)"}
        else:
            chosen = min(passed, key=lambda c: (c.weights_bytes or 0))
            how = {"method": "static", "reason": "smallest weights among the passing candidates (not measured)"}
        chosen.selected = True
        assert chosen.xml is not None
        say(f"selected {chosen.label}")
        budget = kv_budget_mb if kv_budget_mb is not None else (
            DEFAULT_KV_SEQUENCES * shape.context * shape.kv_bytes_per_token / (1 << 20))
        if budget <= 0 or budget * (1 << 20) < shape.kv_bytes_per_token * 2:
            raise UsageError(f"--kv-budget-mb {budget} cannot hold even a two-token sequence "
                             f"({shape.kv_bytes_per_token} bytes per token)")
        golden_prompt = tokens[:8]
        golden = _golden(chosen.xml, chosen.precision, shape, golden_prompt, 8)
        manifest = _manifest(model_dir, tgt, shape, chosen, cands, how, name, version, budget, eval_name,
                             len(tokens) - 1, max_perplexity_increase, golden_prompt, golden)
        manifest["quality"]["calibration"] = calib_name if chosen.data_aware else None
        epoch = source_date_epoch()
        if epoch is not None:      # reproducible: timings are measurements, written as null (compiler/manifest.py)
            for row in manifest["candidates"]:
                row.update(decode_tokens_per_s=None, ttft_ms=None, peak_rss_mb=None)
        manifest["provenance"] = {"created": created_timestamp(epoch), "tools": tool_versions(),
                                  "host": host_info(), "source": model_dir.name}
        files: dict[str, Path | bytes] = {"model/model.xml": chosen.xml, "model/model.bin": chosen.xml.with_suffix(".bin"),
                                          "tokenizer/tokenizer.json": tok_file}
        if (model_dir / "tokenizer_config.json").is_file():
            files["tokenizer/tokenizer_config.json"] = model_dir / "tokenizer_config.json"
        write_artifact(output, manifest, files, sign_key=Path(sign_key) if sign_key else None)
        say(f"wrote {output}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return TextGenResult(output, manifest, time.perf_counter() - t_start)


def _manifest(model_dir: Path, tgt: Any, shape: Any, chosen: Candidate, cands: list[Candidate], how: dict[str, str],
              name: str | None, version: str, budget_mb: float, eval_name: str, eval_tokens: int,
              max_increase: float, golden_prompt: list[int], golden: list[int]) -> dict[str, Any]:
    from importlib import metadata

    L, H, D = shape.layers, shape.kv_heads, shape.head_dim
    kv = [L, 1, H, None, D]
    ref = cands[0]
    return {
        "name": name or model_dir.name, "version": version, "target": tgt.name, "arch": tgt.arch,
        "device": tgt.device, "required_features": list(tgt.required_features),
        "backend": {"name": "openvino", "version": metadata.version("openvino"), "entrypoint": "model/model.xml",
                    "options": {}},
        "precision": chosen.precision,
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [1, None]},
                   {"name": "position_ids", "dtype": "int64", "shape": [1, None]},
                   {"name": "past_keys", "dtype": "float32", "shape": kv},
                   {"name": "past_values", "dtype": "float32", "shape": kv}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, None, shape.vocab_size]},
                    {"name": "present_keys", "dtype": "float32", "shape": kv},
                    {"name": "present_values", "dtype": "float32", "shape": kv}],
        "runtime": {"threads": None, "deterministic": False},
        "task": "text-generation",
        "generation": {
            "tokenizer": "tokenizer/tokenizer.json", "context": shape.context, "max_prompt_tokens": shape.context - 1,
            "eos_token_id": shape.eos_token_id, "shape": shape.to_dict(),
            "kv_cache": {"bytes_per_token": shape.kv_bytes_per_token, "budget_mb": round(budget_mb, 4),
                         "sequences_at_full_context": int(budget_mb * (1 << 20) // (shape.kv_bytes_per_token * shape.context))},
            "weight_compression": {"mode": chosen.mode, "group_size": chosen.group_size,
                                   "data_aware": chosen.data_aware},
            "selftest": {"prompt_ids": golden_prompt, "greedy_ids": golden},
        },
        "quality": {"metric": "perplexity", "data": eval_name, "tokens": eval_tokens,
                    "fp32": _round(ref.perplexity), "compiled": _round(chosen.perplexity),
                    "increase_pct": _round(chosen.increase_pct), "max_increase_pct": max_increase},
        "candidates": [c.to_dict() for c in cands],
        "selection": {"label": chosen.label, **how},
    }


def render(report: dict[str, Any]) -> str:
    rows = [("", "candidate", "status", "ppl", "+%", "tok/s", "ttft ms", "RSS MB", "weights MB", "reason")]
    for c in report["candidates"]:
        def f(v: Any, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)
        rows.append((">" if c["selected"] else "", c["label"], c["status"], f(c["perplexity"], ".3f"),
                     f(c["perplexity_increase_pct"], "+.2f"), f(c["decode_tokens_per_s"], ".0f"), f(c["ttft_ms"], ".1f"),
                     f(c["peak_rss_mb"], ".0f"), f(None if c["weights_bytes"] is None else c["weights_bytes"] / 1e6, ".2f"),
                     (c["reason"] or "")[:70]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    q, g = report["quality"], report["generation"]
    lines += ["", f"selected: {report['selection']['label']} ({report['selection']['reason']})",
              f"perplexity on {q['tokens']} tokens of {q['data']}: fp32 {q['fp32']}  compiled {q['compiled']} "
              f"({q['increase_pct']:+.2f} %, max {q['max_increase_pct']:g} %)",
              f"KV cache: {g['kv_cache']['bytes_per_token']} bytes/token, budget {g['kv_cache']['budget_mb']} MiB "
              f"({g['kv_cache']['sequences_at_full_context']} sequences of {g['context']} tokens)",
              f"wrote {report['output']}  ({report['name']} {report['version']}, target {report['target']}, "
              f"{report['seconds']} s)"]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - the measuring child process
    if len(sys.argv) == 3 and sys.argv[1] == "measure":
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        print(json.dumps(_measure_main(json.loads(sys.argv[2]))))
        raise SystemExit(0)
    raise SystemExit("usage: python -m edgeml.compiler.textgen measure JOB_JSON")
