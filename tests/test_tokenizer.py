"""Tokenizer backends, chat templates and assistant spans (jaxalign.data.tokenizer and its backends, chat_templates)."""

import gzip
import json
import shutil

import pytest

from jaxalign.data.builtin_render import render_builtin
from jaxalign.data.chat_templates import BUILTIN_TEMPLATES, render_conversation, render_conversation_by_prefixes
from jaxalign.data.hf_tokenizer import HFTokenizer
from jaxalign.data.sentencepiece_tokenizer import SentencePieceTokenizer
from jaxalign.data.tokenizer import char_spans_to_token_mask, load_tokenizer
from jaxalign.errors import JaxalignError

# Ordinary text: first word, leading spaces/newlines, whitespace runs, unicode, HH style.
TEXTS = [
    "Hello world",
    " Hello",
    "   three leading spaces",
    "\nleading newline",
    "a  b   c    d",
    "trailing space ",
    "héllo wörld 日本語 🤖 done",
    "\n\nHuman: hi\n\nAssistant: hello",
    "def f(x):\n        return x\t# tab\n\n",
    "1234567 numbers, punctuation!?",
]

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "fine 🤖"},
]

LLAMA3_TAGS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_TAGS = ["<|im_start|>", "<|im_end|>"]
OWN_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}{# own #}"
)


@pytest.fixture(scope="module")
def model_file(shared_data):
    return str(shared_data / "llama2-tokenizer.model")


@pytest.fixture(scope="module")
def sp(model_file):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=model_file)


@pytest.fixture(scope="module")
def llama(model_file):
    return load_tokenizer(model_file)


@pytest.fixture(scope="module")
def hh_texts(shared_data):
    with gzip.open(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(100), f)]
    return [r["chosen"] for r in rows] + [r["rejected"] for r in rows]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer dir with chatml + llama3 special tokens and its own template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"] + CHATML_TAGS + LLAMA3_TAGS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 5 + ["hello there, how are you? fine thanks"] * 5, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = OWN_TEMPLATE
    out = tmp_path_factory.mktemp("hf_tok")
    hf.save_pretrained(out)
    return str(out)


# ----------------------------------------------------------------------------- SentencePiece ids


def test_sentencepiece_ids_equal_sentencepiece(llama, sp, hh_texts):
    assert isinstance(llama, SentencePieceTokenizer)
    for text in TEXTS + hh_texts:
        assert llama.encode(text) == sp.encode(text), text
    assert llama.encode("Hello world", add_special_tokens=True) == [1] + sp.encode("Hello world")
    assert (llama.vocab_size, llama.bos_id, llama.eos_id, llama.pad_id) == (32000, 1, 2, 0)
    assert (llama.bos_token, llama.eos_token) == ("<s>", "</s>")


def test_word_by_word_encoding_equals_sentencepiece_on_every_text(llama, sp, shared_data, monkeypatch):
    """The word cache gives sentencepiece's ids on all HH texts and on random runs of spaces, words,
    newlines, tabs, unicode and literal "▁", also when the cache fills up and starts again."""
    import random

    from jaxalign.data.sentencepiece_words import WordCache

    assert isinstance(llama._words, WordCache)  # Llama 2: no piece holds "▁" after another character
    with gzip.open(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz", "rt") as f:
        texts = [r[k] for r in map(json.loads, f) for k in ("chosen", "rejected")]
    rnd = random.Random(0)
    alphabet = [" ", "  ", "a", "b", "the", "\n", ".", "é", "日本", "🤖", "▁", "\t", "<0x0A>"]
    texts += ["", " ", "a ", "a  ", "   "] + TEXTS
    texts += ["".join(rnd.choices(alphabet, k=rnd.randint(1, 24))) for _ in range(3000)]
    monkeypatch.setattr(WordCache, "LIMIT", 500)
    for text in texts:
        assert llama._words.encode(text) == sp.encode(text), repr(text)
    assert 0 < len(llama._words.later) <= 501


def test_word_cache_stays_off_where_pieces_span_a_space(tmp_path):
    """A model trained without splitting at spaces has pieces like "a▁b": it is encoded whole."""
    import io
    import random

    import sentencepiece

    rnd = random.Random(0)
    lines = [" ".join(rnd.choices(["the cat", "a dog", "sat on", "the mat"], k=6)) for _ in range(300)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=60,
                                             model_type="bpe", split_by_whitespace=False, minloglevel=2)
    (tmp_path / "m.model").write_bytes(model.getvalue())
    tok = SentencePieceTokenizer(str(tmp_path / "m.model"))
    assert any(tok.sp.id_to_piece(i).lstrip("▁").count("▁") for i in range(tok.vocab_size))
    assert tok._words is None
    for text in lines[:50]:
        assert tok.encode(text) == tok.sp.encode(text)


def test_dir_with_only_tokenizer_model_is_sentencepiece(model_file, sp, tmp_path):
    shutil.copy(model_file, tmp_path / "tokenizer.model")
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode(" Hello") == sp.encode(" Hello")


def test_special_strings_in_text_become_ids(llama, sp):
    ids = llama.encode("<s>[INST] hi [/INST] ok </s>")
    assert ids == [1] + sp.encode("[INST] hi [/INST] ok ") + [2]
    assert llama.encode("a</s>b") == sp.encode("a") + [2] + sp.encode("b")
    assert llama.decode(ids, skip_special_tokens=False) == "<s>[INST] hi [/INST] ok </s>"
    assert llama.decode(ids) == "[INST] hi [/INST] ok "


def test_offsets_cover_each_token_exactly(llama):
    for text in TEXTS + ["x<s>y </s>\n\nz"]:
        ids, offsets = llama.encode_with_offsets(text)
        assert ids == llama.encode(text)
        covered = []  # distinct non-empty ranges, in order, must tile the text
        for i, (s, e) in zip(ids, offsets):
            piece = llama.sp.id_to_piece(i)
            if i in (1, 2):
                assert text[s:e] == piece
            elif not llama.sp.is_byte(i) and s < e:
                # a piece's text, minus the dummy-prefix space at the start of a segment
                surface = piece.replace("▁", " ")
                assert surface.endswith(text[s:e]) and len(surface) - (e - s) <= 1, (text, piece, text[s:e])
            if s < e and (not covered or covered[-1] != (s, e)):
                covered.append((s, e))
        assert "".join(text[s:e] for s, e in covered) == text
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


def test_char_spans_to_token_mask():
    offsets = [(0, 0), (0, 3), (3, 4), (4, 8), (8, 8), (8, 10), (10, 12)]
    assert char_spans_to_token_mask(offsets, [(3, 8)]) == [False, False, True, True, False, False, False]
    # partial overlap marks the token; a zero-width token at a span start is marked
    assert char_spans_to_token_mask(offsets, [(2, 3), (8, 11)]) == [False, True, False, False, True, True, True]
    assert char_spans_to_token_mask(offsets, []) == [False] * len(offsets)


# ----------------------------------------------------------------------------- save_pretrained


def test_save_pretrained_roundtrip_gives_sentencepiece_ids(model_file, sp, hh_texts, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(model_file, chat_template="llama2")
    tok.save_pretrained(str(tmp_path))
    # a model config next to it must not make AutoTokenizer swap in its own Llama class
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000}))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS + hh_texts + ["<s>[INST] hi [/INST] ok </s>"]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
    assert hf.encode("Hello", add_special_tokens=True) == tok.encode("Hello", add_special_tokens=True)
    assert hf.chat_template == tok.chat_template
    assert hf.decode(sp.encode("héllo 🤖 x")) == "héllo 🤖 x"

    reloaded = load_tokenizer(str(tmp_path))
    assert isinstance(reloaded, HFTokenizer)
    assert reloaded.chat_template == BUILTIN_TEMPLATES["llama2"]
    assert reloaded.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)


# ----------------------------------------------------------------------------- HF dirs and templates


def test_hf_dir_loads_and_renders_its_own_template(hf_dir):
    from transformers import AutoTokenizer

    tok = load_tokenizer(hf_dir)
    hf = AutoTokenizer.from_pretrained(hf_dir)
    assert isinstance(tok, HFTokenizer)
    assert tok.chat_template == OWN_TEMPLATE
    for gen in (False, True):
        expected = hf.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(CONVERSATION[:4], add_generation_prompt=gen) == expected
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == hf.convert_tokens_to_ids("<|im_start|>")
    assert tok.eos_id == hf.convert_tokens_to_ids("<|im_end|>") and tok.pad_id == hf.pad_token_id
    ids, offsets = tok.encode_with_offsets("hello there 🤖")
    assert ids == tok.encode("hello there 🤖") and offsets[-1][1] == len("hello there 🤖")


EXPECTED_TURNS = {
    "llama2": [" hello there </s>", " fine 🤖 </s>"],
    "plain": [" hello there</s>", " fine 🤖</s>"],
    "llama3": ["hello there<|eot_id|>", "fine 🤖<|eot_id|>"],
    "chatml": ["hello there<|im_end|>", "fine 🤖<|im_end|>"],
}


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_render_conversation_spans_cover_assistant_turns(name, model_file, hf_dir):
    tok = load_tokenizer(model_file if name in ("llama2", "plain") else hf_dir, chat_template=name)
    text, spans = render_conversation(tok, CONVERSATION)
    assert [text[a:b] for a, b in spans] == EXPECTED_TURNS[name]
    ids, offsets = tok.encode_with_offsets(text)
    mask = char_spans_to_token_mask(offsets, spans)
    # The marked tokens form two runs: exactly the two replies plus their end markers.
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    decoded = [tok.decode(r, skip_special_tokens=False).strip() for r in runs]
    assert decoded == [t.strip() for t in EXPECTED_TURNS[name]]
    if isinstance(tok, SentencePieceTokenizer):
        # The prompt for the last reply tokenizes to a prefix of the whole conversation. (Not
        # asserted for the toy byte-level BPE: its GPT-2 regex splits "\n\n" + "fine" differently.)
        prompt = tok.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True)
        assert ids[: len(tok.encode(prompt))] == tok.encode(prompt)


def edge_conversations(seed=0, n=300):
    """Conversations with the edges templates treat apart: whitespace and empty contents, a system
    message or not (or two), an assistant first, two turns in a row, an unknown role."""
    import random

    rng = random.Random(seed)
    texts = ["", " ", "hi", " hi ", "\nline\n", "a  b\t", " 🤖 naïve ", "x" * 50, "</s> [INST]"]
    out = []
    for _ in range(n):
        roles = [rng.choice(["user", "assistant", "system", "user", "assistant"]) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.05:
            roles.insert(rng.randrange(len(roles) + 1), "tool")
        out.append([{"role": r, "content": rng.choice(texts)} for r in roles])
    return out


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_one_pass_builtin_render_equals_the_prefix_renders(name, model_file, hf_dir):
    """The one-pass renderer gives the Jinja prefix renders' text and spans, or declines (None) exactly
    where the template raises or is not prefix-stable, so the Jinja path decides there."""
    tok = load_tokenizer(model_file if name in ("llama2", "plain") else hf_dir, chat_template=name)
    tokens = tok.template_variables()
    compared = declined = 0
    for messages in edge_conversations():
        fast = render_builtin(name, messages, tokens["bos_token"], tokens["eos_token"])
        try:
            slow = render_conversation_by_prefixes(tok, messages)
        except JaxalignError:
            assert fast is None, messages
            declined += 1
            continue
        assert fast is not None and fast == slow, messages
        assert render_conversation(tok, messages) == slow
        compared += 1
    assert compared > 100 and (declined > 0) == (name in ("llama2", "plain")), (compared, declined)


def test_default_template_falls_back_to_plain(llama):
    assert llama.chat_template_name == "plain"
    assert llama.apply_chat_template(CONVERSATION[1:2], add_generation_prompt=True) == "<s>\n\nHuman: hi\n\nAssistant:"


def test_template_from_jinja_file(model_file, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    tok = load_tokenizer(model_file, chat_template=str(path))
    assert tok.apply_chat_template(CONVERSATION[1:3]) == "user: hi\nassistant: hello there\n"


def test_llama3_template_needs_its_special_tokens(model_file):
    with pytest.raises(JaxalignError, match=r"llama3.*<\|start_header_id\|>"):
        load_tokenizer(model_file, chat_template="llama3")


def test_unknown_template_name_lists_builtins(model_file):
    with pytest.raises(JaxalignError, match=r"unknown chat_template 'vicuna'.*chatml.*llama2.*llama3.*plain"):
        load_tokenizer(model_file, chat_template="vicuna")


def test_prefix_unstable_template_is_rejected(model_file):
    # renders the number of messages first: earlier renders are not prefixes of later ones
    unstable = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = load_tokenizer(model_file, chat_template=unstable)
    with pytest.raises(JaxalignError, match="not prefix-stable"):
        render_conversation(tok, CONVERSATION)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(JaxalignError, match=r"does not exist.*tokenizer\.json.*SentencePiece \.model"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(JaxalignError, match="has no tokenizer files"):
        load_tokenizer(str(tmp_path))


def test_a_pickled_sentencepiece_tokenizer_reopens_its_model_file(model_file, tmp_path):
    """What a tokenizing worker is sent: the file's path and a hash of the model, not the model (a spawn
    argument over a pipe's 64 KB holds up the next worker's launch); a changed file is refused."""
    import pickle

    shutil.copyfile(model_file, tmp_path / "tokenizer.model")
    tok = load_tokenizer(str(tmp_path / "tokenizer.model"), chat_template="llama2")
    data = pickle.dumps(tok)
    assert len(data) < 64 * 1024
    back = pickle.loads(data)
    assert (back.chat_template, back.chat_template_name) == (tok.chat_template, tok.chat_template_name)
    assert all(back.encode(t) == tok.encode(t) for t in TEXTS)
    (tmp_path / "tokenizer.model").write_bytes(b"\0" + (tmp_path / "tokenizer.model").read_bytes()[1:])
    with pytest.raises(JaxalignError, match="tokenizer.model"):
        pickle.loads(data)
