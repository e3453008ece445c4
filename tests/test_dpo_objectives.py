"""Every DPO loss of TRL 1.16 (`DPOConfig.loss_type`), loss lists with `loss_weights` (MPO), f-DPO's
divergences and LD-DPO's `ld_alpha`, trained side by side with TRL's DPOTrainer; the reference-free
objectives (CPO, SimPO, ORPO: `dpo.reference: none`) beside TRL's CPOTrainer and ORPOTrainer; KTO (`stage:
kto`, from the same pairs as unpaired examples) beside TRL's KTOTrainer.

Oracle: TRL's trainers from the same tiny HF Llama on the same tokenized HH-RLHF pairs (real Llama 2
tokenizer), plain SGD, fp32 (bf16=False): every step's loss and TRL's metrics equal. jaxalign trains through
its own config, loop and shared-prompt layout; TRL through its padded one.
"""

import pathlib

import numpy as np
import pytest
import yaml
from tiny_runs import TINY_LLAMA, read_metrics, short_hh_pairs, stand_in_tokenizer

from jaxalign.config import load_config
from jaxalign.data.pipeline import load_examples
from jaxalign.run.build import check_model_source
from jaxalign.run.loop import train

STEPS, PAIRS = 3, 4
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")

# The SGD learning rate of each case: large enough that the policy leaves the reference in a step, small
# enough that the squared losses (gradients ~1/β) do not diverge and amplify float noise.
SQUARED_LR, LR = 0.02, 2.0
# dpo section -> TRL's DPOConfig fields of the same name (dpo.loss is TRL's loss_type); lr: the case's SGD rate.
CASES = {
    "sigmoid": {"loss": "sigmoid"},
    "hinge": {"loss": "hinge"},
    "ipo": {"loss": "ipo", "lr": SQUARED_LR},
    "robust": {"loss": "robust", "label_smoothing": 0.1},
    # the rest of the list in weighted sums (each formula is also checked alone by hand: tests/test_losses.py)
    "exo_nca_bco_apo_zero": {"loss": ["exo_pair", "nca_pair", "bco_pair", "apo_zero"],
                             "loss_weights": [0.5, 1.0, 0.3, 2.0], "label_smoothing": 0.1},
    "aot_apo_down_discopop": {"loss": ["aot", "aot_unpaired", "apo_down", "discopop"],
                              "loss_weights": [1.0, 0.5, 1.0, 0.7], "label_smoothing": 0.1, "discopop_tau": 0.5},
    "sigmoid_norm_sppo_hard": {"loss": ["sigmoid_norm", "sppo_hard"], "loss_weights": [1.0, 0.2], "lr": SQUARED_LR},
    "mpo_list": {"loss": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    "f_forward_kl": {"loss": "sigmoid", "f_divergence_type": "forward_kl"},
    "f_js": {"loss": ["ipo", "sigmoid_norm"], "f_divergence_type": "js_divergence", "lr": SQUARED_LR},
    "f_alpha": {"loss": ["robust", "hinge"], "f_divergence_type": "alpha_divergence",
                "f_alpha_divergence_coef": 0.3, "label_smoothing": 0.1, "lr": SQUARED_LR},
    "ld_alpha": {"loss": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "ld_alpha": 0.3},
    # WPO; not with sft: TRL 1.16 multiplies its expanded batch loss in place and fails ("more than one element of
    # the written-to tensor refers to a single memory location")
    "wpo": {"loss": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.1], "use_weighting": True},
}


# Reference-free: dpo section -> (TRL trainer, its config fields).
FREE_CASES = {
    "cpo": ({"loss": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "reference": "none"},
            ("cpo", {"loss_type": "sigmoid", "cpo_alpha": 0.5})),
    "cpo_hinge": ({"loss": "hinge", "reference": "none"}, ("cpo", {"loss_type": "hinge", "cpo_alpha": 0.0})),
    "cpo_ipo": ({"loss": ["ipo", "sft"], "reference": "none", "lr": SQUARED_LR},
                ("cpo", {"loss_type": "ipo", "cpo_alpha": 1.0})),
    "simpo": ({"loss": "simpo", "simpo_gamma": 0.3, "label_smoothing": 0.1, "reference": "auto"},  # auto: none
              ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.3, "label_smoothing": 0.1})),
    "orpo": ({"loss": "orpo", "reference": "auto"}, ("orpo", {})),
}


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    """A tiny random Llama saved by transformers, HH pairs, and the tokenized pairs TRL trains on."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("objectives")
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"},
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(root / "hf")
    base = {"stage": "dpo", "model": {"path": str(root / "hf")},
            "tokenizer": {"path": str(shared_data / "llama2-tokenizer.model"), "chat_template": "plain"},
            # replies of different lengths: LD-DPO weighs the difference
            "data": {"train": str(short_hh_pairs(shared_data, root / "pairs.jsonl", PAIRS,
                                                 keep=lambda row: len(row["chosen"]) != len(row["rejected"]))),
                     "max_length": 128,
                     "max_prompt_length": 96, "cache_dir": str(root / "cache")},
            "train": {"batch_size": PAIRS, "max_steps": STEPS, "log_every": 1, "eval_every": 0},
            "optimizer": {"name": "sgd", "b1": 0.0, "schedule": "constant", "max_grad_norm": 0.0,
                          "weight_decay": 0.0},
            "checkpoint": {"every_steps": 0}, "dpo": {"init_from": str(root / "hf"), "reference": "model"}}
    cfg = _write(root, "probe", base, {})
    _, tokenizer = check_model_source(cfg)
    rows = [{k: list(e[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in load_examples(cfg, tokenizer)[0]]
    assert len(rows) == PAIRS and all(r["chosen_ids"][-1] == 2 for r in rows)  # EOS-terminated, as TRL adds it
    assert any(len(r["chosen_ids"]) != len(r["rejected_ids"]) for r in rows)
    return root, base, rows


def _trl_free_log(root: pathlib.Path, rows: list[dict], trainer: str, fields: dict, lr: float) -> list[dict]:
    """TRL's CPOTrainer or ORPOTrainer (no reference model) on the same tokenized pairs."""
    import datasets
    import torch
    import transformers
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    config_cls, trainer_cls = (CPOConfig, CPOTrainer) if trainer == "cpo" else (ORPOConfig, ORPOTrainer)

    class Pretokenized(trainer_cls):  # their tokenize_row's columns, from the rows' ids
        def tokenize_row(self, feature, model=None):
            p = feature["prompt_ids"]
            out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
            for side in ("chosen", "rejected"):
                ids = feature[f"{side}_ids"]
                out |= {f"{side}_input_ids": p + ids, f"{side}_attention_mask": [1] * (len(p) + len(ids)),
                        f"{side}_labels": [-100] * len(p) + ids}
            return out

    args = config_cls(output_dir=str(root / "trl"), per_device_train_batch_size=PAIRS, max_steps=STEPS,
                      learning_rate=lr, lr_scheduler_type="constant", optim="sgd", max_grad_norm=0.0,
                      weight_decay=0.0, warmup_steps=0, bf16=False, fp16=False, logging_steps=1, report_to="none",
                      save_strategy="no", use_cpu=True, seed=0, beta=0.1, max_length=256,
                      **fields)
    data = datasets.Dataset.from_list([{"prompt": "", "chosen": "", "rejected": "", **r} for r in rows])
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32)
    trainer = Pretokenized(model=model, args=args, processing_class=stand_in_tokenizer(), train_dataset=data)
    trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]


def _write(root: pathlib.Path, name: str, base: dict, case: dict):
    dpo = {k: v for k, v in case.items() if k != "lr"}
    cfg = {**base, "output_dir": str(root / name), "dpo": {**base["dpo"], **dpo},
           "optimizer": {**base["optimizer"], "lr": case.get("lr", LR)}}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return load_config(root / f"{name}.yaml")


def _trl_log(root: pathlib.Path, rows: list[dict], case: dict) -> list[dict]:
    """TRL's DPOTrainer on the same tokenized pairs: the DPOConfig fields spelt as in the case's dpo section."""
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    class Pretokenized(DPOTrainer):  # the rows are already TRL's prompt_ids / chosen_ids / rejected_ids
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32)  # noqa: E731
    losses = case["loss"] if isinstance(case["loss"], list) else [case["loss"]]
    fields = {k: v for k, v in case.items() if k not in ("loss", "ld_alpha", "lr")}
    args = DPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=PAIRS, max_steps=STEPS,
                     learning_rate=case.get("lr", LR), lr_scheduler_type="constant", optim="sgd", max_grad_norm=0.0,
                     weight_decay=0.0, warmup_steps=0, bf16=False, fp16=False, logging_steps=1, report_to="none",
                     save_strategy="no", use_cpu=True, seed=0, beta=0.1, loss_type=losses,
                     ld_alpha=case.get("ld_alpha"), **fields)
    trainer = Pretokenized(model=load(), ref_model=load(), args=args, processing_class=stand_in_tokenizer(),
                           train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]


def _train(root: pathlib.Path, base: dict, case: str, section: dict) -> dict[int, dict]:
    summary = train(_write(root, case, base, section))
    assert summary["state"] == "finished" and summary["steps"] == STEPS
    return read_metrics(root / case)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_training_equals_trl_dpo_trainer(setup, case):
    root, base, rows = setup
    _equal_steps(case, _train(root, base, case, CASES[case]), _trl_log(root, rows, CASES[case]), METRICS)


@pytest.mark.parametrize("case", list(FREE_CASES))
def test_reference_free_training_equals_trl_cpo_and_orpo_trainers(setup, case):
    root, base, rows = setup
    section, (trainer, fields) = FREE_CASES[case]
    ours = _train(root, base, case, section)
    theirs = _trl_free_log(root, rows, trainer, fields, section.get("lr", LR))
    extra = ("nll_loss",) * ("sft" in section["loss"] or case == "orpo") + ("log_odds_ratio", "log_odds_chosen") * (
        case == "orpo")
    _equal_steps(case, ours, theirs, METRICS + extra)


def _equal_steps(case: str, ours: dict[int, dict], theirs: list[dict], keys: tuple[str, ...]) -> None:
    assert len(theirs) == STEPS
    for step, t in enumerate(theirs, start=1):
        for key in keys:
            np.testing.assert_allclose(ours[step][key], t[key], rtol=2e-5, atol=2e-6, err_msg=f"{case} step {step} {key}")
        if "rewards/accuracies" in t:  # KTO's trainer logs none
            assert ours[step]["rewards/accuracies"] == pytest.approx(t["rewards/accuracies"], abs=1e-6), (case, step)
    # the policy moved, so the later steps compare losses off their step-0 values
    assert abs(ours[STEPS]["rewards/margins"] - ours[1]["rewards/margins"]) > 1e-3, ours[STEPS]


KTO_CASES = {
    "kto": ({"reference": "model"}, {"loss_type": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.5}),
    "kto_precomputed": ({"reference": "precomputed"}, {"loss_type": "kto", "desirable_weight": 0.7}),
    "apo_zero_unpaired": ({"reference": "model"}, {"loss_type": "apo_zero_unpaired"}),
}


def _trl_kto_log(root: pathlib.Path, rows: list[dict], fields: dict, precompute: bool) -> list[dict]:
    """TRL's KTOTrainer on the pairs as unpaired rows (all chosen, desirable, then all rejected, as TRL's
    `unpair_preference_dataset` orders them), each with its KL completion by TRL's rule: the completions
    rotated by one within the batch (here all 2 * PAIRS examples)."""
    import datasets
    import torch
    import transformers
    from trl import KTOConfig, KTOTrainer

    unpaired = ([{"prompt_ids": r["prompt_ids"], "completion_ids": r["chosen_ids"], "label": True} for r in rows]
                + [{"prompt_ids": r["prompt_ids"], "completion_ids": r["rejected_ids"], "label": False} for r in rows])
    completions = [u["completion_ids"] for u in unpaired]
    for u, kl in zip(unpaired, completions[-1:] + completions[:-1]):
        u["KL_completion_ids"] = kl

    class Pretokenized(KTOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32)  # noqa: E731
    args = KTOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=2 * PAIRS, max_steps=STEPS,
                     learning_rate=LR, lr_scheduler_type="constant", optim="sgd", max_grad_norm=0.0,
                     weight_decay=0.0, warmup_steps=0, bf16=False, fp16=False, logging_steps=1, report_to="none",
                     save_strategy="no", use_cpu=True, seed=0, beta=0.1, precompute_ref_log_probs=precompute, **fields)
    trainer = Pretokenized(model=load(), ref_model=load(), args=args, processing_class=stand_in_tokenizer(),
                           train_dataset=datasets.Dataset.from_list(unpaired))
    trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]


@pytest.mark.parametrize("case", list(KTO_CASES))
def test_kto_training_equals_trl_kto_trainer(setup, case):
    root, base, rows = setup
    dpo, fields = KTO_CASES[case]
    kto_base = {**base, "stage": "kto", "train": {**base["train"], "batch_size": 2 * PAIRS}, "kto": fields}
    ours = _train(root, kto_base, case, dpo)
    theirs = _trl_kto_log(root, rows, fields, dpo["reference"] == "precomputed")
    _equal_steps(case, ours, theirs, METRICS + ("kl",))
