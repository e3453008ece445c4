"""Model FLOPs of a training step: the numerator of MFU, for `plan`, the benchmarks and the training log.

N = the weights that take part in matmuls (every layer projection and the LM head; the input
embedding is a lookup, norms and biases are not matmuls); tokens = rows x T of the padded batch:

    policy forward + backward   6 * N * tokens
    attention (QK^T and PV)     12 * L * H * D * T * tokens / 2   (2 matmuls x 2 FLOPs x 3 for fwd+bwd;
                                                                   the causal half only, as MaxText counts)
    live DPO reference forward  2 * N * tokens + 4 * L * H * D * T * tokens / 2

A DPO or KTO batch runs the LM head (e * vocab of N) at its loss positions only (`loss_index`): those
are the head's tokens there. Recomputation under remat is hardware work, not model FLOPs.
"""

from __future__ import annotations

from jaxalign.models.config import ModelConfig


def matmul_params(mc: ModelConfig) -> int:
    """N of the 6N rule: q, k, v, o, gate, up, down of every layer, and the LM head (tied or not); a reward
    model's score head is read at one token per row, so it counts as nothing."""
    e, d = mc.hidden_size, mc.head_dim
    attn = 2 * e * mc.num_attention_heads * d + 2 * e * mc.num_key_value_heads * d
    return mc.num_hidden_layers * (attn + 3 * e * mc.intermediate_size) + (0 if mc.num_labels else e * mc.vocab_size)


def attention_flops(mc: ModelConfig, rows: int, length: int) -> float:
    """Forward FLOPs of QK^T and PV over `rows` causal rows of `length` tokens."""
    return 4.0 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * length * length * rows / 2


def train_step_flops(mc: ModelConfig, rows: int, length: int, live_reference: bool = False,
                     head_positions: int | None = None) -> dict[str, float]:
    """{"policy", "attention", "reference" (a live DPO reference only), "total"} for one optimizer step;
    `head_positions`: where the LM head runs when not at every token (a preference batch's `loss_index`)."""
    tokens = rows * length
    head = 0 if mc.num_labels else mc.hidden_size * mc.vocab_size
    per_step = (matmul_params(mc) - head) * tokens + head * (tokens if head_positions is None else head_positions)
    attn = attention_flops(mc, rows, length)
    out = {"policy": 6.0 * per_step, "attention": 3.0 * attn}
    if live_reference:
        out["reference"] = 2.0 * per_step + attn
    out["total"] = sum(out.values())
    return out
