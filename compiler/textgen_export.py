"""Export a Hugging Face Llama checkpoint to an OpenVINO IR decoder with an explicit KV cache.

The graph is written here from the checkpoint's weights (embedding, RMSNorm, rotary attention with grouped
KV heads, SwiGLU MLP): it does not trace ``transformers`` internals, whose cache objects change between
releases. ``tests/textgen`` checks its logits against ``LlamaForCausalLM`` on the same weights.

Inputs and outputs of the IR (B = 1, P = past tokens, T = new tokens, L layers, H KV heads, D head size)::

    input_ids     int64   [1, T]
    position_ids  int64   [1, T]             P .. P+T-1
    past_keys     float32 [L, 1, H, P, D]    (P = 0: an empty cache)
    past_values   float32 [L, 1, H, P, D]
    -> logits     float32 [1, T, vocab]
    -> present_keys / present_values  [L, 1, H, P+T, D]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeml.errors import ModelError, UsageError

INPUTS = ("input_ids", "position_ids", "past_keys", "past_values")
OUTPUTS = ("logits", "present_keys", "present_values")


@dataclass(frozen=True)
class DecoderShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    rope_theta: float
    rms_eps: float
    eos_token_id: int | None

    @property
    def kv_bytes_per_token(self) -> int:
        """FP32 keys + values of one token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 4

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"kv_bytes_per_token": self.kv_bytes_per_token}


def read_shape(model_dir: Path) -> DecoderShape:
    """Read and check config.json: a Llama-architecture decoder this exporter writes faithfully."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{model_dir} has no config.json; give a Hugging Face model folder "
                         "(config.json, model.safetensors, tokenizer.json)") from None
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path} is not a JSON object")
    arch = cfg.get("model_type")
    if arch not in ("llama",):
        raise ModelError(f"{path}: model_type {arch!r} is not supported for --task text-generation; "
                         "this edgeml exports Llama-architecture decoders (model_type 'llama')")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ModelError(f"{path}: rope type {rope.get('rope_type')!r} is not supported (only the default rotary "
                         "embedding)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ModelError(f"{path}: attention_bias / mlp_bias are not supported by this exporter")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        return DecoderShape(
            vocab_size=int(cfg["vocab_size"]), hidden_size=hidden, intermediate_size=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            context=int(cfg.get("max_position_embeddings", 2048)),
            rope_theta=float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            eos_token_id=eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: missing or invalid field {exc}") from None


def load_weights(model_dir: Path, shape: DecoderShape) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UsageError(f"{model_dir} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if "lm_head.weight" not in state:                       # tied embeddings
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    need = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        need += [p + n for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                 "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")]
    missing = [n for n in need if n not in state]
    if missing:
        raise ModelError(f"{model_dir}: the weights lack {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return {n: state[n].float() for n in need}


def decoder_module(shape: DecoderShape, weights: dict[str, Any]):
    """A torch module computing the IR's function from the weights (traceable: no Python-side shapes)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.ParameterDict({n.replace(".", "__"): nn.Parameter(t, requires_grad=False)
                                       for n, t in weights.items()})
            inv = 1.0 / (shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float32) / shape.head_dim))
            self.register_buffer("inv_freq", inv, persistent=False)

        def p(self, name: str) -> torch.Tensor:
            return self.w[name.replace(".", "__")]

        def rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
            var = x.pow(2).mean(-1, keepdim=True)
            return x * torch.rsqrt(var + shape.rms_eps) * self.p(name)

        def forward(self, input_ids, position_ids, past_keys, past_values):
            s = shape
            x = F.embedding(input_ids, self.p("model.embed_tokens.weight"))           # [1, T, C]
            freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq          # [1, T, D/2]
            emb = torch.cat([freqs, freqs], dim=-1)[:, None]                            # [1, 1, T, D]
            cos, sin = emb.cos(), emb.sin()
            # key index 0..P+T-1 without Python ints (stays dynamic in the trace)
            total = torch.cat([past_keys[0, 0, 0, :, 0], torch.zeros_like(position_ids[0], dtype=torch.float32)])
            key_index = torch.cumsum(torch.ones_like(total), 0) - 1.0                   # [P+T]
            masked = key_index[None, None, None, :] > position_ids.to(torch.float32)[:, None, :, None]
            bias = torch.where(masked, torch.tensor(-1e9), torch.tensor(0.0))           # [1, 1, T, P+T]
            group = s.heads // s.kv_heads
            keys, values = [], []

            def rot(t: torch.Tensor) -> torch.Tensor:
                half = t.shape[-1] // 2
                return torch.cat([-t[..., half:], t[..., :half]], dim=-1)

            for i in range(s.layers):
                pre = f"model.layers.{i}."
                h = self.rms(x, pre + "input_layernorm.weight")
                q = F.linear(h, self.p(pre + "self_attn.q_proj.weight")).unflatten(-1, (s.heads, s.head_dim)).transpose(1, 2)
                k = F.linear(h, self.p(pre + "self_attn.k_proj.weight")).unflatten(-1, (s.kv_heads, s.head_dim)).transpose(1, 2)
                v = F.linear(h, self.p(pre + "self_attn.v_proj.weight")).unflatten(-1, (s.kv_heads, s.head_dim)).transpose(1, 2)
                q = q * cos + rot(q) * sin
                k = k * cos + rot(k) * sin
                k = torch.cat([past_keys[i], k], dim=2)                                 # [1, H, P+T, D]
                v = torch.cat([past_values[i], v], dim=2)
                keys.append(k)
                values.append(v)
                if group > 1:
                    k = k.repeat_interleave(group, dim=1)
                    v = v.repeat_interleave(group, dim=1)
                att = torch.matmul(q, k.transpose(-1, -2)) * (s.head_dim ** -0.5) + bias
                o = torch.matmul(att.softmax(-1), v).transpose(1, 2).flatten(2)
                x = x + F.linear(o, self.p(pre + "self_attn.o_proj.weight"))
                h = self.rms(x, pre + "post_attention_layernorm.weight")
                m = F.silu(F.linear(h, self.p(pre + "mlp.gate_proj.weight"))) * F.linear(h, self.p(pre + "mlp.up_proj.weight"))
                x = x + F.linear(m, self.p(pre + "mlp.down_proj.weight"))
            logits = F.linear(self.rms(x, "model.norm.weight"), self.p("lm_head.weight"))
            return logits, torch.stack(keys), torch.stack(values)

    return Decoder().eval()


def example_inputs(shape: DecoderShape, past: int = 3, new: int = 2) -> tuple[Any, ...]:
    import torch

    kv = (shape.layers, 1, shape.kv_heads, past, shape.head_dim)
    return (torch.arange(new, dtype=torch.int64)[None] + 1, torch.arange(past, past + new, dtype=torch.int64)[None],
            torch.zeros(kv), torch.zeros(kv))


def export_openvino(model_dir: Path, out_xml: Path) -> DecoderShape:
    """Write the FP32 IR (``out_xml`` + .bin); returns the decoder's shape."""
    import openvino as ov
    import torch

    shape = read_shape(model_dir)
    module = decoder_module(shape, load_weights(model_dir, shape))
    L, H, D = shape.layers, shape.kv_heads, shape.head_dim
    with torch.no_grad():
        ov_model = ov.convert_model(module, example_input=example_inputs(shape), input=[
            ("input_ids", ov.PartialShape([1, -1]), ov.Type.i64),
            ("position_ids", ov.PartialShape([1, -1]), ov.Type.i64),
            ("past_keys", ov.PartialShape([L, 1, H, -1, D]), ov.Type.f32),
            ("past_values", ov.PartialShape([L, 1, H, -1, D]), ov.Type.f32)])
    for port, name in zip(ov_model.inputs, INPUTS):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, OUTPUTS):
        port.get_tensor().set_names({name})
    save_ir(ov_model, out_xml)
    return shape


def save_ir(model: Any, out_xml: Path) -> None:
    """Save FP32 IR that depends only on the model: OpenVINO's process-wide name counters renumbered
    (the OpenVINO backend's ``_normalize``), the model named ``decoder``."""
    import openvino as ov

    from edgeml.backends.openvino.build import _normalize

    _normalize(model)
    for i, (result, port) in enumerate(zip(model.get_results(), model.outputs)):   # Results keep counter names
        names = sorted(port.get_names())
        result.set_friendly_name(f"result_{names[0] if names else i}")
    model.set_friendly_name("decoder")
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out_xml), compress_to_fp16=False)
