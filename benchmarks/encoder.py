"""BERT-class text encoders with random weights, built from Hugging Face ``transformers`` configs kept here.

No download: the configs below are the ``config.json`` fields of the architectures (MiniLM-L6's shape for
``bert-mini``, a two-layer toy for ``bert-tiny``, which tests use); the weights come from
``BertModel``'s own initializer under a fixed seed. The exported model is what sentence encoders ship:
inputs ``input_ids`` and ``attention_mask`` (int64, ``[batch, sequence]``, both axes dynamic), output
``sentence_embedding`` ``[batch, hidden]``, the attention-mask-weighted mean of the last hidden state.

Data: seeded token ids (uniform over the vocabulary, never the pad id 0) with a per-sample length between
half and all of ``seq_len``; the rest is padding (``attention_mask`` 0). Meaningless as text, fine for
calibration ranges, speed and agreement with FP32 (the metric is cosine similarity, chosen from the
output's name).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.errors import MissingDependency, UsageError

SEED = 1234
OPSET = 17
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "sentence_embedding"
_COMMON: dict[str, Any] = {"model_type": "bert", "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                           "attention_probs_dropout_prob": 0.1, "type_vocab_size": 2, "initializer_range": 0.02,
                           "layer_norm_eps": 1e-12, "pad_token_id": 0, "position_embedding_type": "absolute"}
CONFIGS: dict[str, dict[str, Any]] = {
    # sentence-transformers/all-MiniLM-L6-v2's architecture (22 M parameters)
    "bert-mini": {**_COMMON, "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
                  "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512},
    # a toy of the same shape family, for tests (~0.3 M parameters)
    "bert-tiny": {**_COMMON, "vocab_size": 1024, "hidden_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "intermediate_size": 256, "max_position_embeddings": 128},
}
DEFAULT_SEQ_LEN = {"bert-mini": 32, "bert-tiny": 16}


def _check(name: str) -> None:
    if name not in CONFIGS:
        raise UsageError(f"unknown encoder {name!r}", hint=f"choose one of {', '.join(CONFIGS)}")


def build(name: str):
    """The encoder as a torch module (eval mode, eager attention so the ONNX export is plain ops)."""
    _check(name)
    try:
        import torch
        from transformers import BertConfig, BertModel
    except ImportError as exc:
        raise MissingDependency("the transformer reference models need torch and transformers",
                                hint="pip install transformers") from exc

    config = BertConfig.from_dict(dict(CONFIGS[name]))
    config._attn_implementation = "eager"
    torch.manual_seed(SEED)
    bert = BertModel(config, add_pooling_layer=False).eval()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, input_ids, attention_mask):
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    return SentenceEncoder(bert).eval()


def export_onnx(name: str, path: str | Path) -> Path:
    """Write the encoder as ONNX (opset 17) with dynamic batch and sequence axes."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build(name)
    seq = DEFAULT_SEQ_LEN[name]
    dummy = (torch.ones((1, seq), dtype=torch.int64), torch.ones((1, seq), dtype=torch.int64))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            OUTPUT: {0: "batch"}}
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, dummy, str(tmp), dynamo=False, opset_version=OPSET, input_names=list(INPUTS),
                          output_names=[OUTPUT], dynamic_axes=axes, do_constant_folding=True)
    import onnx

    proto = onnx.load(str(tmp))
    # What ONNX Runtime's transformer optimizer needs to fuse Attention (it cannot always infer them).
    for key in ("num_attention_heads", "hidden_size"):
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                            key: str(CONFIGS[name][key])})
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return path


def tokens(name: str, n: int, seq_len: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """``n`` seeded samples of ``seq_len`` tokens, each padded after a random length in [seq_len/2, seq_len]."""
    _check(name)
    rng = np.random.default_rng(seed)
    vocab = int(CONFIGS[name]["vocab_size"])
    ids = rng.integers(1, vocab, size=(n, seq_len), dtype=np.int64)
    lengths = rng.integers(max(1, seq_len // 2), seq_len + 1, size=n)
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def data(name: str, n_calib: int = 64, n_eval: int = 64,
         seq_len: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(calibration, eval) token batches from different seeds (no labels: the metric is cosine)."""
    seq = seq_len or DEFAULT_SEQ_LEN.get(name, 32)
    return tokens(name, n_calib, seq, SEED), tokens(name, n_eval, seq, SEED + 1)
