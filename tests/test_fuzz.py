"""Fuzzing (hypothesis, bounded): random rows, sequences and configs never crash with an unexplained
traceback. A row either tokenizes into a well-formed example or is refused with a BadRow naming the
problem; packing keeps every token, never lets a segment see another, and trains only on targets of
the same segment; any config file or override either loads or raises JaxalignError.

Rows go through the per-row path of `tokenize_dataset` (normalize, then tokenize) with the real
Llama 2 SentencePiece tokenizer and the `plain` template, and once through files on disk
(load_rows -> tokenize_dataset) to count that no row disappears silently.
"""

import json

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings, strategies as st

from jaxalign.config import load_config
from jaxalign.data.examples import TokenizeSettings, tokenize_preference_example, tokenize_replies, tokenize_sft_example
from jaxalign.data.formats import SFT_FORMATS, BadRow, normalize_sft_row
from jaxalign.data.packing import pack_bfd, pack_rows
from jaxalign.data.preference import normalize_preference_row, normalize_unpaired_row, preference_to_sft
from jaxalign.errors import JaxalignError
from jaxalign.models.attention import attention_mask

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROWS = settings(FUZZ, max_examples=100)

# --- strategies ---------------------------------------------------------------------------------------

# Any unicode (no lone surrogates: they cannot come out of a UTF-8 file), plus strings that matter here.
TEXT = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(["", " ", "\n\n", "</s>", "<s>", "<unk>", "\x00", "🙂" * 20, "ß" * 3, "\u200b", "Human:",
                     "\n\nHuman: hi\n\nAssistant: hello", "\n\nAssistant:", "{{ bos_token }}", "{% raw %}"]),
    st.builds(lambda s, n: s * n, st.sampled_from(["a ", "word ", "汉字", "\n"]), st.integers(500, 3000)),  # huge
)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), TEXT)
ROLE = st.one_of(st.sampled_from(["user", "assistant", "system", "human", "gpt", "bot", "", "USER"]), SCALAR,
                 st.lists(SCALAR, max_size=2), st.dictionaries(st.text(max_size=3), SCALAR, max_size=2))
MESSAGE = st.one_of(
    st.fixed_dictionaries({}, optional={"role": ROLE, "content": st.one_of(TEXT, SCALAR), "from": ROLE,
                                        "value": st.one_of(TEXT, SCALAR), "extra": SCALAR}),
    SCALAR, st.lists(SCALAR, max_size=2))
MESSAGES = st.lists(MESSAGE, max_size=6)
# Chat-like message lists that often pass validation, so the tokenizer and masks are reached too.
GOOD_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                                "content": TEXT}), min_size=1, max_size=5)
VALUE = st.one_of(SCALAR, MESSAGES, GOOD_MESSAGES, st.dictionaries(st.text(max_size=5), SCALAR, max_size=3))
HH_TURN = st.tuples(st.sampled_from(["\n\nHuman:", "\n\nAssistant:", "\n\nHuman: ", "\n\nAssistant: ", ""]), TEXT)
HH = st.lists(HH_TURN, max_size=5).map(lambda turns: "".join(a + b for a, b in turns))

SFT_FIELDS = ["text", "prompt", "completion", "messages", "instruction", "input", "output", "conversations",
              "_source", "_row", "other"]
# "from" values are hashable here: an unhashable one is a known bug (test_sharegpt_role_of_a_wrong_type below).
SHAREGPT = st.lists(st.fixed_dictionaries({"from": st.one_of(st.sampled_from(["human", "gpt", "system"]), SCALAR),
                                           "value": st.one_of(TEXT, SCALAR)}), max_size=5)
WORDS = TEXT.filter(lambda t: t.strip())
# user/assistant exchanges (optionally after a system turn): valid chats, so the tokenizer and masks are reached.
CHAT = st.builds(lambda system, pairs: system + [m for u, a in pairs for m in (
    {"role": "user", "content": u}, {"role": "assistant", "content": a})],
    st.lists(st.builds(lambda t: {"role": "system", "content": t}, WORDS), max_size=1),
    st.lists(st.tuples(WORDS, WORDS), min_size=1, max_size=3))
LIKELY = st.one_of(WORDS, WORDS, VALUE)  # mostly well-typed, sometimes not
# (format, row): rows shaped like their format (so most reach the tokenizer), and rows of random fields.
SFT_ROW = st.one_of(
    st.tuples(st.just("text"), st.fixed_dictionaries({"text": LIKELY})),
    st.tuples(st.just("prompt_completion"), st.fixed_dictionaries({"prompt": LIKELY, "completion": LIKELY})),
    st.tuples(st.just("prompt_completion"), st.builds(lambda chat: {"prompt": chat[:-1], "completion": chat[-1:]},
                                                      CHAT)),
    st.tuples(st.just("messages"), st.fixed_dictionaries({"messages": st.one_of(CHAT, CHAT, MESSAGES, VALUE)})),
    st.tuples(st.just("alpaca"), st.fixed_dictionaries({"instruction": LIKELY, "output": LIKELY},
                                                        optional={"input": LIKELY})),
    st.tuples(st.just("sharegpt"), st.fixed_dictionaries({"conversations": st.one_of(SHAREGPT, VALUE)})),
    st.tuples(st.sampled_from(SFT_FORMATS),
              st.dictionaries(st.sampled_from(SFT_FIELDS), VALUE, max_size=6)),
)
PREFERENCE_ROW = st.one_of(
    st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "other"]), VALUE, max_size=4),
    st.fixed_dictionaries({"chosen": HH, "rejected": HH}),
    st.builds(lambda shared, a, b: {"chosen": shared + "\n\nAssistant:" + a, "rejected": shared + "\n\nAssistant:" + b},
              HH.map(lambda h: "\n\nHuman: q" + h), TEXT, TEXT),
    st.fixed_dictionaries({"prompt": GOOD_MESSAGES, "chosen": GOOD_MESSAGES, "rejected": GOOD_MESSAGES}),
    st.builds(lambda chat, a, b: {"prompt": chat[:-1], "chosen": [{"role": "assistant", "content": a}],
                                  "rejected": [{"role": "assistant", "content": b}]}, CHAT, WORDS, WORDS),
    st.builds(lambda chat, b: {"chosen": chat, "rejected": chat[:-1] + [{"role": "assistant", "content": b}]},
              CHAT, WORDS),
    st.fixed_dictionaries({"prompt": TEXT, "chosen": TEXT, "rejected": TEXT}),
    st.fixed_dictionaries({"prompt": WORDS, "chosen": WORDS, "rejected": WORDS}),
)
SETTINGS = st.builds(TokenizeSettings, max_length=st.sampled_from([0, 1, 2, 8, 64, 512]),
                     max_prompt_length=st.sampled_from([0, 1, 4, 32]),
                     truncation=st.sampled_from(["keep_end", "keep_start"]),
                     loss_on=st.sampled_from(["completion", "all"]))


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    from jaxalign.data.tokenizer import load_tokenizer

    return load_tokenizer(str(shared_data / "llama2-tokenizer.model"), "plain")


def explained(error: BaseException) -> bool:
    """A refusal a user can act on: our exception type with a message."""
    return isinstance(error, JaxalignError) and len(str(error).strip()) > 10


# --- rows -----------------------------------------------------------------------------------------------

@ROWS
@given(fmt_row=SFT_ROW, settings_=SETTINGS)
def test_sft_rows_tokenize_or_are_refused_with_a_reason(tokenizer, fmt_row, settings_):
    fmt, row = fmt_row
    try:
        example, flags = tokenize_sft_example(normalize_sft_row(row, fmt), tokenizer, settings_)
    except BadRow as e:
        assert explained(e) and e.reason, (row, e)
        event(f"refused: {e.reason}")
        return
    event("tokenized")
    ids, mask = example["input_ids"], example["loss_mask"]
    assert len(ids) == len(mask) > 0 and any(mask)
    assert settings_.max_length <= 0 or len(ids) <= settings_.max_length
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert set(flags) >= {"_truncated_prompt", "_truncated_completion", "_prompt_not_prefix"}


@ROWS
@given(row=PREFERENCE_ROW, stage=st.sampled_from(["sft", "dpo"]), settings_=SETTINGS)
def test_preference_rows_tokenize_or_are_refused_with_a_reason(tokenizer, row, stage, settings_):
    try:
        pref = normalize_preference_row(row)
        if stage == "sft":
            example, _ = tokenize_sft_example(preference_to_sft(pref), tokenizer, settings_)
        else:
            example, _ = tokenize_preference_example(pref, tokenizer, settings_)
    except BadRow as e:
        assert explained(e) and e.reason, (row, e)
        event(f"refused: {e.reason}")
        return
    event(f"tokenized ({stage})")
    if stage == "sft":
        assert len(example["input_ids"]) == len(example["loss_mask"]) and any(example["loss_mask"])
        return
    prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
    assert chosen and rejected  # an empty completion would give a NaN mean log-prob later
    assert settings_.max_length <= 0 or len(prompt) + max(len(chosen), len(rejected)) <= settings_.max_length
    assert all(0 <= i < tokenizer.vocab_size for i in prompt + chosen + rejected)


UNPAIRED_ROW = st.one_of(
    st.dictionaries(st.sampled_from(["prompt", "completion", "label", "other"]), VALUE, max_size=4),
    st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT, "label": st.booleans()}),
    st.builds(lambda chat, a, label: {"prompt": chat[:-1], "completion": [{"role": "assistant", "content": a}],
                                      "label": label}, CHAT, WORDS, st.booleans()),
)


@ROWS
@given(row=UNPAIRED_ROW, settings_=SETTINGS)
def test_unpaired_rows_tokenize_or_are_refused_with_a_reason(tokenizer, row, settings_):
    """KTO's rows {prompt, completion, label}: tokenized, or refused with a reason."""
    try:
        ex = normalize_unpaired_row(row)
        prompt, (completion,), _ = tokenize_replies(ex.prompt, (ex.completion,), tokenizer, settings_)
    except BadRow as e:
        assert explained(e) and e.reason, (row, e)
        event(f"refused: {e.reason}")
        return
    event("tokenized")
    assert completion and isinstance(ex.label, bool)
    assert settings_.max_length <= 0 or len(prompt) + len(completion) <= settings_.max_length


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(rows=st.lists(st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT}), min_size=1, max_size=12))
def test_no_row_is_lost_silently_through_files(tokenizer, tmp_path_factory, rows):
    """Rows written to JSONL, read back and tokenized with data.on_bad_row=skip: every row is either
    an example or a counted drop (rows_in == rows_out + dropped, reasons named)."""
    from jaxalign.data.sources import load_rows
    from jaxalign.data.tokenize import tokenize_dataset

    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = {"format": "auto", "max_length": 64, "max_prompt_length": 32, "truncation": "keep_end",
            "on_bad_row": "skip", "sft_from_preference": False, "cache_dir": ""}
    try:
        examples, stats = tokenize_dataset(load_rows(str(path)), tokenizer, data, "sft", source=str(path))
    except JaxalignError as e:  # every row dropped: named, with the reasons
        assert "dropped" in str(e), e
        event("all rows dropped")
        return
    event(f"{stats.rows_out} of {len(rows)} kept" if stats.rows_out < len(rows) else "all kept")
    assert stats.rows_in == len(rows) == stats.rows_out + stats.dropped == len(examples) + stats.dropped
    assert all(stats.first_drop.get(reason) for reason in stats.dropped_by_reason)


@pytest.mark.parametrize("who", [["human"], {"a": 1}])
def test_sharegpt_role_of_a_wrong_type(who):
    with pytest.raises(BadRow, match=r"conversations\[0\]\.from"):
        normalize_sft_row({"conversations": [{"from": who, "value": "hi"}]}, "sharegpt")


# --- packing ----------------------------------------------------------------------------------------------

SEQUENCE = st.integers(1, 48).flatmap(lambda n: st.fixed_dictionaries({
    "input_ids": st.lists(st.integers(3, 31999), min_size=n, max_size=n),
    "loss_mask": st.lists(st.booleans(), min_size=n, max_size=n)}))


@settings(max_examples=100, deadline=None)
@given(sequences=st.lists(SEQUENCE, min_size=1, max_size=24), capacity=st.sampled_from([48, 64, 100]))
def test_packing_keeps_every_token_and_separates_segments(sequences, capacity):
    bins = pack_bfd([len(s["input_ids"]) for s in sequences], capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(sequences)))  # each sequence exactly once
    batch = pack_rows([[sequences[i] for i in b] for b in bins], capacity, pad_id=0)
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["loss_mask"]
    seg, pos = batch["segment_ids"], batch["positions"]
    assert int(np.count_nonzero(seg)) == sum(len(s["input_ids"]) for s in sequences)  # no token lost
    for r, b in enumerate(bins):
        start = 0
        for k, i in enumerate(b, start=1):
            ids, m = sequences[i]["input_ids"], sequences[i]["loss_mask"]
            end = start + len(ids)
            assert tokens[r, start:end].tolist() == ids and (seg[r, start:end] == k).all()
            assert pos[r, start:end].tolist() == list(range(len(ids)))
            # Targets are the next token of the same sequence; the last token predicts nothing.
            assert targets[r, start:end - 1].tolist() == ids[1:]
            assert mask[r, start:end - 1].tolist() == m[1:] and not mask[r, end - 1]
            start = end
        assert (seg[r, start:] == 0).all() and not mask[r, start:].any()  # padding: no segment, no loss
    # loss_mask only where the target is a real token of the same segment.
    nxt = np.concatenate([seg[:, 1:], np.zeros_like(seg[:, :1])], axis=1)
    assert not (mask & ((seg == 0) | (nxt != seg))).any()
    # Attention never crosses segments and never sees padding or the future.
    allowed = np.asarray(attention_mask(seg, seg))
    for r in range(seg.shape[0]):
        qs, ks = np.nonzero(allowed[r])
        assert (seg[r, qs] == seg[r, ks]).all() and (seg[r, ks] > 0).all() and (ks <= qs).all()


@FUZZ
@given(lengths=st.lists(st.integers(-3, 80), max_size=20), capacity=st.integers(1, 64))
def test_packing_refuses_what_does_not_fit_with_a_reason(lengths, capacity):
    try:
        bins = pack_bfd(lengths, capacity)
    except JaxalignError as e:
        assert "cannot pack item" in str(e)
        assert max(lengths) > capacity or min(lengths) < 0
        return
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)


# --- configs ----------------------------------------------------------------------------------------------

KEYS = st.sampled_from(["stage", "output_dir", "model", "model.path", "model.config", "model.dtype", "train",
                        "train.batch_size", "train.max_steps", "train.on_nonfinite", "optimizer.lr", "dpo.beta",
                        "dpo.loss", "data.train", "data.max_length", "mesh.fsdp", "mesh.rules", "checkpoint.keep",
                        "nope", "train.nope", "", ".", "a..b", "model.config.hidden_size", "sft.overrides"])
YAML_VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                          max_leaves=8)


def nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node, parts = out, [p for p in key.split(".") if p] or ["_"]
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[parts[-1]] = value
    return out


PLAUSIBLE = st.sampled_from(["train.batch_size=4", "dpo.beta=0.2", "stage=dpo", "train.max_steps=-1",
                             "optimizer.lr=1e-5", "mesh.fsdp=2", "model.config={hidden_size: 8}", "data.train=x.jsonl",
                             "train.on_nonfinite=stop", "checkpoint.keep=0", "train.batch_size=0", "dpo.beta=-1"])


@FUZZ
@given(flat=st.dictionaries(KEYS, st.one_of(YAML_VALUE, st.integers(-2, 64)), max_size=5),
       overrides=st.lists(st.one_of(PLAUSIBLE, st.builds(lambda k, v: f"{k}={v}", KEYS, TEXT), TEXT), max_size=3))
def test_random_configs_load_or_raise_jaxalign_error(tmp_path_factory, flat, overrides):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(nest(flat), allow_unicode=True), encoding="utf-8")
    try:
        cfg = load_config(path, overrides)
    except JaxalignError as e:
        assert explained(e), e
        event("refused")
        return
    event("loaded")
    assert cfg.stage in ("sft", "dpo")


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.sampled_from([
    "stage: [", "a: b: c", "- 1\n- 2", "!!binary aGk=", "stage: !!python/name:os.system", "&a [*a]", "\t",
    "model: {config: {hidden_size: -1}}", "train: {batch_size: 1e400}", "optimizer: {lr: .nan}"])))
def test_random_config_text_loads_or_raises_jaxalign_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="replace")  # invalid UTF-8: test_config_file_not_utf8
    try:
        load_config(path)
    except JaxalignError as e:
        assert explained(e), e
        event("refused")
        return
    event("loaded")


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("output_dir: /tmp/caf\xe9\n".encode("latin-1"))
    with pytest.raises(JaxalignError, match="latin1.yaml"):
        load_config(path)
