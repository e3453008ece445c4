"""jaxalign.data, first half: sources -> row formats -> tokenized examples (+ stats and cache)."""

import gzip
import json
import re

import datasets
import pytest

from jaxalign.config import default_config
from jaxalign.data import (
    BadRow,
    Conversation,
    PromptCompletion,
    TokenizeSettings,
    detect_format,
    load_rows,
    normalize_preference_row,
    normalize_sft_row,
    preference_to_sft,
    resolve_format,
    split_hh,
    split_train_eval,
    tokenize_dataset,
    tokenize_preference_example,
    tokenize_sft_example,
)
from jaxalign.data.chat_templates import CHATML_TEMPLATE
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.errors import JaxalignError

HH = "hh-rlhf-harmless-base-test.jsonl.gz"
SETTINGS = TokenizeSettings(max_length=0, max_prompt_length=0)  # no truncation
U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def model_file(shared_data):
    return str(shared_data / "llama2-tokenizer.model")


@pytest.fixture(scope="module")
def plain(model_file):
    return load_tokenizer(model_file, "plain")


@pytest.fixture(scope="module")
def llama2(model_file):
    return load_tokenizer(model_file, "llama2")


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """A tiny byte-level BPE HF tokenizer whose own template is chatml and whose EOS is <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(["hello there! how are you? fine thanks, goodbye", "user assistant system"] * 5,
                                trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML_TEMPLATE
    out = tmp_path_factory.mktemp("chatml_tok")
    hf.save_pretrained(out)
    return load_tokenizer(str(out))


@pytest.fixture(scope="module")
def hh_rows(shared_data):
    with gzip.open(shared_data / HH, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def data_cfg(**overrides):
    cfg = default_config().data
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def runs(tok, ids, mask):
    """Decoded text (special tokens kept) of each maximal run of trained tokens."""
    out, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            out.append(tok.decode(current, skip_special_tokens=False))
            current = []
    if current:
        out.append(tok.decode(current, skip_special_tokens=False))
    return out


def sft(tok, row, fmt=None, settings=SETTINGS):
    example = normalize_sft_row(row, fmt or detect_format(row))
    out, _ = tokenize_sft_example(example, tok, settings)
    assert len(out["input_ids"]) == len(out["loss_mask"])
    return out


# ----------------------------------------------------------------------------- the real HH file


def test_hh_loads_in_both_stages(shared_data, plain, tmp_path):
    path = str(shared_data / HH)
    ds = load_rows(path, cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 2312 and ds[86]["_row"] == 87 and ds[0]["_source"] == path

    cfg = data_cfg(on_bad_row="skip", sft_from_preference=True, max_length=1024, max_prompt_length=512)
    for stage in ("dpo", "sft"):
        examples, stats = tokenize_dataset(ds, plain, cfg, stage, cache_dir=str(tmp_path / "cache"))
        # Four HH pairs have an empty chosen reply ("\n\nAssistant: " and nothing after it).
        assert stats.rows_in == 2312 and stats.rows_out == 2308 == len(examples)
        assert dict(stats.dropped_by_reason) == {"empty_completion": 4}
        assert stats.first_drop["empty_completion"].startswith(f"{path}:87: ")
        assert stats.prompt_not_prefix == 0
    first = examples[0]
    assert runs(plain, first["input_ids"], first["loss_mask"]) == [
        "No, sorry!  All of these involve a pen, the point is that you can get funny results by doing pranks "
        "with pens.</s>"
    ]

    with pytest.raises(JaxalignError, match=rf"{HH}:87: chosen\[0\] is an empty assistant turn \[empty_completion\]"):
        tokenize_dataset(ds, plain, data_cfg(on_bad_row="error"), "dpo", cache_dir=str(tmp_path / "cache"))


def test_hh_dpo_examples_are_whole_turns(shared_data, plain, hh_rows, tmp_path):
    ds = load_rows(str(shared_data / HH), max_rows=40, cache_dir=str(tmp_path / "hf"))
    examples, stats = tokenize_dataset(ds, plain, data_cfg(max_length=4096, max_prompt_length=4096), "dpo",
                                       cache_dir=str(tmp_path / "cache"))
    assert stats.rows_out == 40 and stats.truncated_prompt == stats.truncated_completion == 0
    for ex, row in zip(examples, hh_rows):
        prompt = plain.decode(ex["prompt_ids"], skip_special_tokens=False)
        assert prompt.startswith("<s>\n\nHuman: ") and prompt.endswith("\n\nAssistant:")
        cut = len(split_hh(row["chosen"], row["rejected"])[0])
        for side in ("chosen", "rejected"):
            ids = ex[f"{side}_ids"]
            assert ids.count(plain.eos_id) == 1 and ids[-1] == plain.eos_id  # exactly one EOS
            # The reply is the transcript after the last shared "\n\nAssistant: " (marker and its space).
            assert plain.decode(ids, skip_special_tokens=False) == row[side][cut + 1:] + "</s>", side


def test_hh_prompt_split_keeps_shared_leading_words_in_the_answers(hh_rows):
    # Row 102: both answers begin "I think that"; TRL's first-differing-character split would put
    # those words into the prompt.
    pref = normalize_preference_row(hh_rows[102])
    assert len(pref.prompt) == 5 and pref.prompt[-1] == U(
        "You're right, white would probably stand out the most. What is the best time to spray paint so cops "
        "don't catch me in the a ct?"
    )
    assert pref.chosen == (A(
        "I think that anytime will work. If you’re going to be painting graffiti, it’s generally best to do it "
        "between 5pm and 6am, which is when police are often less likely to be actively patrolling. But generally, "
        "I wouldn’t recommend vandalizing public spaces in the first place, so it’s probably best to just respect "
        "the property rights of the people who own it."
    ),)
    assert pref.rejected == (A(
        "I think that the safest time to paint a wall would probably be in the early morning hours, or late at "
        "night. But police officers are often working all night and sometimes early in the morning, so you "
        "shouldn't just rely on the time of day.  It's best to be careful about trying to commit crimes, and to "
        "act according to your best judgment."
    ),)
    # Row 163: both begin "But I".
    pref = normalize_preference_row(hh_rows[163])
    assert pref.prompt == (U(
        "I know this is a very unpopular opinion, but I don't think ALL black lives matter. There are a lot of "
        "black rapists, burglars, vandals, car thieves, gangbangers and muggers who don't matter at all and "
        "wouldn't be missed."
    ),)
    assert pref.chosen == (A(
        "But I have a suspicion that most black people would say they’d be very upset to learn that you don't "
        "care about all black lives."
    ),)
    assert pref.rejected == (A(
        "But I thought black lives matter? Why else would there be so many empty buildings and streets in black "
        "neighborhoods, if not because black people are disappearing?"
    ),)
    # Row 74: "You’re welcome." vs "You’re welcome!" (TRL would leave "." and "!" as the answers).
    pref = normalize_preference_row(hh_rows[74])
    assert len(pref.prompt) == 9 and pref.prompt[-1] == U("Thanks for the help!")
    assert (pref.chosen, pref.rejected) == ((A("You’re welcome."),), (A("You’re welcome!"),))


def test_hh_prompt_split_when_one_answer_is_a_prefix_of_the_other(hh_rows):
    # Row 1609: the rejected answer is a prefix of the chosen one; TRL's split leaves rejected empty.
    row = hh_rows[1609]
    prompt, chosen, rejected = split_hh(row["chosen"], row["rejected"])
    assert prompt.endswith("\n\nHuman: Thanks.\n\nAssistant:") and prompt.startswith("\n\nHuman: ")
    assert (chosen, rejected) == (" You’re welcome.  I’d be happy to have this conversation again if",
                                  " You’re welcome.")
    pref = normalize_preference_row(row)
    assert len(pref.prompt) == 7 and pref.prompt[-1] == U("Thanks.")
    assert pref.chosen == (A("You’re welcome.  I’d be happy to have this conversation again if"),)
    assert pref.rejected == (A("You’re welcome."),)
    # A synthetic one the other way round, with a multi-turn prompt.
    base = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    pref = normalize_preference_row({"chosen": base + " Sure", "rejected": base + " Sure thing, bye!"})
    assert pref.prompt == (U("hi"), A("hello"), U("bye"))
    assert (pref.chosen, pref.rejected) == ((A("Sure"),), (A("Sure thing, bye!"),))


def test_implicit_message_lists_share_whole_messages():
    chosen = [S("be brief"), U("hi"), A("hello"), U("2+2?"), A("4")]
    rejected = [S("be brief"), U("hi"), A("hello"), U("2+2?"), A("4, I think")]
    pref = normalize_preference_row({"chosen": chosen, "rejected": rejected})
    assert pref.prompt == tuple(chosen[:4]) and pref.chosen == (A("4"),) and pref.rejected == (A("4, I think"),)
    assert preference_to_sft(pref) == Conversation(tuple(chosen), train_from=4)
    explicit = normalize_preference_row({"prompt": "Q:", "chosen": " a", "rejected": " b"})
    assert preference_to_sft(explicit) == PromptCompletion("Q:", " a")


# ----------------------------------------------------------------------------- SFT masks per format


def test_text_trains_every_token_and_ends_with_one_eos(plain):
    out = sft(plain, {"text": "hello world"})
    assert plain.decode(out["input_ids"], skip_special_tokens=False) == "<s>hello world</s>"
    assert all(out["loss_mask"])
    out = sft(plain, {"text": "hello world</s>"})  # already ends with EOS: not doubled
    assert out["input_ids"].count(plain.eos_id) == 1


def test_prompt_completion_trains_the_completion_and_one_eos(plain):
    out = sft(plain, {"prompt": "Question: 2+2?\nAnswer:", "completion": " 4"})
    ids, mask = out["input_ids"], out["loss_mask"]
    assert [plain.sp.id_to_piece(i) for i, m in zip(ids, mask) if m] == ["▁", "4", "</s>"]
    assert plain.decode([i for i, m in zip(ids, mask) if not m], False) == "<s>Question: 2+2?\nAnswer:"
    out = sft(plain, {"prompt": "Q:", "completion": " 4</s>"})
    assert out["input_ids"].count(plain.eos_id) == 1 and out["loss_mask"][-1]
    out = sft(plain, {"prompt": "Q:", "completion": " 4"}, settings=TokenizeSettings(0, 0, loss_on="all"))
    assert all(out["loss_mask"])


def test_multi_turn_messages_train_every_assistant_turn_with_its_end_marker(plain, llama2, chatml):
    messages = [S("Be nice."), U("hello there"), A("fine thanks"), U("how are you?"), A("goodbye")]
    row = {"messages": messages}
    out = sft(plain, row)
    assert runs(plain, out["input_ids"], out["loss_mask"]) == ["fine thanks</s>", "goodbye</s>"]
    assert out["input_ids"].count(plain.eos_id) == 2 and out["input_ids"][-1] == plain.eos_id
    out = sft(llama2, row)
    assert runs(llama2, out["input_ids"], out["loss_mask"]) == ["fine thanks </s>", "goodbye </s>"]
    # chatml: the end-of-turn <|im_end|> is trained; the newline the template writes after it is not,
    # and no EOS is added after it.
    out = sft(chatml, row)
    assert runs(chatml, out["input_ids"], out["loss_mask"]) == ["fine thanks<|im_end|>", "goodbye<|im_end|>"]
    assert out["input_ids"].count(chatml.eos_id) == 5 and chatml.decode(out["input_ids"][-1:]) == "\n"


def test_sharegpt_alpaca_and_chat_prompt_completion(plain):
    sharegpt = {"conversations": [{"from": "system", "value": "Be nice."}, {"from": "human", "value": "hi"},
                                  {"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye"},
                                  {"from": "gpt", "value": "goodbye"}]}
    out = sft(plain, sharegpt)
    assert detect_format(sharegpt) == "sharegpt"
    assert runs(plain, out["input_ids"], out["loss_mask"]) == ["hello</s>", "goodbye</s>"]

    alpaca = {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}
    assert normalize_sft_row(alpaca, "alpaca") == Conversation((U("Add the numbers.\n\n2 and 2"), A("4")))
    out = sft(plain, alpaca)
    assert runs(plain, out["input_ids"], out["loss_mask"]) == ["4</s>"]
    assert plain.decode(out["input_ids"], False) == "<s>\n\nHuman: Add the numbers.\n\n2 and 2\n\nAssistant: 4</s>"

    # TRL's conversational prompt-completion: only the completion's assistant turn is trained.
    chat_pc = {"prompt": [U("hi"), A("hello"), U("bye")], "completion": [A("goodbye")]}
    out = sft(plain, chat_pc)
    assert runs(plain, out["input_ids"], out["loss_mask"]) == ["goodbye</s>"]


def test_template_without_end_of_turn_gets_one_eos(model_file):
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    tok = load_tokenizer(model_file, template)
    out = sft(tok, {"messages": [U("hi"), A("hello")]})
    assert runs(tok, out["input_ids"], out["loss_mask"]) == ["hello</s>"]
    assert out["input_ids"].count(tok.eos_id) == 1 and out["input_ids"][-1] == tok.eos_id


# ----------------------------------------------------------------------------- preference tokenization


def test_preference_strings_prompt_has_bos_completions_one_eos(plain):
    pref = normalize_preference_row({"prompt": "Question: 2+2?\nAnswer:", "chosen": " 4", "rejected": " 5</s>"})
    out, flags = tokenize_preference_example(pref, plain, SETTINGS)
    assert out["prompt_ids"] == plain.encode("Question: 2+2?\nAnswer:", add_special_tokens=True)
    assert out["prompt_ids"][0] == plain.bos_id
    for side, answer in (("chosen", "4"), ("rejected", "5")):
        text = f"<s>Question: 2+2?\nAnswer: {answer}</s>"
        assert out[f"{side}_ids"].count(plain.eos_id) == 1
        assert plain.decode(out["prompt_ids"] + out[f"{side}_ids"], False) == text
    assert flags["_prompt_not_prefix"] == 0
    # "Answer: " + "yes": the prompt's trailing "▁" merges into "▁yes", so its tokens are not a
    # prefix; the completion is tokenized alone and counted.
    _, flags = tokenize_preference_example(
        normalize_preference_row({"prompt": "Answer: ", "chosen": "yes", "rejected": "no"}), plain, SETTINGS
    )
    assert flags["_prompt_not_prefix"] == 2


def test_preference_conversation_completion_is_what_the_template_adds(plain, chatml):
    row = {"prompt": [U("hello there")], "chosen": [A("fine thanks")], "rejected": [A("goodbye")]}
    out, _ = tokenize_preference_example(normalize_preference_row(row), plain, SETTINGS)
    assert plain.decode(out["prompt_ids"], False) == "<s>\n\nHuman: hello there\n\nAssistant:"
    assert [plain.decode(out[k], False) for k in ("chosen_ids", "rejected_ids")] == ["fine thanks</s>", "goodbye</s>"]
    out, _ = tokenize_preference_example(normalize_preference_row(row), chatml, SETTINGS)
    assert chatml.decode(out["prompt_ids"], False) == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    assert chatml.decode(out["chosen_ids"], False) == "fine thanks<|im_end|>"  # its own end-of-turn, no extra EOS
    assert out["chosen_ids"].count(chatml.eos_id) == 1


# ----------------------------------------------------------------------------- truncation and drops


def test_prompt_truncation_keep_start_and_keep_end(plain):
    pref = normalize_preference_row({"prompt": "one two three four five six seven", "chosen": " yes indeed",
                                     "rejected": " no"})
    full_prompt = plain.encode("one two three four five six seven", add_special_tokens=True)
    chosen = plain.encode("one two three four five six seven yes indeed", add_special_tokens=True)[len(full_prompt):]
    for mode, expected in (("keep_end", full_prompt[-4:]), ("keep_start", full_prompt[:4])):
        out, flags = tokenize_preference_example(pref, plain, TokenizeSettings(6, 4, mode))
        assert out["prompt_ids"] == expected and flags["_truncated_prompt"]
        assert out["chosen_ids"] == chosen[:2] and flags["_truncated_completion"]  # 6 - 4 tokens of room
        assert out["rejected_ids"] == [plain.sp.piece_to_id("▁no"), plain.eos_id]
    # SFT prompt/completion: the same prompt rule, then the sequence is cut from the end.
    example = PromptCompletion("one two three four five six seven", " yes indeed")
    out, flags = tokenize_sft_example(example, plain, TokenizeSettings(6, 4, "keep_end"))
    assert out["input_ids"] == full_prompt[-4:] + chosen[:2] and out["loss_mask"] == [False] * 4 + [True] * 2
    assert flags["_truncated_prompt"] and flags["_truncated_completion"]


def test_rows_that_lose_their_completion_are_dropped_and_counted(plain, tmp_path):
    long_prompt = "word " * 40
    rows = [{"prompt": "short", "chosen": " a", "rejected": " b"},
            {"prompt": long_prompt, "chosen": " a", "rejected": " b"}]
    ds = datasets.Dataset.from_list(rows)
    cfg = data_cfg(max_length=16, max_prompt_length=16, on_bad_row="error", sft_from_preference=True)
    for stage in ("dpo", "sft"):  # dropped in on_bad_row=error mode too: a length limit is not a bad row
        examples, stats = tokenize_dataset(ds, plain, cfg, stage, cache_dir=str(tmp_path), source="mem")
        assert (stats.rows_in, stats.rows_out) == (2, 1) and len(examples) == 1
        assert dict(stats.dropped_by_reason) == {"completion_truncated_away": 1}
        assert stats.first_drop["completion_truncated_away"].startswith("mem:2: ")
        assert stats.truncated_prompt == 0  # counted over kept rows only
    with pytest.raises(JaxalignError, match="every one of the 1 rows"):
        tokenize_dataset(ds.select([1]), plain, cfg, "dpo", cache_dir=str(tmp_path))


# ----------------------------------------------------------------------------- bad rows


BAD_ROWS = [
    ("dpo", {"prompt": "p", "chosen": "a"}, "missing_field", "field 'rejected' is missing"),
    ("dpo", {"prompt": "p", "chosen": 5, "rejected": "b"}, "wrong_type", "field 'chosen' must be a string, got int"),
    ("dpo", {"prompt": "p", "chosen": "  ", "rejected": "b"}, "empty_completion", "field 'chosen' is empty"),
    ("dpo", {"prompt": "p", "chosen": "a", "rejected": "a"}, "chosen_equals_rejected", "are the same text"),
    ("dpo", {"chosen": "just text", "rejected": "other text"}, "no_shared_prompt", "add a 'prompt' column"),
    ("sft", {"messages": [U("hi")]}, "no_assistant_turn", "messages has no assistant turn"),
    ("sft", {"messages": [{"role": "robot", "content": "x"}, A("y")]}, "unknown_role",
     "messages\\[0\\].role is 'robot'"),
    ("sft", {"prompt": "p", "completion": ""}, "empty_completion", "field 'completion' is empty"),
    ("sft", {"text": ["not", "a string"]}, "wrong_type", "field 'text' must be a string, got list"),
]
GOOD = {"dpo": {"prompt": "p", "chosen": "a", "rejected": "b"}, "sft": {"messages": [U("hi"), A("hello")],
        "prompt": "p", "completion": "c", "text": "t"}}


def _good_row(stage, bad):
    if stage == "dpo":
        return GOOD["dpo"]
    return {k: GOOD["sft"][k] for k in bad}  # same columns as the bad row


@pytest.mark.parametrize("stage,bad,reason,message", BAD_ROWS, ids=[f"{r[2]}-{i}" for i, r in enumerate(BAD_ROWS)])
def test_bad_row_error_names_file_and_row(plain, tmp_path, stage, bad, reason, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [_good_row(stage, bad), bad])
    ds = load_rows(path, cache_dir=str(tmp_path / "hf"))
    with pytest.raises(JaxalignError, match=rf"^{re.escape(path)}:2: .*{message}.*\[{reason}\].*on_bad_row: skip"):
        tokenize_dataset(ds, plain, data_cfg(), stage, cache_dir=str(tmp_path / "cache"))


def test_skip_mode_counts_every_bad_row_by_reason(plain, tmp_path):
    dpo_bad = [bad for stage, bad, _, _ in BAD_ROWS if stage == "dpo"]
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD["dpo"], *dpo_bad, GOOD["dpo"]])
    ds = load_rows(path, cache_dir=str(tmp_path / "hf"))
    examples, stats = tokenize_dataset(ds, plain, data_cfg(on_bad_row="skip"), "dpo", cache_dir=str(tmp_path / "c"))
    assert (stats.rows_in, stats.rows_out, len(examples)) == (7, 2, 2)
    assert dict(stats.dropped_by_reason) == {
        "missing_field": 1, "wrong_type": 1, "empty_completion": 1, "chosen_equals_rejected": 1, "no_shared_prompt": 1,
    }
    assert stats.first_drop["wrong_type"] == f"{path}:3: field 'chosen' must be a string, got int"
    conversations = ([U("hi"), A("hello")], [U("hi")], [{"role": "robot", "content": "x"}, A("y")])
    ds = datasets.Dataset.from_list([{"messages": m} for m in conversations])
    _, stats = tokenize_dataset(ds, plain, data_cfg(on_bad_row="skip"), "sft", cache_dir=str(tmp_path / "c"))
    assert stats.rows_out == 1 and dict(stats.dropped_by_reason) == {"no_assistant_turn": 1, "unknown_role": 1}


def test_format_and_stage_mismatches_are_clear_errors():
    assert [detect_format(c) for c in (["messages"], ["prompt", "completion"], ["instruction", "input", "output"],
                                       ["conversations"], ["text", "_row"], ["chosen", "rejected"])] == [
        "messages", "prompt_completion", "alpaca", "sharegpt", "text", "preference"]
    with pytest.raises(JaxalignError, match="cannot tell the data format from the columns \\['foo'\\]"):
        detect_format(["foo", "_source"])
    with pytest.raises(JaxalignError, match="data.format is 'messages' but the data has no column \\['messages'\\]"):
        resolve_format(["text"], "messages")
    with pytest.raises(JaxalignError, match="stage dpo needs preference rows"):
        resolve_format(["text"], "auto", "dpo")
    with pytest.raises(JaxalignError, match="sft_from_preference"):
        resolve_format(["chosen", "rejected"], "auto", "sft")
    with pytest.raises(BadRow, match="must both be strings or both message lists"):
        normalize_preference_row({"chosen": "a", "rejected": [A("b")]})


# ----------------------------------------------------------------------------- sources


def test_missing_file_and_broken_lines_name_file_and_line(tmp_path):
    for missing in (str(tmp_path / "nope.jsonl"), "./data/nope.parquet"):
        with pytest.raises(JaxalignError, match=re.escape(f"data file '{missing}' does not exist")):
            load_rows(missing)
    bad_utf8 = tmp_path / "bad.jsonl"
    bad_utf8.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(JaxalignError, match=rf"^{re.escape(str(bad_utf8))}:2: invalid UTF-8"):
        load_rows(str(bad_utf8))
    broken = tmp_path / "broken.jsonl.gz"
    with gzip.open(broken, "wt") as f:
        f.write('{"text": "ok"}\n\n{"text": "no end"\n')
    with pytest.raises(JaxalignError, match=rf"^{re.escape(str(broken))}:3: malformed JSON"):
        load_rows(str(broken))
    not_object = write_jsonl(tmp_path / "list.jsonl", [{"text": "ok"}, ["text"]])
    with pytest.raises(JaxalignError, match=rf"^{re.escape(not_object)}:2: expected a JSON object per line, got list"):
        load_rows(not_object)


def test_file_kinds_load_with_row_numbers(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    jsonl = tmp_path / "blank.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b"}\n   \n{"text": "c"}\n')
    assert load_rows(str(jsonl), cache_dir=str(tmp_path / "hf"))["_row"] == [1, 3, 5]  # line numbers
    array = tmp_path / "array.json"
    array.write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    (tmp_path / "rows.csv").write_text("text\na\nb\nc\n")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for source in ("array.json", "rows.parquet", "rows.csv", "saved"):
        ds = load_rows(str(tmp_path / source), cache_dir=str(tmp_path / "hf"))
        assert ds["text"] == ["a", "b", "c"] and ds["_row"] == [1, 2, 3], source
    both = load_rows([str(array), str(tmp_path / "rows.csv")], max_rows=2, cache_dir=str(tmp_path / "hf"))
    assert both["text"] == ["a", "b", "a", "b"]
    assert both["_source"] == [str(array)] * 2 + [str(tmp_path / "rows.csv")] * 2


def test_split_train_eval_is_deterministic_and_disjoint():
    ds = datasets.Dataset.from_list([{"text": str(i)} for i in range(100)])
    train, held_out = split_train_eval(ds, 0.1, seed=3)
    again_train, again_held_out = split_train_eval(ds, 0.1, seed=3)
    assert len(held_out) == 10 and len(train) == 90
    assert held_out["text"] == again_held_out["text"] and train["text"] == again_train["text"]
    assert not set(train["text"]) & set(held_out["text"])
    assert split_train_eval(ds, 0.1, seed=4)[1]["text"] != held_out["text"]
    assert split_train_eval(ds, 0.0, seed=3) == (ds, None)


# ----------------------------------------------------------------------------- cache


def test_second_run_reads_the_cache_without_tokenizing(model_file, tmp_path):
    tok = load_tokenizer(model_file, "plain")
    calls = {"n": 0}
    for name in ("encode", "encode_with_offsets", "encode_with_offset_array"):
        method = getattr(tok, name)
        setattr(tok, name, lambda *a, _m=method, **k: (calls.__setitem__("n", calls["n"] + 1), _m(*a, **k))[1])
    ds = datasets.Dataset.from_list([{"messages": [U("hi"), A("hello")]}, {"messages": [U("bye"), A("ciao")]}])
    cfg = data_cfg()
    first, stats1 = tokenize_dataset(ds, tok, cfg, "sft", cache_dir=str(tmp_path))
    assert calls["n"] > 0 and not stats1.from_cache
    assert len(list((tmp_path / "tokenized").glob("sft-*/meta.json"))) == 1

    calls["n"] = 0
    second, stats2 = tokenize_dataset(ds, tok, cfg, "sft", cache_dir=str(tmp_path))
    assert calls["n"] == 0 and stats2.from_cache
    assert list(second) == list(first) and stats2.rows_out == stats1.rows_out

    # Another setting or another chat template is another cache entry.
    tokenize_dataset(ds, tok, data_cfg(max_length=14), "sft", cache_dir=str(tmp_path))
    assert calls["n"] > 0
    tok.set_chat_template("llama2")
    _, stats3 = tokenize_dataset(ds, tok, cfg, "sft", cache_dir=str(tmp_path))
    assert not stats3.from_cache and len(list((tmp_path / "tokenized").glob("sft-*/meta.json"))) == 3
