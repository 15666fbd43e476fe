"""Text generation on a device: the decoder engine, sampling, stop sequences, and a fair scheduler.

``DecoderEngine`` runs the IR written by ``compiler/textgen_export.py`` (explicit KV cache in and out) on
OpenVINO. ``Generator`` runs many sequences at once on ONE thread: each turn it advances every active sequence
by one step (the prompt's prefill or one new token), so a long answer never starves a short one (round-robin
interleaving), and each sequence's KV cache is reserved up front against a byte budget (prompt + max_tokens
tokens): a request that can never fit is refused, one that does not fit now waits in a bounded queue.

``TextGenModel.open(path)`` verifies the artifact (hashes, signature) like ``edgeml.load`` and reads the
manifest's ``generation`` section (tokenizer member, context, KV bytes per token, budget).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeml.errors import ArtifactError, DataError, ServeError, UsageError

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_WAITING = 64
PREFILL_CHUNK = 64        # a long prompt is prefilled this many tokens per turn, so it never stalls the others long
FINISH_LENGTH, FINISH_STOP, FINISH_CANCELLED, FINISH_ERROR = "length", "stop", "cancelled", "error"


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux keeps that across exec, so a child
    started by a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ov_config(precision: str, threads: int | None) -> dict[str, Any]:
    """OpenVINO CPU settings for a candidate: FP32 math for fp32 and weight-compressed models."""
    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                           "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg


class DecoderEngine:
    """One compiled decoder; ``step`` is not thread-safe (the Generator's thread owns it)."""

    def __init__(self, xml: Path, layers: int, kv_heads: int, head_dim: int, precision: str = "fp32",
                 threads: int | None = None):
        import openvino as ov

        self.compiled = ov.Core().compile_model(str(xml), "CPU", ov_config(precision, threads))
        self.request = self.compiled.create_infer_request()
        self.empty = np.zeros((layers, 1, kv_heads, 0, head_dim), np.float32)

    def step(self, ids: np.ndarray, start: int, keys: np.ndarray | None, values: np.ndarray | None,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits [T, vocab] of ``ids`` at positions start.., and the new KV cache."""
        t = ids.shape[-1]
        out = self.request.infer({
            "input_ids": ids.reshape(1, t).astype(np.int64, copy=False),
            "position_ids": np.arange(start, start + t, dtype=np.int64)[None],
            "past_keys": self.empty if keys is None else keys,
            "past_values": self.empty if values is None else values})
        return out["logits"][0], out["present_keys"], out["present_values"]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits [T, vocab] of one window from an empty cache (perplexity)."""
        return self.step(ids, 0, None, None)[0]


def perplexity(engine: DecoderEngine, tokens: np.ndarray, window: int, max_tokens: int | None = None) -> float:
    """exp(mean next-token cross-entropy) over consecutive non-overlapping windows."""
    tokens = np.asarray(tokens, np.int64)
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start:start + window + 1]
        if len(chunk) < 2:
            break
        logits = engine.logits(chunk[:-1]).astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        nll += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
        count += len(chunk) - 1
    if count == 0:
        raise DataError("the evaluation text is too short to measure perplexity (fewer than 2 tokens)")
    return float(np.exp(nll / count))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0        # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self, max_new: int) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= max_new:
            raise UsageError(f"max_tokens must be an integer from 1 to {max_new}, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise UsageError(f"temperature must be from 0 to 2, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise UsageError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(self.stop)}")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_CHARS:
                raise UsageError(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}")


def choose(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> int:
    if p.temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / p.temperature
    z = np.exp(z - z.max())
    probs = z / z.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs)
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), p.top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(len(probs), p=probs))


@dataclasses.dataclass
class Event:
    """What a sequence reports: new text (possibly empty), and at the end a finish reason."""

    text: str
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Job:
    """One sequence being generated. ``emit`` is called on the generator's thread."""

    def __init__(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None], reserve: int,
                 gone: Callable[[], bool] | None = None):
        self.prompt, self.params, self.emit, self.reserve, self.gone = prompt, params, emit, reserve, gone
        self.cancelled = False
        self.ids: list[int] = []
        self.keys: np.ndarray | None = None
        self.values: np.ndarray | None = None
        self.sent = 0                   # characters of the decoded completion already emitted
        self.rng = np.random.default_rng(params.seed)
        self.created = time.monotonic()
        self.first_token_s: float | None = None
        self.prefilled = 0                      # prompt tokens already in the KV cache
        self.token_times: list[float] = []     # monotonic time of each generated token (TTFT, inter-token)
        self.stop_hit = False

    def cancel(self) -> None:
        self.cancelled = True

    def send(self, event: Event) -> None:
        """Hand an event to the caller; a caller that cannot take it any more cancels the sequence."""
        try:
            self.emit(event)
        except Exception:  # noqa: BLE001 - e.g. the server's loop closed under a shutting-down request
            self.cancelled = True

    def dead(self) -> bool:
        """Cancelled, or its client went away (checked before every step)."""
        if not self.cancelled and self.gone is not None and self.gone():
            self.cancelled = True
        return self.cancelled


class Generator:
    """The scheduler thread of one model: admission by KV bytes, round-robin steps, cancellation."""

    def __init__(self, engine: DecoderEngine, tokenizer: Any, *, context: int, kv_bytes_per_token: int,
                 kv_budget_bytes: int, eos: int | None, max_waiting: int = MAX_WAITING, name: str = "model"):
        self.engine, self.tokenizer, self.context, self.eos = engine, tokenizer, context, eos
        self.kv_bytes_per_token, self.kv_budget_bytes = kv_bytes_per_token, kv_budget_bytes
        self.max_waiting = max_waiting
        self.prefill_chunk = PREFILL_CHUNK
        self.active: list[Job] = []
        self.waiting: collections.deque[Job] = collections.deque()
        self.reserved = 0
        self.cond = threading.Condition()
        self.closed = False
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "refused": 0, "tokens": 0}
        self.thread = threading.Thread(target=self._run, name=f"textgen-{name}", daemon=True)
        self.thread.start()

    # -- admission ------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None],
               gone: Callable[[], bool] | None = None) -> Job:
        if not prompt:
            raise UsageError("the prompt is empty; give at least one character")
        if len(prompt) + params.max_tokens > self.context:
            raise UsageError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) is over the model's "
                             f"context of {self.context} tokens; shorten the prompt or lower max_tokens")
        reserve = (len(prompt) + params.max_tokens) * self.kv_bytes_per_token
        if reserve > self.kv_budget_bytes:
            raise UsageError(f"this request needs {reserve >> 10} KiB of KV cache, over the model's budget of "
                             f"{self.kv_budget_bytes >> 10} KiB; lower max_tokens or shorten the prompt")
        job = Job(prompt, params, emit, reserve, gone)
        with self.cond:
            if self.closed:
                raise ServeError("the model is being unloaded; retry")
            if len(self.waiting) >= self.max_waiting:
                self.stats["refused"] += 1
                raise ServeError(f"{self.max_waiting} generation requests are already waiting for KV-cache "
                                 "memory; retry later")
            self.stats["requests"] += 1
            self.waiting.append(job)
            self.cond.notify()
        return job

    def load(self) -> dict[str, Any]:
        with self.cond:
            return {"active": len(self.active), "waiting": len(self.waiting), "kv_reserved_bytes": self.reserved,
                    "kv_budget_bytes": self.kv_budget_bytes, **self.stats}

    def close(self) -> None:
        with self.cond:
            self.closed = True
            for job in list(self.waiting) + self.active:
                job.cancel()
            self.cond.notify()
        self.thread.join(timeout=30)

    # -- the loop ---------------------------------------------------------------
    def _admit(self) -> None:
        for job in [j for j in self.waiting if j.dead()]:         # gone while waiting: free their places
            self.waiting.remove(job)
            self._finish(job, FINISH_CANCELLED)
        while self.waiting and self.reserved + self.waiting[0].reserve <= self.kv_budget_bytes:
            job = self.waiting.popleft()
            if job.dead():
                self._finish(job, FINISH_CANCELLED)
                continue
            self.reserved += job.reserve
            self.active.append(job)

    def _run(self) -> None:
        while True:
            with self.cond:
                self._admit()
                while not self.active and not self.closed:
                    self.cond.wait(0.5)          # wake to notice waiting clients that went away
                    self._admit()
                if self.closed and not self.active:
                    for job in self.waiting:
                        self._finish(job, FINISH_CANCELLED)
                    self.waiting.clear()
                    return
                turn = list(self.active)
            for job in turn:            # one step each: fair interleaving
                try:
                    finish = FINISH_CANCELLED if job.dead() else self._step(job)
                except Exception as exc:  # noqa: BLE001 - one failing sequence must not stop the others
                    job.send(Event("", FINISH_ERROR, len(job.prompt), len(job.ids), f"{type(exc).__name__}: {exc}"))
                    finish = FINISH_ERROR
                if finish is not None:
                    with self.cond:
                        self.active.remove(job)
                        self.reserved -= job.reserve
                    if finish != FINISH_ERROR:
                        self._finish(job, finish)

    def _finish(self, job: Job, reason: str) -> None:
        key = "cancelled" if reason == FINISH_CANCELLED else "completed"
        self.stats[key] += 1
        job.keys = job.values = None
        job.send(Event(self._flush(job, reason), reason, len(job.prompt), len(job.ids)))

    def _step(self, job: Job) -> str | None:
        if job.prefilled < len(job.prompt):          # the prompt, PREFILL_CHUNK tokens per turn
            start = job.prefilled
            chunk = job.prompt[start:start + self.prefill_chunk]
            logits, job.keys, job.values = self.engine.step(np.asarray(chunk, np.int64), start, job.keys, job.values)
            job.prefilled += len(chunk)
            if job.prefilled < len(job.prompt):
                return None
        else:
            logits, job.keys, job.values = self.engine.step(
                np.asarray(job.ids[-1:], np.int64), len(job.prompt) + len(job.ids) - 1, job.keys, job.values)
        token = choose(logits[-1], job.params, job.rng)
        now = time.monotonic()
        job.token_times.append(now)
        if job.first_token_s is None:
            job.first_token_s = now - job.created
        self.stats["tokens"] += 1
        if token == self.eos:
            return FINISH_STOP
        job.ids.append(token)
        text, stopped = self._visible(job)
        if text:
            job.send(Event(text, None, len(job.prompt), len(job.ids)))
        if stopped:
            return FINISH_STOP
        if len(job.ids) >= job.params.max_tokens:
            return FINISH_LENGTH
        return None

    def _decoded(self, job: Job) -> str:
        return self.tokenizer.decode(job.ids)

    def _visible(self, job: Job) -> tuple[str, bool]:
        """New text safe to send: never half a UTF-8 character, never the start of a stop sequence."""
        text = self._decoded(job)
        stop = job.params.stop
        for s in stop:
            at = text.find(s, max(0, job.sent - len(s)))
            if at >= 0:
                out = text[job.sent:at] if at > job.sent else ""
                job.sent = max(job.sent, at)
                job.stop_hit = True
                return out, True
        end = len(text)
        while end > job.sent and text[end - 1] == "\ufffd":       # an incomplete multi-byte character
            end -= 1
        if stop:
            hold = max(len(s) for s in stop) - 1
            for k in range(min(hold, end - job.sent), 0, -1):       # a suffix that may grow into a stop sequence
                if any(s.startswith(text[end - k:end]) for s in stop):
                    end -= k
                    break
        out = text[job.sent:end]
        job.sent = end
        return out, False

    def _flush(self, job: Job, reason: str) -> str:
        if reason not in (FINISH_LENGTH, FINISH_STOP) or job.stop_hit:
            return ""
        text = self._decoded(job).rstrip("\ufffd")
        out = text[job.sent:]
        job.sent = len(text)
        return out


class TextGenModel:
    """A verified text-generation artifact, its tokenizer and its Generator."""

    def __init__(self, artifact: Any, generation: dict[str, Any], tokenizer: Any, engine: DecoderEngine,
                 kv_budget_mb: float | None = None):
        self.artifact = artifact
        spec = artifact.typed
        self.name, self.version, self.precision = spec.name, spec.version, spec.precision
        self.backend_name = spec.backend.name
        self.generation = generation
        self.tokenizer = tokenizer
        self.context = int(generation["context"])
        self.max_prompt_tokens = int(generation.get("max_prompt_tokens", self.context - 1))
        self.eos = generation.get("eos_token_id")
        budget = float(kv_budget_mb if kv_budget_mb is not None else generation["kv_cache"]["budget_mb"])
        self.generator = Generator(engine, tokenizer, context=self.context,
                                   kv_bytes_per_token=int(generation["kv_cache"]["bytes_per_token"]),
                                   kv_budget_bytes=int(budget * (1 << 20)), eos=self.eos, name=self.name)

    @classmethod
    def open(cls, path: Path, *, trusted_keys: list[Path] | None = None, require_signature: bool | None = None,
             threads: int | None = None, cache_dir: Path | None = None, kv_budget_mb: float | None = None,
             ) -> "TextGenModel":
        from edgeml.runtime.artifact import open_artifact

        artifact = open_artifact(Path(path), trusted_keys=trusted_keys, require_signature=require_signature,
                                 cache_dir=cache_dir)
        try:
            gen = generation_section(artifact.typed.info, str(path))
            try:
                from tokenizers import Tokenizer
            except ImportError:
                from edgeml.errors import MissingDependency

                raise MissingDependency("serving a text-generation artifact needs the 'tokenizers' package",
                                        hint="pip install 'edgeml[textgen]'") from None
            tokenizer = Tokenizer.from_file(str(artifact.member(gen["tokenizer"])))
            shape = gen["shape"]
            engine = DecoderEngine(artifact.entrypoint, shape["layers"], shape["kv_heads"], shape["head_dim"],
                                   artifact.typed.precision, threads)
            model = cls(artifact, gen, tokenizer, engine, kv_budget_mb)
            model.self_test()
            return model
        except BaseException:
            artifact.release()
            raise

    def self_test(self) -> None:
        """Greedy continuation of the manifest's golden prompt must match the compile host's."""
        golden = self.generation.get("selftest")
        if not golden:
            return
        engine = self.generator.engine
        ids = list(golden["prompt_ids"])
        keys = values = None
        out: list[int] = []
        pos, feed = 0, ids
        for _ in range(len(golden["greedy_ids"])):
            logits, keys, values = engine.step(np.asarray(feed, np.int64), pos, keys, values)
            pos += len(feed)
            out.append(int(np.argmax(logits[-1])))
            feed = out[-1:]
        if out != list(golden["greedy_ids"]):
            raise ArtifactError(f"{self.artifact.path}: self-test failed: greedy tokens {out} differ from the "
                                f"compile host's {golden['greedy_ids']}",
                                hint="the device's CPU computes this model differently; recompile for it")

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        if len(ids) > self.max_prompt_tokens:
            raise UsageError(f"the prompt has {len(ids)} tokens; this model takes at most {self.max_prompt_tokens}")
        return list(ids)

    def close(self) -> None:
        self.generator.close()
        self.artifact.release()


def generation_section(info: Any, where: str) -> dict[str, Any]:
    gen = info.get("generation")
    if not isinstance(gen, dict) or info.get("task") != "text-generation":
        raise ArtifactError(f"{where} is not a text-generation artifact (its manifest has no 'generation' section)")
    try:
        int(gen["context"])
        int(gen["kv_cache"]["bytes_per_token"])
        float(gen["kv_cache"]["budget_mb"])
        str(gen["tokenizer"])
        shape = gen["shape"]
        for key in ("layers", "kv_heads", "head_dim"):
            int(shape[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{where}: manifest field 'generation' is missing or has an invalid {exc}") from None
    return gen


def is_text_generation(path: Path) -> bool:
    """Cheap manifest read: does this artifact hold a decoder for text generation?"""
    from edgeml.runtime.artifact import read_manifest

    try:
        return read_manifest(Path(path)).get("task") == "text-generation"
    except Exception:  # noqa: BLE001 - not readable here: let the ordinary loader report it
        return False
