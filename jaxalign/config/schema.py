"""The config schema: every key, its default, its type, its allowed values and what it means.

This table is the one source of truth: `default_config()` builds the ConfigDict from it and
`validate()` checks types and choices against it. A section is a nested dict; a key is a
`Field`. Its type is inferred from the default unless given (`STR_OR_LIST` for data files).
Five keys hold free-form mappings whose inner keys are not checked here: `model.config`,
`mesh.rules`, and `sft.overrides` / `dpo.overrides` / `rm.overrides` (checked as config keys by
`stage_config`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Type tags (also the words used in error messages).
STR, INT, FLOAT, BOOL = "str", "int", "float", "bool"
LIST_STR = "list of str"
LIST_FLOAT = "list of float"
STR_OR_LIST = "str or list of str"
SOURCES = "str, list of str, or list of {path, weight} mappings"
# The keys of one source of a weighted data.train (jaxalign/data/mixture.py).
SOURCE_KEYS = ("path", "weight", "split", "max_rows")
MAPPING = "mapping"

_DTYPES = ("float32", "bfloat16", "float16")
# model.precision -> (model.dtype: compute, model.param_dtype: weights and optimizer state)
PRECISIONS = {"fp32": ("float32", "float32"), "bf16": ("bfloat16", "bfloat16"),
              "bf16-fp32-master": ("bfloat16", "float32")}
# The projections LoRA can adapt, by PEFT's module names (models/lora.py maps them onto the weights).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# TRL 1.16's DPOConfig.loss_type names and f_divergence_type names (definitions: jaxalign/train/dpo.py).
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo", "orpo")
# Defined without a reference model (TRL's CPOTrainer and ORPOTrainer): dpo.reference auto means none.
REFERENCE_FREE_LOSSES = ("simpo", "orpo")
# The stages that start from dpo.init_from beside a frozen reference (dpo.reference), on preference data.
PREFERENCE_STAGES = ("dpo", "kto")
# Stage names for a reference-free loss: stage orpo is stage dpo with dpo.loss orpo (checks.resolve_shorthands).
STAGE_ALIASES = ("orpo", "simpo")
# `jaxalign pipeline` recipes: the stages before the last, then the one it reports on and exports.
PIPELINE_STAGES = [["sft", final] for final in ("dpo", "kto", *STAGE_ALIASES)] + \
    [["sft", "rm", final] for final in ("dpo", *STAGE_ALIASES)] + [[final] for final in STAGE_ALIASES]
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# f-DPO leaves a β·log Z(x) term that cancels only in the chosen - rejected difference of scores (TRL's rule).
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# The losses label_smoothing enters (sigmoid as conservative DPO, as TRL did before 1.0).
SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo")


def overrides_section(stage: str) -> str:
    """The section whose `overrides` a pipeline stage takes: every preference stage's is dpo.overrides."""
    return "dpo" if stage in (*PREFERENCE_STAGES, *STAGE_ALIASES) else stage


@dataclasses.dataclass(frozen=True)
class Field:
    """One config key: default value, type tag, allowed values (or None) and a one-line doc."""

    default: Any
    doc: str
    choices: tuple | None = None
    type: str = ""

    def __post_init__(self):
        if not self.type:
            d = self.default
            inferred = (
                BOOL if isinstance(d, bool) else INT if isinstance(d, int)
                else FLOAT if isinstance(d, float) else STR if isinstance(d, str)
                else MAPPING if isinstance(d, dict) else LIST_STR if isinstance(d, list)
                else None
            )
            if inferred is None:
                raise TypeError(f"cannot infer a config type from default {d!r}")
            object.__setattr__(self, "type", inferred)


F = Field

SCHEMA: dict[str, Any] = {
    "stage": F("sft", "which stage this run trains: sft, dpo, kto (unpaired preferences), rm (a Bradley-Terry "
               "reward model on the preference data), or orpo / simpo (stage dpo with that dpo.loss, no reference)",
               ("sft", "dpo", "rm", "kto", *STAGE_ALIASES)),
    "output_dir": F("runs/default", "run dir: config.yaml, metrics.jsonl, checkpoints/, eval/"),
    "run_name": F("", "name shown in logs and reports; '' = basename of output_dir"),
    "model": {
        "path": F("", "HF model dir, hub id or jaxalign checkpoint; '' = random model from model.config"),
        "config": F({}, "inline HF-style model config (model_type, hidden_size, ...) used when path is ''"),
        "precision": F("", "the precision policy, deciding model.dtype and model.param_dtype: fp32; bf16 (bf16 "
                       "weights, optimizer state and compute); bf16-fp32-master (bf16 compute, fp32 weights and "
                       "optimizer state); '' = the two dtypes as set. Losses and log-softmax are fp32 in every "
                       "policy", ("", *PRECISIONS)),
        "dtype": F("float32", "activation / compute dtype (model.precision sets it)", _DTYPES),
        "param_dtype": F("float32", "dtype the parameters and optimizer state are stored and updated in "
                         "(model.precision sets it)", _DTYPES),
        "remat": F("minimal", "rematerialization policy of the scanned layer body; minimal keeps the projections' "
                   "outputs and recomputes attention and the elementwise work (on CPU also the fastest: it halves "
                   "the step's temporaries, whose fresh pages cost a second a step under remat none)",
                   ("none", "full", "dots", "minimal")),
        "attention": F("auto", "attention kernel; auto = splash (Pallas, causal + segment-id masks) on TPU, cudnn "
                       "on GPU, xla elsewhere; splash off TPU runs in Pallas interpret mode (slow: tests)",
                       ("auto", "xla", "cudnn", "splash")),
        "attention_block": F(512, "query and key block of the splash kernel, a multiple of 128 (capped at the row "
                             "length rounded up to 128)"),
        "scan_layers": F(True, "stack the layers and scan them: compile time independent of depth"),
        "logits_chunk_size": F(-1, "positions per chunk of the fused LM head + log-softmax (forward and backward); "
                               "0 = the whole [tokens, vocab] logits at once; -1 = auto: 256 for a vocabulary of "
                               "65,536 or more, else 0"),
        "trust_remote_code": F(False, "passed to transformers when loading a model config / tokenizer"),
    },
    "lora": {
        "enabled": F(False, "train low-rank adapters on the frozen base model instead of every weight"),
        "rank": F(8, "adapter rank r"),
        "alpha": F(16.0, "adapter scale numerator: scale = alpha / r (alpha / sqrt(r) with lora.rslora)"),
        "dropout": F(0.0, "dropout on each adapter's input while training (PEFT's lora_dropout)"),
        "targets": F(["all-linear"], "projections given adapters: any of " + ", ".join(LORA_TARGETS)
                     + " (or q, k, v, o, gate, up, down), or all-linear"),
        "rslora": F(False, "rank-stabilised scale alpha / sqrt(r)"),
        "init": F("kaiming", "A's initialiser (B starts at 0): PEFT's Kaiming-uniform default, or gaussian (std 1/r)",
                  ("kaiming", "gaussian")),
        "quantize": F("none", "store the frozen base's projections quantised (QLoRA): nf4 (4-bit NormalFloat, "
                      "block-wise absmax scales) or int8 (per output feature)", ("none", "int8", "nf4")),
        "quant_block_size": F(64, "nf4: input features per absmax scale"),
        "double_quant": F(False, "nf4: quantise the absmax scales again (int8), ~0.37 bits/weight less"),
    },
    "tokenizer": {
        "path": F("", "tokenizer dir or hub id; '' = model.path"),
        "chat_template": F("", "'' = the tokenizer's own; llama2, llama3, chatml, plain, or a .jinja file"),
    },
    "mesh": {
        "data": F(1, "size of the pure data-parallel axis; -1 = all remaining devices"),
        "fsdp": F(-1, "size of the fully-sharded data-parallel axis; -1 = all remaining devices"),
        "tensor": F(1, "size of the tensor-parallel axis; -1 = all remaining devices"),
        "rules": F({}, "overrides of the logical-axis rules: {logical_name: mesh axis, list of axes or null}"),
    },
    "data": {
        "train": F("", "training data: a file, dir, glob or hub id, a list of them (concatenated), or a weighted "
                   "mixture: a list of {path, weight[, split, max_rows]}", type=SOURCES),
        "eval": F("", "eval data, same forms as data.train; '' = split off data.eval_fraction",
                  type=STR_OR_LIST),
        "eval_fraction": F(0.0, "fraction of data.train held out for eval when data.eval is ''"),
        "format": F("auto", "row format; auto = detect from the columns",
                    ("auto", "messages", "prompt_completion", "alpaca", "sharegpt", "text", "preference", "unpaired")),
        "split": F("train", "split to read from hub / datasets sources"),
        "max_length": F(1024, "max tokens per sequence (prompt + completion)"),
        "max_prompt_length": F(512, "max prompt tokens; longer prompts are truncated per data.truncation"),
        "truncation": F("keep_end", "which end of an over-long prompt is kept", ("keep_start", "keep_end")),
        "packing": F(True, "pack several SFT examples per sequence (segment ids keep them apart); with "
                     "dpo.share_prompt, several whole pairs per row"),
        "pad_to_multiple_of": F(64, "pad sequence lengths up to a multiple of this (fewer recompiles)"),
        "shuffle": F(True, "shuffle training rows each epoch (seeded by train.seed)"),
        "on_bad_row": F("error", "what to do with a malformed row", ("error", "skip")),
        "cache_dir": F("", "where tokenized data is cached (local); '' = output_dir/cache, or "
                     "~/.cache/jaxalign when output_dir is a URL"),
        "sft_from_preference": F(False, "SFT on the chosen side of preference rows"),
        "max_rows": F(0, "read at most this many rows per source; 0 = all"),
        "num_workers": F(0, "processes that tokenize; 0 = one per CPU core (one for small data)"),
        "streaming": F(False, "read, tokenize and batch data.train as it comes, never storing it (data larger "
                       "than the disk cache, hub datasets); needs train.max_steps"),
        "shuffle_buffer": F(10000, "rows in the shuffle buffer of a streamed data.train"),
    },
    "train": {
        "max_steps": F(-1, "optimizer steps to run; -1 = train.epochs over the data"),
        "epochs": F(1, "passes over the training data when max_steps is -1"),
        "batch_size": F(8, "global batch per optimizer step: sequences for SFT, pairs for DPO"),
        "micro_batch_size": F(0, "per-forward batch for gradient accumulation; 0 = no accumulation"),
        "eval_every": F(100, "evaluate every N steps; 0 = only at the end"),
        "eval_batches": F(0, "eval batches per evaluation; 0 = the whole eval set"),
        "log_every": F(10, "write metrics every N steps"),
        "seed": F(0, "seed for init, shuffling and dropout"),
        "on_nonfinite": F("skip", "on a NaN/inf loss or grad: skip the update or stop the run",
                          ("skip", "stop")),
        "max_nonfinite_skips": F(10, "with on_nonfinite: skip, stop after this many skipped steps in a row"),
    },
    "optimizer": {
        "name": F("adamw", "optimizer", ("adamw", "sgd")),
        "lr": F(1e-5, "peak learning rate"),
        "schedule": F("cosine", "decay after warmup", ("cosine", "linear", "constant")),
        "warmup_steps": F(0, "linear warmup steps (exclusive with warmup_ratio)"),
        "warmup_ratio": F(0.0, "warmup as a fraction of total steps (exclusive with warmup_steps)"),
        "min_lr_ratio": F(0.0, "final lr as a fraction of the peak lr"),
        "weight_decay": F(0.0, "decoupled weight decay"),
        "b1": F(0.9, "Adam beta1 (SGD momentum)"),
        "b2": F(0.999, "Adam beta2"),
        "eps": F(1e-8, "Adam epsilon"),
        "max_grad_norm": F(1.0, "clip the global gradient norm to this; 0 = no clipping"),
        "decay_norms_and_biases": F(False, "also apply weight decay to norm scales and biases"),
    },
    "checkpoint": {
        "every_steps": F(500, "save every N steps; 0 = only at the end"),
        "keep": F(3, "most recent checkpoints kept"),
        "keep_best": F(True, "also keep the best checkpoint by checkpoint.best_metric"),
        "best_metric": F("auto", "metric that picks the best checkpoint; auto = eval_loss for SFT, "
                         "eval_rewards_accuracy for DPO, eval_accuracy for a reward model",
                         ("auto", "eval_loss", "eval_rewards_accuracy", "eval_accuracy")),
        "async_save": F(True, "write checkpoints in the background"),
        "save_at_epoch_end": F(True, "also save at the end of each epoch"),
    },
    "eval": {
        "batch_size": F(8, "global eval batch"),
        "min_sft_skill": F(0.0, "fail the pipeline if the SFT model's held-out skill is below this"),
        "max_new_tokens": F(64, "tokens generated per prompt in generative eval"),
        "num_generations": F(64, "held-out prompts generated for in generative eval; 0 = all"),
        "task": F("", "registered task whose programs check skill and judge pairs (e.g. 'demo'); '' = none"),
        "judge": F("", "who judges the win-rates: reward:PATH (a reward model), llm:PATH (a causal LM asked "
                       "eval.judge_template in both orders), likelihood:PATH or a bare PATH (the higher mean token "
                       "log-prob), or '' = the task's judge"),
        "judge_template": F("", "the llm judge's question, with {prompt}, {first} and {second}; it is answered "
                                "with A or B; '' = the built-in helpful/honest/harmless question"),
        "kl_samples": F(32, "held-out prompts each model samples (temperature 1) to estimate its KL from the SFT "
                            "model; 0 = off"),
        "prompts": F("", "held-out prompts (JSONL: prompt + the task's fields) for generative eval; heldout = the "
                         "prompts of the held-out pairs (eval.preference_data, or DPO's validation split)"),
        "sft_data": F("", "held-out SFT data for NLL / perplexity; '' = the SFT stage's data.eval"),
        "preference_data": F("", "held-out pairs for implicit-reward accuracy; '' = the DPO stage's data.eval"),
    },
    "generate": {
        "max_new_tokens": F(128, "max tokens generated per prompt"),
        "temperature": F(0.0, "sampling temperature; 0 = greedy"),
        "top_k": F(0, "keep the k most likely tokens; 0 = off"),
        "top_p": F(1.0, "nucleus sampling mass; 1.0 = off"),
        "stop": F([], "extra stop strings (EOS always stops)"),
    },
    "export": {
        "format": F("merged", "the pipeline's export of the DPO model: merged = one HF model; peft = (LoRA) the "
                    "adapters as a PEFT directory, their base as an HF model in its base/", ("merged", "peft")),
    },
    "pipeline": {
        "stages": F(["sft", "dpo"], "the stages `jaxalign pipeline` trains, in order: [sft, P] (P = dpo, kto, orpo "
                    "or simpo, from the SFT model; dpo.overrides set P), [sft, rm, P] (P not kto) to train a reward "
                    "model (from the SFT model, on P's training pairs) that judges the report, or [orpo] / [simpo] "
                    "(one stage from the base model)"),
    },
    "sft": {
        "loss_on": F("completion", "which tokens are trained on", ("completion", "all")),
        "z_loss": F(0.0, "weight of the log(Z)^2 auxiliary loss; 0 = off"),
        "overrides": F({}, "config keys set for the SFT stage of `jaxalign pipeline`, e.g. {data: {train: ...}}"),
    },
    "dpo": {
        "beta": F(0.1, "DPO temperature: strength of the KL penalty to the reference"),
        "loss": F("sigmoid", "the loss, or a list of losses summed with dpo.loss_weights (TRL's loss_type names "
                  "and definitions; sft = token-mean NLL of the chosen replies)", DPO_LOSS_TYPES, STR_OR_LIST),
        "loss_weights": F([], "one weight per dpo.loss entry (TRL's loss_weights); [] = 1 each", type=LIST_FLOAT),
        "label_smoothing": F(0.0, "assumed preference-label noise (conservative sigmoid, robust, exo_pair, aot), "
                          "in [0, 0.5)"),
        "f_divergence_type": F("reverse_kl", "f-DPO's divergence to the reference (TRL's); reverse_kl = DPO",
                               F_DIVERGENCES),
        "f_alpha_divergence_coef": F(0.5, "alpha of f_divergence_type=alpha_divergence"),
        "discopop_tau": F(0.05, "temperature of the discopop loss's mixing"),
        "ld_alpha": F(1.0, "LD-DPO: weight of reply tokens past the shorter reply's length, in [0, 1]; 1 = off"),
        "simpo_gamma": F(0.5, "SimPO's target reward margin (TRL's simpo_gamma)"),
        "use_weighting": F(False, "WPO (TRL's use_weighting): weigh each pair's losses by exp(the mean over its "
                           "chosen reply of log p - log Σp²) times the same over its rejected reply; not trained"),
        "sft_weight": F(0.0, "old spelling of an sft term: sft_weight w means dpo.loss [<loss>, sft] with "
                        "dpo.loss_weights [1, w]; 0 = off"),
        "share_prompt": F(True, "lay a pair out as prompt, chosen, rejected in one row (the prompt computed once; "
                          "each reply attends to the prompt and itself); false = two padded rows per pair"),
        "reference": F("auto", "frozen reference: model = a second copy; adapters_off = with lora, the base "
                       "without the adapters (no copy); precomputed = log-probs scored once; none = no reference "
                       "(CPO, SimPO, ORPO: the log-ratios are the policy's log-probs); auto = none for the "
                       "simpo and orpo losses, else adapters_off with lora, else model",
                       ("auto", "model", "adapters_off", "precomputed", "none")),
        "init_from": F("", "SFT run dir or checkpoint to start from (and use as reference)"),
        "overrides": F({}, "config keys set for the preference stage (dpo, kto, orpo, simpo) of `jaxalign pipeline`, "
                       "e.g. {train: {max_steps: 50}}"),
    },
    "kto": {  # with the dpo section's beta, reference, init_from and share_prompt
        "loss_type": F("kto", "kto, or apo_zero_unpaired (no KL reference point); TRL's KTOConfig.loss_type",
                       ("kto", "apo_zero_unpaired")),
        "desirable_weight": F(1.0, "weight of the desirable examples' losses (TRL's desirable_weight)"),
        "undesirable_weight": F(1.0, "weight of the undesirable examples' losses (TRL's undesirable_weight)"),
    },
    "rm": {
        "center_rewards_coefficient": F(0.0, "weight of (r+ + r-)^2 in the reward model's loss (TRL's; keeps "
                                        "rewards centred on 0); 0 = off"),
        "overrides": F({}, "config keys set for the reward-model stage of `jaxalign pipeline`"),
    },
}


def iter_fields(schema: dict = SCHEMA, prefix: str = ""):
    """Yield (dotted_key, Field) for every key in schema order."""
    for name, node in schema.items():
        if isinstance(node, Field):
            yield prefix + name, node
        else:
            yield from iter_fields(node, prefix + name + ".")


def iter_sections(schema: dict = SCHEMA, prefix: str = ""):
    """Yield the dotted name of every section."""
    for name, node in schema.items():
        if isinstance(node, dict):
            yield prefix + name
            yield from iter_sections(node, prefix + name + ".")
