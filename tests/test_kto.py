"""KTO's pieces by hand: the loss and metrics, the examples (completion, KL completion, label) over a store of
unpaired rows or of pairs, the unpaired row format, and the config rules. Trained beside TRL's KTOTrainer in
tests/test_dpo_objectives.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.config import load_config
from jaxalign.data.formats import BadRow, detect_format, resolve_format
from jaxalign.data.kto import UnpairedExamples
from jaxalign.data.preference import Unpaired, normalize_unpaired_row
from jaxalign.errors import JaxalignError
from jaxalign.run.build import reference_kind
from jaxalign.train.kto import KTOLoss, kto_loss

BETA = 0.1


def sig(x):
    return 1 / (1 + np.exp(-x))


def test_kto_loss_and_metrics_by_hand():
    # 4 examples (2 desirable), then their KL completions; the last example is padding
    policy = np.array([-10.0, -12.0, -9.0, -30.0, -11.0, -13.0, -8.0, -31.0], np.float32)
    ref = np.array([-11.0, -11.0, -10.0, -30.0, -12.0, -12.5, -9.0, -31.0], np.float32)
    labels = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
    valid = np.array([True, True, True, False])
    norms = {"examples": jnp.int32(3), "desirable": jnp.int32(2), "undesirable": jnp.int32(1)}
    spec = KTOLoss(beta=BETA, desirable_weight=0.7, undesirable_weight=1.5)
    loss, m = kto_loss(jnp.asarray(policy), jnp.asarray(ref), jnp.asarray(labels), norms, spec, jnp.asarray(valid))
    delta = (policy[:4] - ref[:4])[:3]  # [1, -1, 1]
    z0 = max(0.0, float(np.mean((policy[4:] - ref[4:])[:3])))  # mean of [1, -0.5, 1] = 0.5
    want = [0.7 * (1 - sig(BETA * (delta[0] - z0))), 1.5 * (1 - sig(BETA * (z0 - delta[1]))),
            0.7 * (1 - sig(BETA * (delta[2] - z0)))]
    assert float(loss) == pytest.approx(np.mean(want), rel=1e-6)
    assert float(m["kl"]) == pytest.approx(z0, rel=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(BETA * 1.0, rel=1e-6)
    assert float(m["rewards/rejected"]) == pytest.approx(BETA * -1.0, rel=1e-6)
    assert float(m["rewards/margins"]) == pytest.approx(0.2, rel=1e-6)
    assert float(m["logps/chosen"]) == pytest.approx(-9.5) and float(m["logps/rejected"]) == pytest.approx(-12.0)
    # KL estimate below 0 is clamped; APO-zero (unpaired) has no reference point
    _, m = kto_loss(jnp.asarray(policy), jnp.asarray(ref) + jnp.asarray([0, 0, 0, 0, 5, 5, 5, 5.0]),
                    jnp.asarray(labels), norms, spec, jnp.asarray(valid))
    assert float(m["kl"]) == 0.0
    loss, _ = kto_loss(jnp.asarray(policy), jnp.asarray(ref), jnp.asarray(labels), norms,
                       KTOLoss(beta=BETA, loss_type="apo_zero_unpaired"), jnp.asarray(valid))
    assert float(loss) == pytest.approx(np.mean([1 - sig(BETA), sig(-BETA), 1 - sig(BETA)]), rel=1e-6)


class FakeStore:
    def __init__(self, rows, columns):
        self.rows, self.columns = rows, columns

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def column_lengths(self, column):
        return np.array([len(r[column]) for r in self.rows])

    content_hash = "h"


def test_examples_from_pairs_and_their_kl_completions():
    """Pairs give their chosen replies (desirable), then their rejected ones; each example's KL completion is
    the previous example's completion within blocks of the batch size, the block's first taking its last."""
    pairs = [{"prompt_ids": [p], "chosen_ids": [10 + p] * (p + 1), "rejected_ids": [20 + p]} for p in range(3)]
    ex = UnpairedExamples(FakeStore(pairs, {"prompt_ids": 0, "chosen_ids": 0, "rejected_ids": 0}), block=4,
                          max_length=64)
    assert len(ex) == 6
    got = [ex[i] for i in range(6)]
    assert [e["label"] for e in got] == [1, 1, 1, 0, 0, 0]
    assert [e["chosen_ids"][0] for e in got] == [10, 11, 12, 20, 21, 22]
    # blocks [0..3] and [4, 5]: rotated by one inside each
    assert [e["rejected_ids"][0] for e in got] == [20, 10, 11, 12, 22, 21]
    assert [e["prompt_ids"] for e in got] == [[0], [1], [2], [0], [1], [2]]
    lengths = ex.lengths()
    assert lengths.tolist() == [[1 + len(e["chosen_ids"]), 1 + len(e["rejected_ids"])] for e in got]
    scored = ex.with_scalars(ref_chosen_logp=np.arange(6.0), ref_rejected_logp=-np.arange(6.0))
    assert scored[4]["ref_chosen_logp"] == 4.0 and scored[4]["ref_rejected_logp"] == -4.0
    rows = [{"prompt_ids": [1], "completion_ids": [5, 6], "label": 0.0},
            {"prompt_ids": [2], "completion_ids": [7], "label": 1.0}]
    ex = UnpairedExamples(FakeStore(rows, {"prompt_ids": 0, "completion_ids": 0}), block=8, max_length=64)
    assert [ex[i]["label"] for i in range(2)] == [0.0, 1.0] and ex[0]["rejected_ids"] == [7]
    # a KL completion is cut to fit max_length after this example's prompt, as TRL's collator cuts its rows
    rows = [{"prompt_ids": [1, 2, 3], "completion_ids": [4], "label": 1.0},
            {"prompt_ids": [5], "completion_ids": [6, 7, 8, 9], "label": 0.0}]
    ex = UnpairedExamples(FakeStore(rows, {"prompt_ids": 0, "completion_ids": 0}), block=2, max_length=5)
    assert ex[0]["rejected_ids"] == [6, 7] and ex[1]["rejected_ids"] == [4]
    assert ex.lengths().tolist() == [[4, 5], [5, 2]]


def test_unpaired_rows():
    assert detect_format(["prompt", "completion", "label"]) == "unpaired"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert normalize_unpaired_row({"prompt": "Hi", "completion": " there", "label": False}) == Unpaired("Hi", " there",
                                                                                                         False)
    msgs = normalize_unpaired_row({"prompt": [{"role": "user", "content": "Hi"}],
                                   "completion": [{"role": "assistant", "content": "Yo"}], "label": True})
    assert msgs.label and msgs.prompt == ({"role": "user", "content": "Hi"},)
    with pytest.raises(BadRow, match="'label' must be true"):
        normalize_unpaired_row({"prompt": "Hi", "completion": "x", "label": 1})
    with pytest.raises(BadRow, match="both be strings or both message lists"):
        normalize_unpaired_row({"prompt": "Hi", "completion": [{"role": "assistant", "content": "x"}], "label": True})


def test_kto_config_rules():
    cfg = load_config(None, ["stage=kto", "kto.desirable_weight=1.3", "kto.loss_type=apo_zero_unpaired"])
    assert cfg.kto.desirable_weight == 1.3
    with pytest.raises(JaxalignError, match=r"'data\.format' must be 'auto', 'unpaired' or 'preference' for stage kto"):
        load_config(None, ["stage=kto", "data.format=messages"])
    with pytest.raises(JaxalignError, match=r"'data\.streaming' is not supported with stage kto"):
        load_config(None, ["stage=kto", "data.streaming=true", "train.max_steps=3"])
    with pytest.raises(JaxalignError, match=r"'dpo\.reference' cannot be none for stage kto"):
        load_config(None, ["stage=kto", "dpo.reference=none"])
    # the dpo section's losses do not decide KTO's reference
    assert reference_kind(load_config(None, ["stage=kto", "dpo.loss=simpo"])) == "model"
    with pytest.raises(JaxalignError, match=r"'kto\.loss_type' must be one of"):
        load_config(None, ["stage=kto", "kto.loss_type=sigmoid"])
    with pytest.raises(JaxalignError, match="KTO's data; use stage: kto"):
        resolve_format(["prompt", "completion", "label"], "auto", "sft")
    with pytest.raises(JaxalignError, match="stage kto needs unpaired rows"):
        resolve_format(["messages"], "auto", "kto")


def test_the_report_finds_no_held_out_pairs_in_unpaired_kto_data(tmp_path):
    """A [sft, kto] pipeline on unpaired rows (format auto or declared) measures no pairs; on pairs it does."""
    import json

    from jaxalign.config import load_config, stage_config
    from jaxalign.eval.evaluate import _unpaired

    unpaired, pairs = tmp_path / "u.jsonl", tmp_path / "p.jsonl"
    unpaired.write_text(json.dumps({"prompt": "Hi", "completion": "Hello", "label": True}) + "\n")
    pairs.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}) + "\n")
    for path, fmt, want in ((unpaired, "auto", True), (unpaired, "unpaired", True), (pairs, "auto", False)):
        cfg = load_config(None, ["pipeline.stages=[sft, kto]", f"dpo.overrides.data.train={path}",
                                 f"dpo.overrides.data.format={fmt}", f"data.cache_dir={tmp_path / 'cache'}"])
        assert _unpaired(stage_config(cfg, "kto")) is want, (path.name, fmt)
    assert _unpaired(stage_config(load_config(None, [f"data.train={unpaired}"]), "dpo")) is False
