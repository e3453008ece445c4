"""What a run starts from: the objective, model options, the starting model and the run's tokenizer,
resolved from the config and checked before anything is written or loaded."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxalign.checkpoint import model_io
from jaxalign.errors import JaxalignError
from jaxalign.models import ModelConfig, init_model
from jaxalign.train.step import Objective


def objective_from_config(cfg) -> Objective:
    return Objective(stage=cfg.stage, chunk_size=cfg.model.logits_chunk_size, z_loss=cfg.sft.z_loss,
                     beta=cfg.dpo.beta, loss_type=cfg.dpo.loss, label_smoothing=cfg.dpo.label_smoothing,
                     sft_weight=cfg.dpo.sft_weight)


def model_options(cfg) -> dict[str, Any]:
    m = cfg.model
    return {"dtype": m.dtype, "param_dtype": m.param_dtype, "remat": m.remat, "attention": m.attention,
            "scan_layers": m.scan_layers}


def initial_model_path(cfg) -> str:
    """DPO starts from `dpo.init_from` (an SFT run dir, a checkpoint or an HF dir) when given."""
    if cfg.stage == "dpo" and cfg.dpo.init_from:
        return cfg.dpo.init_from
    return cfg.model.path


def initial_model_key(cfg) -> str:
    """The config key that names the starting model (for error messages)."""
    return "dpo.init_from" if cfg.stage == "dpo" and cfg.dpo.init_from else "model.path"


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
    if tokenizer.vocab_size > model_cfg.vocab_size:
        where = f"{initial_model_key(cfg)}={path!r}" if path else "model.config"
        tok = cfg.tokenizer.path or "the model's own tokenizer"
        raise JaxalignError(f"the tokenizer ({tok}) has {tokenizer.vocab_size} tokens but the model's vocab_size "
                            f"({where}) is {model_cfg.vocab_size}: token ids past {model_cfg.vocab_size - 1} "
                            "would have no embedding; use the tokenizer the model was trained with")
    return model_cfg, tokenizer


def load_model_and_tokenizer(cfg, mesh, rules, checked=None):
    """(model, tokenizer, source dtype); `checked` is check_model_source's result when already done."""
    model_cfg, tokenizer = checked or check_model_source(cfg)
    path = initial_model_path(cfg)
    options = model_options(cfg)
    if path:
        model = model_io.load_model(path, mesh, rules, **options)
        dtype = model_io.source_dtype(path)
    else:
        model = init_model(model_cfg, mesh, rules, seed=cfg.train.seed, **options)
        dtype = cfg.model.param_dtype
    return model, tokenizer, dtype


def run_tokenizer(cfg):
    """The run's tokenizer: tokenizer.path, else the starting model's own."""
    from jaxalign.data.tokenizer import load_tokenizer

    path = initial_model_path(cfg)
    tok_path = cfg.tokenizer.path or (str(model_io.tokenizer_path(path)) if path else "")
    if not tok_path:
        raise JaxalignError("set tokenizer.path (or model.path to a model dir with a tokenizer)")
    return load_tokenizer(tok_path, cfg.tokenizer.chat_template, cfg.model.trust_remote_code)
