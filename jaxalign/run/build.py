"""Building a run from its config, the one place every entry point does it: the mesh and sharding rules,
the starting model and the run's tokenizer (checked before anything is written or loaded), the
stage's objective, and the train state with its sharded, not yet compiled step. The loop, `eval`,
the pipeline, `plan`, the benchmarks and the tests all build through here."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxalign.checkpoint import model_io
from jaxalign.config.checks import dpo_losses
from jaxalign.config.schema import PREFERENCE_STAGES, REFERENCE_FREE_LOSSES
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.errors import JaxalignError
from jaxalign.models import ModelConfig, abstract_model, init_model
from jaxalign.models.lora import LoraSpec, abstract_adapters, init_adapters, resolve_targets
from jaxalign.models.quant import QuantSpec
from jaxalign.runtime.sharding import MESH_AXES, make_mesh, merged_rules
from jaxalign.train.dpo import PreferenceLoss
from jaxalign.train.kto import KTOLoss
from jaxalign.train.optimizer import build_optimizer
from jaxalign.train.step import Objective, TrainState, make_train_step


def mesh_from_config(cfg, devices=None):
    """(mesh, rules) of `mesh:` (sizes of data, fsdp, tensor; `mesh.rules` over the default table)."""
    return make_mesh({k: cfg.mesh[k] for k in MESH_AXES}, devices), merged_rules(dict(cfg.mesh.rules))


def accumulation_steps(cfg) -> int:
    """Micro-batches per optimizer step (train.micro_batch_size; 0 = the whole batch at once)."""
    return cfg.train.batch_size // cfg.train.micro_batch_size if cfg.train.micro_batch_size else 1


def objective_from_config(cfg) -> Objective:
    p = cfg.dpo
    types, weights = dpo_losses(p)
    dpo = PreferenceLoss(loss_types=types, loss_weights=weights, beta=p.beta, label_smoothing=p.label_smoothing,
                         f_divergence=p.f_divergence_type, f_alpha=p.f_alpha_divergence_coef,
                         discopop_tau=p.discopop_tau, ld_alpha=p.ld_alpha, simpo_gamma=p.simpo_gamma,
                         use_weighting=p.use_weighting, reference_free=reference_kind(cfg) == "none")
    kto = KTOLoss(beta=p.beta, desirable_weight=cfg.kto.desirable_weight,
                  undesirable_weight=cfg.kto.undesirable_weight, loss_type=cfg.kto.loss_type)
    return Objective(stage=cfg.stage, chunk_size=cfg.model.logits_chunk_size, z_loss=cfg.sft.z_loss, dpo=dpo, kto=kto,
                     center_rewards_coefficient=cfg.rm.center_rewards_coefficient)


def lora_spec(cfg) -> LoraSpec | None:
    """The run's adapters (`lora:`), or None for full fine-tuning."""
    lo = cfg.lora
    if not lo.enabled:
        return None
    return LoraSpec(rank=lo.rank, alpha=float(lo.alpha), targets=resolve_targets(lo.targets), dropout=lo.dropout,
                    rslora=lo.rslora, init=lo.init)


def quant_spec(cfg) -> QuantSpec | None:
    """How a LoRA run stores its frozen base (`lora.quantize`), or None to keep it as loaded."""
    lo = cfg.lora
    if not lo.enabled or lo.quantize == "none":
        return None
    return QuantSpec(lo.quantize, lo.quant_block_size, lo.double_quant)


def reference_kind(cfg) -> str | None:
    """DPO's reference: "model" (a frozen copy), "adapters_off" (LoRA: the base itself, no copy),
    "precomputed" (log-probs scored once) or "none" (reference-free losses); None for SFT."""
    if cfg.stage not in PREFERENCE_STAGES:
        return None
    if cfg.dpo.reference == "auto":
        if cfg.stage == "dpo" and any(t in REFERENCE_FREE_LOSSES for t in dpo_losses(cfg.dpo)[0]):
            return "none"
        return "adapters_off" if cfg.lora.enabled else "model"
    return cfg.dpo.reference


def has_reference_forward(reference: str | None) -> bool:
    """Whether each step runs a reference forward pass (a live copy, or the base with adapters off)."""
    return reference in ("model", "adapters_off")


def init_lora_adapters(model_cfg: ModelConfig, spec: LoraSpec, mesh, rules, seed: int):
    """Fresh adapters, born sharded by the rules table (A as its weight's input axes, B as its output)."""
    shardings = jax.tree.map(lambda a: a.sharding, abstract_adapters(model_cfg, spec, mesh, rules))
    key = jax.random.fold_in(jax.random.key(seed), 0)  # stream 0: init; the step's dropout uses stream 1
    return jax.jit(lambda: init_adapters(model_cfg, spec, key), out_shardings=shardings)()


def model_options(cfg) -> dict[str, Any]:
    m = cfg.model
    return {"dtype": m.dtype, "param_dtype": m.param_dtype, "remat": m.remat, "attention": m.attention,
            "scan_layers": m.scan_layers, "attention_block": m.attention_block}


def initial_model_path(cfg) -> str:
    """DPO starts from `dpo.init_from` (an SFT run dir, a checkpoint or an HF dir) when given."""
    if cfg.stage in PREFERENCE_STAGES and cfg.dpo.init_from:
        return cfg.dpo.init_from
    return cfg.model.path


def initial_model_key(cfg) -> str:
    """The config key that names the starting model (for error messages)."""
    return "dpo.init_from" if cfg.stage in PREFERENCE_STAGES and cfg.dpo.init_from else "model.path"


def check_model_source(cfg):
    """Resolve the starting model's architecture and the run's tokenizer, and check they fit, before
    anything is written or loaded: (ModelConfig, tokenizer)."""
    path = initial_model_path(cfg)
    if path:
        key = initial_model_key(cfg)
        try:
            model_cfg = model_io.load_model_config(path)
        except JaxalignError as e:
            raise JaxalignError(f"{key}={path!r}: {e}") from None
        if cfg.model.config:
            wanted = ModelConfig.from_hf_dict(dict(cfg.model.config), source="model.config")
            diff = [f"{f.name}: model.config has {getattr(wanted, f.name)!r}, {key} has "
                    f"{getattr(model_cfg, f.name)!r}" for f in dataclasses.fields(ModelConfig)
                    if getattr(wanted, f.name) != getattr(model_cfg, f.name)]
            if diff:
                raise JaxalignError(f"{key}={path!r} is another architecture than model.config ("
                                    + "; ".join(diff) + "); make them agree, or remove model.config "
                                    f"to take the architecture of {key}")
    else:
        if not cfg.model.config:
            raise JaxalignError("set model.path (an HF dir or jaxalign checkpoint) or model.config (an inline "
                                "HF-style architecture to initialise randomly)")
        model_cfg = ModelConfig.from_hf_dict(dict(cfg.model.config), source="model.config")
    tokenizer = run_tokenizer(cfg)
    if cfg.stage == "rm" and not model_cfg.num_labels:  # a causal LM (e.g. the SFT run) becomes a reward model
        model_cfg = reward_model_config(model_cfg, tokenizer)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        where = f"{initial_model_key(cfg)}={path!r}" if path else "model.config"
        tok = cfg.tokenizer.path or "the model's own tokenizer"
        raise JaxalignError(f"the tokenizer ({tok}) has {tokenizer.vocab_size} tokens but the model's vocab_size "
                            f"({where}) is {model_cfg.vocab_size}: token ids past {model_cfg.vocab_size - 1} "
                            "would have no embedding; use the tokenizer the model was trained with")
    return model_cfg, tokenizer


def reward_model_config(model_cfg: ModelConfig, tokenizer) -> ModelConfig:
    """A causal LM's architecture with a scalar score head in place of its LM head. Its pad_token_id is the
    id batches are padded with, as TRL sets it: transformers reads a score at the last token that is not it."""
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return dataclasses.replace(model_cfg, num_labels=1, pad_token_id=pad)


def build_model_and_tokenizer(cfg, mesh, rules, checked=None):
    """(model, tokenizer, source dtype); `checked` is check_model_source's result when already done. A reward
    model (stage rm) started from a causal LM keeps its weights but the LM head, and gets a fresh score head."""
    model_cfg, tokenizer = checked or check_model_source(cfg)
    path = initial_model_path(cfg)
    options = model_options(cfg)
    if path:
        model = model_io.load_model(path, mesh, rules, **options)
        if model_cfg.num_labels and not model.cfg.num_labels:  # stage rm from a causal LM
            model = with_score_head(model, model_cfg, mesh, rules, cfg.train.seed, options)
        dtype = model_io.source_dtype(path)
    else:
        model = init_model(model_cfg, mesh, rules, seed=cfg.train.seed, **options)
        dtype = cfg.model.param_dtype
    return model, tokenizer, dtype


def with_score_head(model, rm_cfg: ModelConfig, mesh, rules, seed: int, options):
    """`model`'s weights under `rm_cfg` (a reward model): its LM head dropped, the score head drawn as
    transformers initialises it (normal, std initializer_range), born on its shards."""
    graphdef, abstract, shardings = abstract_model(rm_cfg, mesh, rules, **options)
    head = nnx.to_pure_dict(abstract)["score"]
    key = jax.random.fold_in(jax.random.key(seed), 2)  # its own stream: not init's, not dropout's
    score = jax.jit(lambda: (rm_cfg.initializer_range * jax.random.normal(key, head.shape)).astype(head.dtype),
                    out_shardings=nnx.to_pure_dict(shardings)["score"])()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params.pop("lm_head", None)
    nnx.replace_by_pure_dict(abstract, {**params, "score": score})
    return nnx.merge(graphdef, abstract)


def run_tokenizer(cfg):
    """The run's tokenizer: tokenizer.path, else the starting model's own."""
    path = initial_model_path(cfg)
    tok_path = cfg.tokenizer.path or (str(model_io.tokenizer_path(path)) if path else "")
    if not tok_path:
        raise JaxalignError("set tokenizer.path (or model.path to a model dir with a tokenizer)")
    return load_tokenizer(tok_path, cfg.tokenizer.chat_template, cfg.model.trust_remote_code)


class TrainSetup(NamedTuple):
    state: TrainState  # concrete arrays, or ShapeDtypeStructs with shardings (for `plan`)
    shardings: Any  # of the state
    step: Any  # step(state, batch, ref_params) -> (state, metrics), not yet jitted (train.step.jit_train_step)


def build_train_state(cfg, mesh, graphdef, params, total_steps: int) -> TrainSetup:
    """The optimizer state, the step counter and the stage's step for the trained `params` (the model's,
    or with LoRA the adapters'; arrays, or abstract ShapeDtypeStructs with shardings: then nothing is
    allocated)."""
    optimizer, schedule = build_optimizer(cfg.optimizer, total_steps)
    replicated = NamedSharding(mesh, PartitionSpec())
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
        opt = jax.eval_shape(optimizer.init, params)
        opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt,
                           _opt_state_shardings(opt, params, replicated))
        state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params=params, opt_state=opt)
    else:
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(optimizer.init)(params))
    step = make_train_step(graphdef, objective_from_config(cfg), optimizer, schedule, accumulation_steps(cfg),
                           lora=lora_spec(cfg), seed=cfg.train.seed)
    return TrainSetup(state, jax.tree.map(lambda x: x.sharding, state), step)


def _opt_state_shardings(opt_abstract, params_abstract, replicated):
    """Optimizer state leaves shaped like the parameter tree (Adam's mu, nu) take the parameters'
    shardings, as `jit(optimizer.init)(params)` gives them; the rest (counts) are replicated."""
    p_def = jax.tree.structure(params_abstract)
    p_shard = jax.tree.map(lambda a: a.sharding, params_abstract)

    def is_param_tree(x):
        return not isinstance(x, jax.ShapeDtypeStruct) and jax.tree.structure(x) == p_def

    return jax.tree.map(lambda x: p_shard if is_param_tree(x) else replicated, opt_abstract, is_leaf=is_param_tree)
