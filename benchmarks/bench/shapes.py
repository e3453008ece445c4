"""Benchmarked model shapes, the model-FLOPs formula behind MFU, and accelerator datasheet peaks."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxalign.models import flops
from jaxalign.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model architecture plus the batch it is benchmarked on (batch rows × seq tokens)."""

    name: str
    layers: int
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int  # rows per step: sequences for SFT; 2 × pairs for DPO (chosen + rejected rows)
    seq: int
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "minimal"  # the config default
    torch_checkpointing: bool = False  # PyTorch's only policy: recompute every layer (gradient_checkpointing)
    tied: bool = False
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def hf_config(self) -> dict[str, Any]:
        return {"model_type": "llama", "vocab_size": self.vocab, "hidden_size": self.hidden,
                "intermediate_size": self.mlp, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "head_dim": self.head_dim, "max_position_embeddings": max(self.seq, 2048),
                "rms_norm_eps": 1e-5, "rope_theta": self.rope_theta, "tie_word_embeddings": self.tied,
                "hidden_act": "silu"}


SHAPES = {
    "tiny": Shape("tiny", layers=2, hidden=64, mlp=176, heads=4, kv_heads=2, vocab=512, batch=4, seq=64),
    "cpu-60m": Shape("cpu-60m", layers=8, hidden=512, mlp=1408, heads=8, kv_heads=8, vocab=32000, batch=4,
                     seq=512),
    # Llama 3.2 1B (16 layers, GQA 32/8 heads, 128k vocab, tied head): bf16 compute, fp32 master weights.
    "llama-3.2-1b": Shape("llama-3.2-1b", layers=16, hidden=2048, mlp=8192, heads=32, kv_heads=8, vocab=128256,
                          batch=8, seq=2048, dtype="bfloat16", param_dtype="float32", remat="minimal", tied=True,
                          rope_theta=500000.0, torch_checkpointing=True),
}


def model_config(s: Shape) -> ModelConfig:
    return ModelConfig.from_hf_dict(s.hf_config(), source=f"shape {s.name}")


def matmul_params(s: Shape) -> int:
    """N of the 6·N rule (jaxalign.models.flops.matmul_params)."""
    return flops.matmul_params(model_config(s))


def model_flops(s: Shape, rows: int | None = None, seq: int | None = None, live_reference: bool = False) -> float:
    """Model FLOPs of one training step over `rows` × `seq` tokens, as jaxalign.models.flops counts them:
    6·N·tokens + 12·L·(H·d)·T²·B / 2 (causal attention counted once), + 2·N·tokens + 4·L·(H·d)·T²·B / 2
    for a live DPO reference."""
    rows = s.batch if rows is None else rows
    seq = s.seq if seq is None else seq
    return flops.train_step_flops(model_config(s), rows, seq, live_reference)["total"]


# Dense datasheet peaks (FLOP/s) by device kind substring and compute dtype; CPU peaks are measured.
DATASHEET_PEAK = {
    ("H100", "bfloat16"): 989e12, ("H100", "float32"): 67e12,  # SXM: dense BF16 tensor core; FP32 non-tensor
    ("H200", "bfloat16"): 989e12, ("H200", "float32"): 67e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 19.5e12,
    ("TPU v4", "bfloat16"): 275e12, ("TPU v5 lite", "bfloat16"): 197e12, ("TPU v5p", "bfloat16"): 459e12,
    ("TPU v6", "bfloat16"): 918e12,
}


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
    for (kind, dt), peak in DATASHEET_PEAK.items():
        if kind.lower() in device_kind.lower() and dt == dtype:
            return peak
    return None
