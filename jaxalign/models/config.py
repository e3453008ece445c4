"""The architecture description of a Llama-family decoder, read from and written to HF `config.json`.

One dataclass covers Llama 2/3/3.1/3.2, Mistral and Qwen2/2.5: they differ only in biases, RoPE
scaling, tied embeddings and the sliding window, which are fields here.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from jaxalign.errors import JaxalignError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF `rope_scaling` / `rope_parameters` minus rope_theta, as sorted (key, value) pairs so the
    # config stays hashable (it is static data of the jit-compiled model), e.g. (("factor", 8.0), ...).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2, or Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias only
    sliding_window: int | None = None  # Mistral v0.1: each token sees the last `sliding_window` tokens
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # 0: a causal LM (lm_head). 1: a reward model (HF *ForSequenceClassification, num_labels 1): a scalar
    # `score` head read at each sequence's last token that is not pad_token_id, as transformers reads it.
    num_labels: int = 0

    @property
    def num_params(self) -> int:
        """Parameter count, as transformers' `num_parameters()` reports it."""
        e, m, h, kv, d = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                          self.num_key_value_heads, self.head_dim)
        attn = e * h * d * 2 + e * kv * d * 2
        attn += (h * d + 2 * kv * d) if self.qkv_bias else 0
        attn += e if self.o_bias else 0
        per_layer = attn + 3 * e * m + 2 * e
        head = self.num_labels * e if self.num_labels else 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_hidden_layers * per_layer + e + head

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # --- HF config.json <-> ModelConfig -------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config") -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise JaxalignError(
                f"{source}: model_type {model_type!r} is not supported; supported model types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise JaxalignError(f"{source}: hidden_act {act!r} is not supported (only 'silu', SwiGLU)")
        if hf.get("mlp_bias"):
            raise JaxalignError(f"{source}: mlp_bias=true is not supported")
        try:
            hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            rope_theta, rope_scaling = _rope_from_hf(hf)
            attention_bias = bool(hf.get("attention_bias", False))
            return cls(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type == "qwen2")),
                qkv_bias=model_type == "qwen2" or attention_bias,
                o_bias=model_type == "llama" and attention_bias,
                sliding_window=_sliding_window_from_hf(hf, model_type, source),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=_hashable(hf.get("eos_token_id")),
                pad_token_id=hf.get("pad_token_id"),
                initializer_range=float(hf.get("initializer_range", 0.02)),
                num_labels=_num_labels_from_hf(hf, source),
            )
        except KeyError as e:
            raise JaxalignError(f"{source}: required key {e.args[0]!r} is missing") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` transformers reads back into an equivalent model."""
        rope_parameters = {"rope_type": "default", **dict(self.rope_scaling or ()), "rope_theta": self.rope_theta}
        hf: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type].replace("CausalLM", "SequenceClassification")
                              if self.num_labels else _ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
        }
        if self.rope_scaling:
            hf["rope_scaling"] = rope_parameters
        if self.num_labels:
            hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            hf["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        if self.model_type == "llama":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = False
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            hf["use_sliding_window"] = False
            hf["sliding_window"] = None
        return hf

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope_scaling"] = tuple(sorted(d["rope_scaling"].items())) if d.get("rope_scaling") else None
        d["eos_token_id"] = _hashable(d.get("eos_token_id"))
        return cls(**d)


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _num_labels_from_hf(hf: dict[str, Any], source: str) -> int:
    """0 for a causal LM; 1 for a sequence-classification model with one label (a reward model)."""
    if not any(str(a).endswith("ForSequenceClassification") for a in hf.get("architectures") or ()):
        return 0
    n = int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)  # transformers' default is 2
    if n != 1:
        raise JaxalignError(f"{source}: a sequence-classification model with {n} labels; only reward models "
                            "(num_labels 1, one scalar score) are supported")
    return n


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, tuple | None]:
    """transformers 4.x writes `rope_theta` + `rope_scaling`; 5.x writes `rope_parameters`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise JaxalignError(f"rope type {rope_type!r} is not supported (supported: default, llama3)")
    params.pop("type", None)
    params["rope_type"] = "llama3"
    return theta, tuple(sorted(params.items()))


def _sliding_window_from_hf(hf: dict[str, Any], model_type: str, source: str) -> int | None:
    if model_type == "mistral":
        return hf.get("sliding_window")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise JaxalignError(f"{source}: qwen2 with use_sliding_window=true is not supported")
    return None


def load_hf_config(model_dir: str | pathlib.Path) -> ModelConfig:
    path = pathlib.Path(model_dir) / "config.json"
    if not path.is_file():
        raise JaxalignError(f"no config.json in {model_dir}: expected a Hugging Face model directory")
    return ModelConfig.from_hf_dict(json.loads(path.read_text()), source=str(path))
