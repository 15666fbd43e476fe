"""The quality model of issue 23: a small Llama decoder trained on the Python standard library's own source.

Nothing is downloaded: the text ships with Python. The files are split by a hash of their relative path
(about 1 in 10 held out), so the split is fixed for a given Python and never depends on file order. A byte-level
BPE tokenizer (``tokenizers``) is trained on the training files, then a ``transformers`` ``LlamaForCausalLM``
from a config of a few million parameters, for a fixed number of steps with a fixed seed. The result is saved in
Hugging Face layout (config.json, model.safetensors, tokenizer.json) under a folder named by the content hash of
everything that decides it (corpus bytes, config, steps, seed, library versions), so a second call returns it
without training.

    python -m edgeml.compiler.textgen_train [--preset quality|tiny] [--cache DIR] [--json]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from edgeml.errors import UsageError

# Tests, vendored packages, and generated tables (codec maps, pydoc's topic dump) are left out: tables are so
# repetitive that they lower the training loss without teaching the model Python.
SKIP_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "encodings",
                        "pydoc_data"})
MAX_FILE_BYTES = 200_000
HELDOUT_MODULUS = 10            # a file is held out when sha256(relative path) % 10 == 0
HELDOUT_FILE = "edgeml_heldout.txt"


@dataclass(frozen=True)
class Preset:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    context: int
    steps: int
    batch: int
    seq: int
    lr: float
    corpus_mb: float              # training text used (the first files of the fixed order, by bytes)
    seed: int = 0


PRESETS = {
    # ~4 M parameters; about 5 minutes on two idle cores (15 on a busy machine).
    "quality": Preset(vocab_size=2048, hidden_size=256, intermediate_size=768, layers=4, heads=4, kv_heads=2,
                      context=512, steps=300, batch=12, seq=128, lr=2e-3, corpus_mb=4.0),
    # ~0.1 M parameters; seconds: for tests (still learns enough that perplexity separates from uniform).
    "tiny": Preset(vocab_size=512, hidden_size=64, intermediate_size=128, layers=2, heads=4, kv_heads=2,
                   context=256, steps=60, batch=8, seq=64, lr=5e-3, corpus_mb=0.5),
}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _digest(rel: Path) -> int:
    return int.from_bytes(hashlib.sha256(rel.as_posix().encode()).digest()[:8], "big")


def stdlib_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(train, held-out) .py files of the standard library, each in the order of their path's hash.

    Hash order spreads a byte budget (``corpus_mb``, the eval's first tokens) over the whole library instead of
    its alphabetically first packages; it is fixed for a given set of files.
    """
    root = root or stdlib_root()
    train: list[Path] = []
    heldout: list[Path] = []
    for path in sorted(root.rglob("*.py"), key=lambda p: (_digest(p.relative_to(root)), p.as_posix())):
        rel = path.relative_to(root)
        if SKIP_PARTS & set(rel.parts) or path.stat().st_size > MAX_FILE_BYTES:
            continue
        (heldout if _digest(rel) % HELDOUT_MODULUS == 0 else train).append(path)
    return train, heldout


def read_text(files: list[Path], limit_bytes: int | None = None) -> str:
    parts, total = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if limit_bytes is not None and total >= limit_bytes:
            break
    return "\n".join(parts)


def heldout_text(max_chars: int | None = None) -> str:
    """The held-out evaluation text (the default ``--eval`` of ``compile --task text-generation``)."""
    _, heldout = stdlib_files()
    text = read_text(heldout, max_chars)
    return text if max_chars is None else text[:max_chars]


def default_cache() -> Path:
    return Path(os.environ.get("EDGEML_CACHE", Path.home() / ".cache" / "edgeml")) / "textgen-models"


def _key(preset: Preset, corpus: str) -> str:
    from importlib import metadata

    versions = {p: metadata.version(p) for p in ("torch", "transformers", "tokenizers")}
    blob = json.dumps({"preset": asdict(preset), "versions": versions, "format": 2}, sort_keys=True).encode()
    return hashlib.sha256(blob + hashlib.sha256(corpus.encode()).digest()).hexdigest()[:20]


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return tok


def trained_model(preset: str = "quality", cache: Path | None = None,
                  progress: Callable[[str], None] | None = None) -> Path:
    """The trained model's folder (Hugging Face layout), training it once per content hash."""
    if preset not in PRESETS:
        raise UsageError(f"--preset {preset!r} is not one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    train_files, heldout_files = stdlib_files()
    corpus = read_text(train_files, int(p.corpus_mb * 1e6))
    root = Path(cache) if cache else default_cache()
    final = root / f"{preset}-{_key(p, corpus)}"
    if (final / "model.safetensors").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".train-", dir=root))
    try:
        _train(p, corpus, staging, progress or (lambda m: None))
        (staging / HELDOUT_FILE).write_text(
            "\n".join(f.relative_to(stdlib_root()).as_posix() for f in heldout_files) + "\n")
        try:
            staging.rename(final)
        except OSError:          # another process finished first: keep theirs
            if not (final / "model.safetensors").is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _train(p: Preset, corpus: str, out: Path, progress: Callable[[str], None]) -> None:
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(p.seed)
    t0 = time.perf_counter()
    tok = train_tokenizer(corpus, p.vocab_size)
    ids = np.asarray(tok.encode(corpus).ids, dtype=np.int64)
    progress(f"tokenizer: {tok.get_vocab_size()} tokens, corpus {len(ids)} tokens ({time.perf_counter() - t0:.1f} s)")
    eos = tok.token_to_id("<|endoftext|>")
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=p.hidden_size,
                         intermediate_size=p.intermediate_size, num_hidden_layers=p.layers,
                         num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
                         max_position_embeddings=p.context, bos_token_id=eos, eos_token_id=eos,
                         tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=p.steps, pct_start=0.1)
    gen = np.random.default_rng(p.seed)
    data = torch.from_numpy(ids)
    for step in range(p.steps):
        starts = gen.integers(0, len(ids) - p.seq - 1, size=p.batch)
        batch = torch.stack([data[s:s + p.seq + 1] for s in starts])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == p.steps - 1:
            progress(f"step {step + 1}/{p.steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    (out / "edgeml_training.json").write_text(json.dumps(
        {"preset": asdict(p), "corpus_tokens": int(len(ids)), "final_loss": round(float(loss.item()), 4),
         "seconds": round(time.perf_counter() - t0, 1), "parameters": sum(x.numel() for x in model.parameters())},
        indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="quality", choices=sorted(PRESETS))
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    path = trained_model(args.preset, args.cache, progress=lambda m: print(m, flush=True))
    info: dict[str, Any] = json.loads((path / "edgeml_training.json").read_text())
    print(json.dumps({"model": str(path), **info}) if args.json else f"model: {path}\n{json.dumps(info)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
