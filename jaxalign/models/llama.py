"""The Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2) as a Flax NNX module.

Layer weights are stacked on a leading "layers" axis and the layer body is one pure function run
under `jax.lax.scan`, so the program compiles the body once whatever the depth. Every parameter
carries logical axis names; `jaxalign.runtime.sharding` maps them onto the mesh.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.errors import JaxalignError
from jaxalign.models import attention as attn, quant
from jaxalign.models.config import ModelConfig
from jaxalign.models.dots import flat_dot
from jaxalign.models.lora import LoraInputs, delta, dropped
from jaxalign.models.params import params_of
from jaxalign.models.rope import apply_rope, inverse_frequencies, rope_tables
from jaxalign.runtime.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class KVCache(NamedTuple):
    """Keys and values of every layer for decoding: k, v [layers, batch, max_len, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array  # [batch, max_len]; 0 marks empty slots and padding
    index: jax.Array  # int32 scalar: the row index the next token is written at


def last_hidden(hidden: jax.Array, real: jax.Array) -> jax.Array:
    """hidden [batch, length, embed] at each row's last position where `real` [batch, length] holds."""
    last = jnp.argmax(jnp.where(real, jnp.arange(real.shape[1]), -1), axis=1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """As transformers: normalise in fp32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


class Decoder(nnx.Module):
    """tokens [batch, length] -> logits [batch, length, vocab] (fp32)."""

    def __init__(self, cfg: ModelConfig, *, dtype: str = "float32", param_dtype: str = "float32",
                 remat: str = "minimal", attention: str = "auto", scan_layers: bool = True, attention_block: int = 512,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = DTYPES[dtype]
        self.remat = remat
        self.attention_impl = attention
        self.attention_block = attention_block  # the splash kernel's query and key blocks
        attn.announce(attention)
        self.scan_layers = scan_layers
        pdt = DTYPES[param_dtype]
        normal = nnx.initializers.normal(cfg.initializer_range)

        # One row per weight (models/params.py), made in table order.
        init = {"normal": lambda shape: normal(rngs.params(), shape, pdt), "ones": lambda shape: jnp.ones(shape, pdt),
                "zeros": lambda shape: jnp.zeros(shape, pdt)}
        made = {p.path: nnx.Param(init[p.init](p.full_shape(cfg)), out_sharding=p.full_axes()) for p in params_of(cfg)}
        self.embed = made[("embed",)]
        self.layers = nnx.Dict({path[1]: v for path, v in made.items() if path[0] == "layers"})
        self.final_norm = made[("final_norm",)]
        if ("lm_head",) in made:
            self.lm_head = made[("lm_head",)]
        if ("score",) in made:
            self.score = made[("score",)]

    # --- forward ----------------------------------------------------------------------------

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden_states(tokens, positions, segment_ids)[0])

    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None, cache: KVCache | None = None,
                      lora: LoraInputs | None = None,
                      branch_ids: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states [batch, length, embed], and the updated cache when given one.

        `positions` default to 0..length-1 and `segment_ids` to all ones (one sequence per row);
        packed rows give each sequence its own segment id and positions restarting at 0. `lora`:
        low-rank adapters applied on top of the (frozen) weights (models/lora.py). `branch_ids`:
        shared-prompt DPO rows (models/attention.py), without a cache.
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        x = jnp.take(self.embed.get_value().astype(self.dtype), tokens, axis=0)
        x = constrain(x, ("batch", "length", "act_embed"))
        inv_freq = inverse_frequencies(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        cos, sin = rope_tables(positions, inv_freq, self.dtype)
        if branch_ids is not None:
            attn.note_shared_prompt_mask(self.attention_impl)
        if cache is None and branch_ids is None and attn.resolve(self.attention_impl) == "splash":
            mask = attn.SegmentMask(segment_ids, self.cfg.sliding_window, self.attention_block)
            kv_segment_ids, q_offset = None, 0
        elif cache is None:
            mask = attn.attention_mask(segment_ids, segment_ids, 0, self.cfg.sliding_window, branch_ids, positions)
            kv_segment_ids, q_offset = None, 0
        else:
            kv_segment_ids = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                          (0, cache.index))
            q_offset = cache.index
            mask = attn.attention_mask(segment_ids, kv_segment_ids, q_offset, self.cfg.sliding_window)
        layer = functools.partial(_layer, cfg=self.cfg, cos=cos, sin=sin, mask=mask, q_offset=q_offset,
                                  impl=self.attention_impl, dtype=self.dtype,
                                  lora_scale=lora.scale if lora else 0.0, lora_dropout=lora.dropout if lora else 0.0)
        if self.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
        params = {name: p.get_value() for name, p in self.layers.items()}
        layer_kv = (cache.k, cache.v) if cache is not None else None
        # Per layer: weights, cache, adapters, dropout key (the last three may be None).
        per_layer = (params, layer_kv, lora.adapters if lora else None, lora.keys if lora else None)
        if self.scan_layers:
            x, new_kv = jax.lax.scan(lambda h, xs: layer(h, *xs), x, per_layer)
        else:
            outs = []
            for i in range(self.cfg.num_hidden_layers):
                x, kv_out = layer(x, *jax.tree.map(lambda a: a[i], per_layer))
                outs.append(kv_out)
            new_kv = None if layer_kv is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
        x = rms_norm(x, self.final_norm.get_value(), self.cfg.rms_norm_eps)
        if cache is None:
            return x, None
        new_cache = KVCache(new_kv[0], new_kv[1], kv_segment_ids, cache.index + tokens.shape[1])
        return x, new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits for hidden states [..., embed]."""
        w = self.output_embedding().astype(self.dtype)
        out = flat_dot(hidden, w, preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "length", "act_vocab")) if out.ndim == 3 else out

    def rewards(self, hidden: jax.Array, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """A reward model's score [batch] (fp32) of each row's sequence, read where transformers reads it: at
        the row's last real token that is not the model's pad_token_id (a right-padded unpacked row)."""
        real = segment_ids > 0
        if self.cfg.pad_token_id is not None:
            real &= tokens != self.cfg.pad_token_id
        h = last_hidden(hidden, real)
        w = self.score.get_value().astype(self.dtype)
        return jnp.einsum("be,el->bl", h, w, preferred_element_type=jnp.float32)[:, 0]

    def output_embedding(self) -> jax.Array:
        """The [embed, vocab] output projection (the transposed input embedding when tied)."""
        if self.cfg.num_labels:
            raise JaxalignError("a reward model has a score head, not an LM head: it scores (jaxalign score --reward, "
                                "eval.judge: reward:PATH), it does not generate")
        return self.embed.get_value().T if self.cfg.tie_word_embeddings else self.lm_head.get_value()

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.cfg
        shape = (c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim)
        return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype),
                       jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


def _layer(x: jax.Array, p: dict[str, jax.Array], kv: tuple[jax.Array, jax.Array] | None,
           adapters: dict[str, dict[str, jax.Array]] | None, key: jax.Array | None, *, cfg: ModelConfig,
           cos, sin, mask, q_offset, impl: str, dtype, lora_scale: float, lora_dropout: float) -> tuple[jax.Array, Any]:
    """One pre-norm decoder block: x + attention(norm(x)), then + SwiGLU(norm(x))."""
    p = {name: quant.cast(w, dtype) for name, w in p.items()}  # a QLoRA base's projections stay quantised

    def proj(inp: jax.Array, name: str, index: int, n_in: int = 1) -> jax.Array:
        out = quant.project(inp, p[name], n_in, dtype)
        if adapters is None or name not in adapters:
            return out
        ab = adapters[name]
        drop_key = None if key is None else jax.random.fold_in(key, index)  # own mask per projection, as PEFT
        return out + delta(dropped(inp, lora_dropout, drop_key), ab["a"].astype(dtype), ab["b"].astype(dtype),
                           lora_scale)

    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = proj(h, "wq", 0)
    k = proj(h, "wk", 1)
    v = proj(h, "wv", 2)
    if cfg.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None))
    k = constrain(apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", None))
    v = constrain(v, ("batch", "length", "act_kv_heads", None))
    if kv is not None:  # decoding: write this step's keys/values into the cache, attend over all of it
        k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, q_offset, 0, 0))
        v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, q_offset, 0, 0))
        kv = (k, v)
    out = attn.attention(q, k, v, mask, impl, causal=kv is None)
    out = proj(out, "wo", 3, n_in=2)
    if cfg.o_bias:
        out = out + p["bo"]
    x = constrain(x + out, ("batch", "length", "act_embed"))
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate = constrain(proj(h, "w_gate", 4), ("batch", "length", "act_mlp"))
    up = proj(h, "w_up", 5)
    x = x + proj(jax.nn.silu(gate) * up, "w_down", 6)
    return constrain(x, ("batch", "length", "act_embed")), kv
