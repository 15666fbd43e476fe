"""Generation speed and memory side by side, in one interleaved run: edgeml's OpenVINO candidates vs torch eager.

    python -m edgeml.benchmarks.generate [--shape quality|0.5b] [--prompt-tokens 64] [--new-tokens 64] [--rounds 3]

Each system runs in its own fresh process per round (so its peak RSS is its own), rounds interleaved
(A B C D, A B C D, ...): torch eager FP32 (``transformers`` ``LlamaForCausalLM`` with its KV cache, greedy), and
the edgeml IR at FP32, INT8 weights and INT4 (asymmetric, group 128) weights, greedy, plus edgeml's Generator
with 4 sequences at once (round-robin; aggregate tokens/s). Reported per system: time to first token
(prefill), inter-token latency p50/p99, decode tokens/s, peak RSS; ratios against torch eager.

``--shape quality``: the trained quality model (``textgen_train``). ``--shape 0.5b``: the same architecture at
a 0.5 B-class shape (Qwen2.5-0.5B's: hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocab 151936, tied
embeddings) with random weights: speed and memory only. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPE_05B: dict[str, Any] = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)


def random_model_dir(out: Path) -> Path:
    """A 0.5 B-class Llama checkpoint with random weights (seed 0), cached in ``out``."""
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE_05B, rms_norm_eps=1e-6)).eval()
    tmp = Path(tempfile.mkdtemp(prefix=".random-", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out)
    return out


def build_irs(model_dir: Path, work: Path) -> dict[str, Path]:
    from edgeml.compiler.textgen import Candidate, compress, group_size_for
    from edgeml.compiler.textgen_export import export_openvino, read_shape

    fp32 = work / "fp32" / "model.xml"
    if not fp32.is_file():
        export_openvino(model_dir, fp32)
    g = group_size_for(read_shape(model_dir))
    out = {"edgeml-fp32": fp32}
    for label, mode, group in (("edgeml-int8", "int8_asym", None), (f"edgeml-int4-asym-g{g}", "int4_asym", g)):
        xml = work / label / "model.xml"
        if not xml.is_file():
            compress(fp32, Candidate(label, "int8" if group is None else "int4", mode, group), xml)
        out[label] = xml
    return out


# -- the measuring child ------------------------------------------------------------------------------------
def _child(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from edgeml.runtime.textgen import peak_rss_mb

    rng = np.random.default_rng(0)
    prompt = rng.integers(5, min(1000, job["vocab"]), size=job["prompt_tokens"]).astype(np.int64)
    n = job["new_tokens"]
    itl: list[float] = []
    if job["system"] == "torch-eager-fp32":
        import torch
        from transformers import LlamaForCausalLM

        torch.set_num_threads(job["threads"])
        model = LlamaForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
        with torch.no_grad():
            model(torch.from_numpy(prompt[:4])[None])                        # warm-up
            t0 = time.perf_counter()
            out = model(torch.from_numpy(prompt)[None], use_cache=True)
            ttft = time.perf_counter() - t0
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            for _ in range(n):
                t1 = time.perf_counter()
                out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
                itl.append(time.perf_counter() - t1)
        tps = n / sum(itl)
    else:
        from edgeml.runtime.textgen import DecoderEngine, Generator, SamplingParams

        s = job["shape"]
        engine = DecoderEngine(Path(job["xml"]), s["layers"], s["kv_heads"], s["head_dim"], "fp32", job["threads"])
        engine.step(prompt[:4], 0, None, None)
        if job.get("concurrency", 1) > 1:
            import threading

            class _Ids:                     # the Generator decodes text; ids are enough here
                def decode(self, ids: list[int]) -> str:
                    return ""

            c = job["concurrency"]
            gen = Generator(engine, _Ids(), context=s["context"], kv_bytes_per_token=s["kv_bytes_per_token"],
                            kv_budget_bytes=1 << 40, eos=None)
            done = threading.Semaphore(0)
            firsts: list[float] = []
            t0 = time.perf_counter()

            def emit(ev: Any) -> None:
                if ev.finish is not None:
                    done.release()

            jobs = [gen.submit(list(prompt), SamplingParams(max_tokens=n), emit) for _ in range(c)]
            for _ in range(c):
                done.acquire()
            wall = time.perf_counter() - t0
            firsts = [j.first_token_s or 0.0 for j in jobs]
            gen.close()
            ttft, tps = max(firsts), c * n / wall
        else:
            t0 = time.perf_counter()
            logits, keys, values = engine.step(prompt, 0, None, None)
            ttft = time.perf_counter() - t0
            token, pos = int(np.argmax(logits[-1])), len(prompt)
            for _ in range(n):
                t1 = time.perf_counter()
                logits, keys, values = engine.step(np.asarray([token], np.int64), pos, keys, values)
                token, pos = int(np.argmax(logits[-1])), pos + 1
                itl.append(time.perf_counter() - t1)
            tps = n / sum(itl)
    ms = sorted(x * 1000 for x in itl)
    return {"ttft_ms": ttft * 1000, "itl_p50_ms": ms[len(ms) // 2] if ms else None,
            "itl_p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))] if ms else None,
            "tokens_per_s": tps, "peak_rss_mb": peak_rss_mb()}


def run_child(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "edgeml.benchmarks.generate", "--child", json.dumps(job)],
                          capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"{job['system']} failed: {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_artifact(path: Path, *, prompt_tokens: int = 64, new_tokens: int = 64, concurrency: tuple[int, ...] = (1, 4),
                   repeats: int = 3, threads: int | None = None, seed: int = 0, trusted_keys: list[Path] | None = None,
                   progress: Any = None) -> dict[str, Any]:
    """``edgeml bench ARTIFACT --scenario generate``: TTFT and inter-token p50/p99, tokens/s at each concurrency,
    peak RSS; random prompt ids (seeded), greedy, EOS ignored so every sequence has ``new_tokens`` tokens."""
    import numpy as np

    from edgeml.errors import UsageError
    from edgeml.runtime.textgen import SamplingParams, TextGenModel, is_text_generation, peak_rss_mb

    if not is_text_generation(path):
        raise UsageError(f"{path} is not a text-generation artifact; --scenario generate needs one "
                         "(edgeml compile MODEL_DIR --task text-generation)")
    for name, v in (("--prompt-tokens", prompt_tokens), ("--new-tokens", new_tokens), ("--repeats", repeats)):
        if v < 1:
            raise UsageError(f"{name} must be at least 1, got {v}")
    t0 = time.perf_counter()
    model = TextGenModel.open(path, trusted_keys=trusted_keys, threads=threads)
    load_s = time.perf_counter() - t0
    say = progress or (lambda m: None)
    try:
        if prompt_tokens + new_tokens > model.context:
            raise UsageError(f"--prompt-tokens + --new-tokens = {prompt_tokens + new_tokens} is over the model's "
                             f"context of {model.context}")
        gen = model.generator
        gen.eos = None
        need = max(concurrency) * (prompt_tokens + new_tokens) * gen.kv_bytes_per_token
        if need > gen.kv_budget_bytes:      # the bench runs its sequences at once, not queued
            gen.kv_budget_bytes = need
        rng = np.random.default_rng(seed)
        vocab = int(model.generation["shape"]["vocab_size"])
        out: dict[str, Any] = {}
        for c in concurrency:
            ttft: list[float] = []
            itl: list[float] = []
            rates: list[float] = []
            for r in range(repeats):
                import threading

                done = threading.Semaphore(0)

                def emit(ev: Any, done: threading.Semaphore = done) -> None:
                    if ev.finish is not None:
                        done.release()

                start = time.perf_counter()
                jobs = [gen.submit(rng.integers(5, min(vocab, 1000), size=prompt_tokens).tolist(),
                                   SamplingParams(max_tokens=new_tokens), emit) for _ in range(c)]
                for _ in jobs:
                    done.acquire()
                wall = time.perf_counter() - start
                for j in jobs:
                    ttft.append((j.first_token_s or 0.0) * 1000)
                    itl += [(b - a) * 1000 for a, b in zip(j.token_times, j.token_times[1:])]
                rates.append(sum(len(j.token_times) for j in jobs) / wall)
                say(f"concurrency {c}, repeat {r + 1}/{repeats}: {rates[-1]:.1f} tokens/s")
            out[str(c)] = {"ttft_ms": _pcts(ttft), "inter_token_ms": _pcts(itl),
                           "tokens_per_s": float(np.median(rates)), "tokens_per_s_runs": [round(x, 2) for x in rates]}
        return {"scenario": "generate", "model": {"name": model.name, "version": model.version,
                                                 "precision": model.precision, "path": str(path)},
                "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats, "load_s": load_s,
                "concurrency": out, "peak_rss_mb": round(peak_rss_mb(), 1), "cpu": cpu_line()}
    finally:
        model.close()


def _pcts(values: list[float]) -> dict[str, float | None]:
    import numpy as np

    if not values:
        return {"p50": None, "p99": None}
    return {"p50": round(float(np.percentile(values, 50)), 3), "p99": round(float(np.percentile(values, 99)), 3)}


def render_bench(result: dict[str, Any]) -> str:
    m = result["model"]
    lines = [f"{m['name']} [{m['precision']}] generate: prompt {result['prompt_tokens']}, {result['new_tokens']} new "
             f"tokens, greedy, median of {result['repeats']} repeats; {result['cpu']}"]
    for c, r in result["concurrency"].items():
        lines.append(f"  concurrency {c}: {r['tokens_per_s']:.1f} tokens/s; TTFT p50 {r['ttft_ms']['p50']} ms "
                     f"p99 {r['ttft_ms']['p99']} ms; inter-token p50 {r['inter_token_ms']['p50']} ms "
                     f"p99 {r['inter_token_ms']['p99']} ms")
    lines.append(f"  peak RSS {result['peak_rss_mb']} MiB; load {result['load_s']:.2f} s")
    return "\n".join(lines)


def cpu_line() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return f"{model}; avx512f={'avx512f' in flags.split()}; {os.cpu_count()} logical CPUs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="quality", choices=["tiny", "quality", "0.5b"])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, help="keep the IRs here between runs (default: a temp folder)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    from edgeml.compiler.textgen_export import read_shape
    from edgeml.compiler.textgen_train import default_cache, trained_model

    t0 = time.perf_counter()
    model_dir = trained_model(args.shape) if args.shape != "0.5b" else random_model_dir(default_cache() / "random-0.5b")
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeml-genbench-"))
    try:
        irs = build_irs(model_dir, work)
        shape = read_shape(model_dir).to_dict()
        print(f"# built in {time.perf_counter() - t0:.0f} s: {model_dir.name} ({args.shape}); {cpu_line()}", flush=True)
        systems: list[tuple[str, dict[str, Any]]] = [("torch-eager-fp32", {"model_dir": str(model_dir)})]
        systems += [(label, {"xml": str(xml), "shape": shape}) for label, xml in irs.items()]
        int4 = [label for label in irs if "int4" in label][0]
        systems.append((f"{int4} x4 concurrent", {"xml": str(irs[int4]), "shape": shape, "concurrency": 4}))
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in systems}
        for r in range(args.rounds):
            for name, extra in systems:
                job = {"system": name, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                       "threads": args.threads, "vocab": shape["vocab_size"], **extra}
                results[name].append(run_child(job, 900))
            print(f"# round {r + 1}/{args.rounds} done", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = {name: _median(rows) for name, rows in results.items()}
    base = summary["torch-eager-fp32"]
    rows = [("system", "TTFT ms", "ITL p50 ms", "ITL p99 ms", "tok/s", "x torch", "peak RSS MB", "x torch RSS")]
    for name, s in summary.items():
        rows.append((name, f"{s['ttft_ms']:.1f}", _f(s["itl_p50_ms"]), _f(s["itl_p99_ms"]), f"{s['tokens_per_s']:.1f}",
                     f"{s['tokens_per_s'] / base['tokens_per_s']:.2f}", f"{s['peak_rss_mb']:.0f}",
                     f"{s['peak_rss_mb'] / base['peak_rss_mb']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"shape {args.shape}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, "
          f"{args.threads} threads, median of {args.rounds} interleaved rounds")
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if args.json:
        print(json.dumps({"shape": args.shape, "cpu": cpu_line(), "summary": summary, "rounds": results}))
    return 0


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import statistics

    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
