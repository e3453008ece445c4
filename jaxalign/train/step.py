"""The train and eval steps: pure functions, jit-compiled with explicit shardings, state donated.

One step = normalisers of the whole batch -> for each micro-batch, value_and_grad of the stage's
objective (summed) -> optax update, skipped when the loss, the gradients or the updated weights are
not finite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxalign.models.logprobs import masked_sum, token_stats
from jaxalign.models.lora import Adapted, LoraSpec
from jaxalign.runtime.sharding import batch_sharding, constrain
from jaxalign.train.dpo import PreferenceLoss, dpo_loss
from jaxalign.train.kto import KTOLoss, kto_loss
from jaxalign.train.losses import reward_loss, sft_loss

Batch = dict[str, jax.Array]
# Stages trained on pairs: 2B rows per batch of B pairs, chosen rows first (data/batching.py), unless
# the batch is in the shared-prompt layout (it has branch_ids; each row holds whole pairs).
PAIRED_STAGES = ("dpo", "rm", "kto")  # KTO: an example's completion and its KL completion (data/kto.py)


def is_shared(batch: Batch) -> bool:
    return "branch_ids" in batch


def pair_sums(values: jax.Array, batch: Batch) -> jax.Array:
    """[2N] per-sequence sums of `values` [rows, length] over the loss mask, chosen first (pair i is i and
    N + i): the padded layout's rows as they are; a shared-prompt batch's pair slots, row-major."""
    if not is_shared(batch):
        return masked_sum(values, batch["loss_mask"])
    values = jnp.where(batch["loss_mask"], values, 0)
    slots = batch["pair_index"].shape[1]
    # Row by row (row-local under any sharding), a sum per segment: segment s + 1 is slot s, 0 padding.
    per_slot = jax.vmap(lambda v, seg: jax.ops.segment_sum(v, seg, num_segments=slots + 1)[1:])
    sides = [per_slot(jnp.where(batch["branch_ids"] == b, values, 0), batch["segment_ids"]) for b in (1, 2)]
    return jnp.stack(sides).reshape(-1)  # [2, rows, slots]: chosen of every slot, then rejected


def token_logps(model, batch: Batch, chunk_size: int = -1, everywhere: bool = False,
                squares: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """[rows, length] log-prob of each target token, in either layout: at the loss positions only (0 elsewhere)
    when the batch has a `loss_index` (data/batching.py) unless `everywhere`. With `squares`, (log-probs,
    log Σ softmax² of each position: WPO's)."""
    hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"],
                                    branch_ids=batch.get("branch_ids"))
    keys = ("logp", "lss") if squares else ("logp",)
    if everywhere or "loss_index" not in batch:
        stats = token_stats(model, hidden, batch["targets"], chunk_size, squares)
        out = [stats[k] for k in keys]
    else:
        index = batch["loss_index"]
        picked = jnp.take_along_axis(hidden, index[..., None], axis=1)
        stats = token_stats(model, picked, jnp.take_along_axis(batch["targets"], index, axis=1), chunk_size, squares)
        real = jnp.arange(index.shape[1]) < jnp.sum(batch["loss_mask"].astype(jnp.int32), axis=1, keepdims=True)
        rows = jnp.arange(index.shape[0])[:, None]
        out = [jnp.zeros(batch["targets"].shape, stats[k].dtype).at[rows, index].add(jnp.where(real, stats[k], 0))
               for k in keys]
    return tuple(out) if squares else out[0]


def prompt_targets(batch: Batch) -> jax.Array:
    """[rows, length] the positions predicting a prompt token of a pair (once per pair; chosen rows only in
    the padded layout): with the chosen reply's tokens, what TRL's ORPO counts in its NLL."""
    seg = batch["segment_ids"]
    if is_shared(batch):
        return (batch["branch_ids"] == 0) & (seg > 0)
    has_target = (seg > 0) & jnp.pad(seg[:, 1:] == seg[:, :-1], ((0, 0), (0, 1)))
    chosen_rows = jnp.arange(seg.shape[0]) < seg.shape[0] // 2
    return has_target & ~batch["loss_mask"].astype(bool) & chosen_rows[:, None]


def ld_token_weights(batch: Batch, ld_alpha: float) -> jax.Array:
    """LD-DPO's [rows, length] token weights (TRL's `ld_alpha`): 1 on a reply's first min(|y+|, |y-|) tokens
    of its pair, ld_alpha on the rest, so the longer reply's extra tokens count less."""
    mask = batch["loss_mask"].astype(jnp.float32)
    if not is_shared(batch):
        lengths = jnp.sum(mask, axis=1)
        half = lengths.shape[0] // 2
        shorter = jnp.tile(jnp.minimum(lengths[:half], lengths[half:]), 2)
        return jnp.where(jnp.cumsum(mask, axis=1) <= shorter[:, None], 1.0, ld_alpha)
    slots = batch["pair_index"].shape[1]

    def row(m, seg, branch):  # per reply: its tokens' 1-based index and its length, by segment (pair slot)
        index, lengths = jnp.zeros_like(m), []
        for b in (1, 2):
            mb = jnp.where(branch == b, m, 0)
            count = jnp.cumsum(mb)
            before = jax.ops.segment_min(count - mb, seg, num_segments=slots + 1)  # count is non-decreasing
            index = jnp.where(branch == b, count - before[seg], index)
            lengths.append(jax.ops.segment_sum(mb, seg, num_segments=slots + 1))
        return jnp.where(index <= jnp.minimum(*lengths)[seg], 1.0, ld_alpha)

    return jax.vmap(row)(mask, batch["segment_ids"], batch["branch_ids"])


def sequence_logps(model, batch: Batch, chunk_size: int = -1, ld_alpha: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """([2N] summed completion log-probs (LD-DPO: weighted), [2N] completion tokens) of a DPO batch, chosen
    first, in either layout."""
    logp = token_logps(model, batch, chunk_size)
    weighted = logp if ld_alpha == 1.0 else logp * ld_token_weights(batch, ld_alpha)
    return pair_sums(weighted, batch), completion_tokens(batch)


def completion_tokens(batch: Batch) -> jax.Array:
    return jnp.round(pair_sums(jnp.ones(batch["loss_mask"].shape, jnp.float32), batch)).astype(jnp.int32)


def example_labels(batch: Batch) -> jax.Array:
    """KTO's [N] labels (1 desirable), in the order of `pair_sums`' first half, in either layout."""
    return batch["label"].reshape(-1) if is_shared(batch) else batch["label"][:batch["label"].shape[0] // 2]


def batch_ref_logps(batch: Batch) -> jax.Array:
    """The batch's precomputed reference log-probs as [2N], chosen first (shared: [rows, slots, 2])."""
    ref = batch["ref_logps"]
    return jnp.moveaxis(ref, -1, 0).reshape(-1) if is_shared(batch) else ref


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nested dict of arrays (nnx.to_pure_dict of the model's Params)
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a stage trains: its loss and how to normalise it over the whole batch."""

    stage: str
    chunk_size: int = -1  # model.logits_chunk_size (-1: auto, models/logprobs.resolve_chunk)
    z_loss: float = 0.0
    dpo: PreferenceLoss = PreferenceLoss()
    kto: KTOLoss = KTOLoss()
    center_rewards_coefficient: float = 0.0

    @property
    def head_everywhere(self) -> bool:
        """ORPO's NLL counts the prompt: its log-probs are needed at every position, not at `loss_index` only."""
        return self.stage == "dpo" and "orpo" in self.dpo.loss_types

    def normalisers(self, batch: Batch) -> dict[str, jax.Array]:
        mask = batch["loss_mask"].astype(jnp.int32)
        if self.stage == "sft":
            return {"tokens": jnp.sum(mask)}
        # Padding pairs (an eval batch's tail, empty slots) have no completion tokens and do not count.
        counts = completion_tokens(batch)
        chosen = counts[:counts.shape[0] // 2]
        if self.stage == "kto":
            real = (chosen > 0).astype(jnp.int32)
            desirable = jnp.sum(real * (example_labels(batch) > 0.5))
            return {"examples": jnp.sum(real), "desirable": desirable, "undesirable": jnp.sum(real) - desirable}
        norms = {"pairs": jnp.sum((chosen > 0).astype(jnp.int32)), "chosen_tokens": jnp.sum(chosen)}
        if "orpo" in self.dpo.loss_types:  # ORPO's NLL: prompt and chosen reply
            norms["chosen_sequence_tokens"] = norms["chosen_tokens"] + jnp.sum(prompt_targets(batch).astype(jnp.int32))
        return norms

    def __call__(self, model, batch: Batch, norms: dict[str, jax.Array],
                 ref_model=None) -> tuple[jax.Array, dict[str, jax.Array]]:
        if self.stage == "dpo":
            return self.preference(model, batch, norms, ref_model)
        if self.stage == "kto":
            policy_logps, num_tokens = sequence_logps(model, batch, self.chunk_size)
            ref_logps = batch_ref_logps(batch) if ref_model is None else reference_logps(ref_model, batch, self.chunk_size)
            return kto_loss(policy_logps, jax.lax.stop_gradient(ref_logps), example_labels(batch), norms, self.kto,
                            num_tokens[:num_tokens.shape[0] // 2] > 0)
        hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
        if self.stage == "rm":
            pairs = batch["tokens"].shape[0] // 2
            margin = batch["margin"][:pairs] if "margin" in batch else None
            return reward_loss(model.rewards(hidden, batch["tokens"], batch["segment_ids"]), norms["pairs"],
                               margin=margin, center_coefficient=self.center_rewards_coefficient,
                               valid=jnp.sum(batch["loss_mask"][:pairs], axis=-1) > 0)
        stats = token_stats(model, hidden, batch["targets"], self.chunk_size)
        return sft_loss(stats["logp"], stats["lse"], stats["correct"], batch["loss_mask"], norms["tokens"],
                        self.z_loss)

    def preference(self, model, batch: Batch, norms: dict[str, jax.Array], ref_model=None):
        spec = self.dpo
        logp = token_logps(model, batch, self.chunk_size, everywhere=self.head_everywhere, squares=spec.use_weighting)
        num_tokens = completion_tokens(batch)
        pair_weights = None
        if spec.use_weighting:  # WPO (TRL's use_weighting): exp(mean of log p - log Σp² over each reply), not trained
            logp, lss = logp
            counts = jnp.maximum(num_tokens, 1).astype(jnp.float32)
            mean = pair_sums(jax.lax.stop_gradient(logp - lss), batch) / counts
            weights = jnp.exp(mean)
            pair_weights = weights[:weights.shape[0] // 2] * weights[weights.shape[0] // 2:]
        plain = pair_sums(logp, batch)
        policy_logps = plain if not spec.length_desensitised else pair_sums(
            logp * ld_token_weights(batch, spec.ld_alpha), batch)
        if spec.reference_free:
            ref_logps = jnp.zeros_like(policy_logps)
        elif ref_model is None:
            ref_logps = batch_ref_logps(batch)
        else:
            ref_logps = reference_logps(ref_model, batch, self.chunk_size, spec.ld_alpha)
        pairs = policy_logps.shape[0] // 2
        # The `sft` term is the NLL of the chosen replies' tokens, unweighted by LD-DPO; ORPO's adds the prompt's.
        nll = {"chosen_nll_sum": -jnp.sum(plain[:pairs]), "chosen_tokens_total": norms["chosen_tokens"]}
        if "orpo" in spec.loss_types:
            nll = {"chosen_nll_sum": nll["chosen_nll_sum"] - jnp.sum(jnp.where(prompt_targets(batch), logp, 0)),
                   "chosen_tokens_total": norms["chosen_sequence_tokens"]}
        return dpo_loss(policy_logps, jax.lax.stop_gradient(ref_logps), num_tokens, norms["pairs"], spec, **nll,
                        valid=num_tokens[:pairs] > 0, pair_weights=pair_weights)


def reference_logps(ref_model, batch: Batch, chunk_size: int = -1, ld_alpha: float = 1.0) -> jax.Array:
    """[2N] the reference's summed (LD-DPO: weighted) completion log-probs, chosen first (either layout)."""
    return sequence_logps(ref_model, batch, chunk_size, ld_alpha)[0]


def split_micro_batches(batch: Batch, k: int, paired: bool) -> Batch:
    """[rows, ...] -> [k, rows/k, ...]. Micro-batch i takes rows i, i+k, ... so every device's rows
    feed every micro-batch (no resharding); for DPO the pair layout (chosen rows, then rejected)
    is kept inside each micro-batch."""

    def split(x):
        if paired:
            x = x.reshape(2, x.shape[0] // (2 * k), k, *x.shape[1:])
            x = jnp.moveaxis(x, 2, 0)
            return x.reshape(k, -1, *x.shape[3:])
        return jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0)

    return {name: split(x) for name, x in batch.items()}


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def models_of(graphdef: nnx.GraphDef, params, frozen, batch: Batch, lora: LoraSpec | None = None, key=None):
    """(policy, reference) the objective sees. Full fine-tuning: `params` are the model and `frozen` the
    live reference's weights (or None). LoRA: `params` are the adapters, `frozen` the base they sit on,
    and a DPO reference is that same base with the adapters off, unless the batch carries precomputed
    reference log-probs."""
    frozen_model = None if frozen is None else nnx.merge(graphdef, frozen)
    if lora is None:
        return nnx.merge(graphdef, params), frozen_model
    reference = frozen_model if "ref_logps" not in batch else None
    return Adapted(frozen_model, params, lora, key), reference


def make_train_step(graphdef: nnx.GraphDef, objective: Objective, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, accum_steps: int = 1, lora: LoraSpec | None = None,
                    seed: int = 0) -> Callable:
    """step(state, batch, frozen) -> (state, metrics); `frozen` as `models_of` takes it. With LoRA dropout
    each step (and micro-batch) draws its masks from (seed, step), so a resumed run draws the same ones."""

    def step(state: TrainState, batch: Batch, frozen=None):
        norms = objective.normalisers(batch)
        dropout = lora is not None and lora.dropout > 0
        # Stream 1 of the seed (stream 0 initialised the adapters), then the step.
        step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), state.step) if dropout else None

        def micro_grads(mb: Batch, index=0):
            key = None if step_key is None else jax.random.fold_in(step_key, index)

            def loss_fn(params):
                model, reference = models_of(graphdef, params, frozen, mb, lora, key)
                return objective(model, mb, norms, reference)

            return jax.value_and_grad(loss_fn, has_aux=True)(state.params)

        if accum_steps == 1:
            (loss, metrics), grads = micro_grads(batch)
        else:
            micro = split_micro_batches(batch, accum_steps,
                                        paired=objective.stage in PAIRED_STAGES and not is_shared(batch))

            def body(acc, xs):
                mb, index = xs
                mb = {k: constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in mb.items()}
                (loss, metrics), grads = micro_grads(mb, index)
                return jax.tree.map(jnp.add, acc, (loss, metrics, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro_grads, jax.tree.map(lambda x: x[0], micro)))
            (loss, metrics, grads), _ = jax.lax.scan(body, (zeros[0][0], zeros[0][1], zeros[1]),
                                                     (micro, jnp.arange(accum_steps)))

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A finite gradient can still overflow the weights (a huge lr, bf16 params): checked too.
        weights_finite = all_finite(params)
        ok = finite & weights_finite
        # A refused step leaves the state as it was; the loop counts or stops on it.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state))
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
                   # 0: applied; 1: non-finite loss or gradients; 2: the update made the weights non-finite.
                   "nonfinite": jnp.where(finite, jnp.where(weights_finite, 0, 2), 1).astype(jnp.int32), **{f"num_{k}": v for k, v in norms.items()},
                   # Non-padding tokens of the global batch (every process's rows), for tokens/s.
                   "num_input_tokens": jnp.sum((batch["segment_ids"] > 0).astype(jnp.int32))}
        return new_state, metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef, objective: Objective, lora: LoraSpec | None = None) -> Callable:
    """eval(params, batch, frozen) -> metrics of the batch (same definitions as training; no dropout)."""

    def evaluate(params, batch: Batch, frozen=None):
        norms = objective.normalisers(batch)
        model, reference = models_of(graphdef, params, frozen, batch, lora)
        loss, metrics = objective(model, batch, norms, reference)
        return {**metrics, "loss": loss, **{f"num_{k}": v for k, v in norms.items()}}

    return evaluate


def batch_shardings(batch_shapes: dict[str, tuple[int, ...]], mesh) -> dict[str, jax.sharding.NamedSharding]:
    return {name: batch_sharding(mesh, len(shape)) for name, shape in batch_shapes.items()}


def jit_train_step(step: Callable, state_shardings, batch_shards, ref_shardings=None):
    """Explicit in/out shardings; the old state is donated so params and optimizer state are updated in place."""
    return jax.jit(step, in_shardings=(state_shardings, batch_shards, ref_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))
