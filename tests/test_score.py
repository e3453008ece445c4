"""`jaxalign score`: summed completion log-probs match transformers; rows, order and errors; CLI help."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from jaxalign import cli
from jaxalign.checkpoint import model_io
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.eval.score import run_score
from jaxalign.runtime.sharding import make_mesh, use_mesh

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 32000  # the Llama 2 SentencePiece tokenizer's
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256)

TEXT_ROWS = [  # clean prompt/completion boundaries: the prompt's tokens are a prefix of prompt+completion's
    {"prompt": "Question: what is two plus two?\nAnswer:", "completion": " Four, I think.", "id": "a"},
    {"prompt": "Hello", "completion": " world", "id": "b"},
    {"prompt": "Human: Can you translate 'cat' into French?\n\nAssistant:",
     "completion": " Sure! The French word is \"chat\" — pronounced like \"sha\".", "id": "c", "extra": [1, 2]},
]


@pytest.fixture(scope="module")
def model_file(shared_data) -> str:
    return str(shared_data / "llama2-tokenizer.model")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, model_file) -> pathlib.Path:
    """A tiny random Llama with the Llama 2 vocab, saved with its tokenizer as an HF directory."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norms, and logits spread enough that errors would show
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.5 * noise)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    load_tokenizer(model_file).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, hf_dir) -> pathlib.Path:
    """The same weights as a jaxalign model checkpoint, saved without a tokenizer."""
    mesh = make_mesh({"fsdp": -1})
    with use_mesh(mesh):
        model = model_io.load_model(hf_dir, mesh)
    return model_io.save_model_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


def hf_logp(model, prompt: list[int], completion: list[int]) -> float:
    ids = torch.tensor([prompt + completion], dtype=torch.long)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    per_token = logp.gather(-1, ids[0, 1:, None])[:, 0]
    return float(per_token[len(prompt) - 1:].sum())


def write_jsonl(path: pathlib.Path, rows) -> pathlib.Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def id_rows(n: int = 11, seed: int = 0) -> list[dict]:
    """Rows of different lengths, not sorted by length, one longer than 64 tokens (a second padded length)."""
    rng = np.random.RandomState(seed)
    rows = []
    for k in range(n):
        p_len = int(rng.randint(1, 20))
        c_len = 50 if k == 4 else int(rng.randint(1, 30))
        rows.append({"row": k, "meta": {"k": k},
                     "prompt_ids": rng.randint(0, VOCAB, p_len).tolist(),
                     "completion_ids": rng.randint(0, VOCAB, c_len).tolist()})
    rows[7]["prompt_ids"] = [VOCAB - 1] * 30 + [0]  # highest and lowest ids
    return rows


# --- parity with transformers -----------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["hf", "jaxalign"])
def test_id_rows_match_transformers_via_cli(fmt, hf_dir, ckpt_dir, hf_model, tmp_path, capsys):
    rows = id_rows()
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "sub" / "out.jsonl"
    model = hf_dir if fmt == "hf" else ckpt_dir  # the checkpoint has no tokenizer: id rows need none
    # 11 rows at batch size 3 (rounded up to 8 rows, one per device): a full batch and one of 3 + 5 padding
    rc = cli.main(["score", "--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "3"])
    assert rc == 0
    assert f"scored {len(rows)} rows" in capsys.readouterr().out
    got = read_jsonl(out)
    assert len(got) == len(rows)
    for row, res in zip(rows, got):
        assert {k: v for k, v in res.items() if k not in ("logp", "num_tokens")} == row  # fields and order kept
        assert res["num_tokens"] == len(row["completion_ids"])
        want = hf_logp(hf_model, row["prompt_ids"], row["completion_ids"])
        assert res["logp"] == pytest.approx(want, abs=1e-3), row["row"]


@pytest.mark.parametrize("fmt", ["hf", "jaxalign"])
def test_text_rows_match_transformers_via_run_score(fmt, hf_dir, ckpt_dir, hf_model, model_file, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_file)
    rows = TEXT_ROWS + [{"prompt_ids": [sp.bos_id(), 5, 6], "completion_ids": [7, 8, 9], "id": "ids"}]  # mixed file
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    # HF dir: its own tokenizer (tokenizer.json); checkpoint: an explicit SentencePiece .model
    tok = "" if fmt == "hf" else model_file
    n = run_score(str(hf_dir if fmt == "hf" else ckpt_dir), str(data), str(out), batch_size=2, tokenizer_path=tok)
    assert n == len(rows)
    got = read_jsonl(out)
    assert [r["id"] for r in got] == [r["id"] for r in rows]
    for row, res in zip(rows, got):
        assert {k: v for k, v in res.items() if k not in ("logp", "num_tokens")} == row
        if "prompt" in row:
            prompt = [sp.bos_id()] + sp.encode(row["prompt"])
            full = [sp.bos_id()] + sp.encode(row["prompt"] + row["completion"])
            assert full[:len(prompt)] == prompt
            completion = full[len(prompt):]  # no EOS added
        else:
            prompt, completion = row["prompt_ids"], row["completion_ids"]
        assert res["num_tokens"] == len(completion), row["id"]
        assert res["logp"] == pytest.approx(hf_logp(hf_model, prompt, completion), abs=1e-3), row["id"]


# --- errors -----------------------------------------------------------------------------------

BAD_ROWS = {
    "missing_completion": ({"prompt": "Hi"}, "'completion' is missing"),
    "non_integer_ids": ({"prompt_ids": [1, 2], "completion_ids": [3, "4"]}, "'completion_ids' must be a list"),
    "float_ids": ({"prompt_ids": [1, 2.5], "completion_ids": [3]}, "'prompt_ids' must be a list"),
    "empty_completion_ids": ({"prompt_ids": [1, 2], "completion_ids": []}, "completion is empty"),
    "empty_completion_text": ({"prompt": "Hi", "completion": ""}, "completion is empty"),
    "empty_prompt": ({"prompt_ids": [], "completion_ids": [3]}, "prompt needs at least one token"),
    "id_out_of_vocab": ({"prompt_ids": [1], "completion_ids": [VOCAB]}, "out of range"),
    "negative_id": ({"prompt_ids": [-1], "completion_ids": [3]}, "out of range"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_is_exit_2_naming_file_and_row(case, hf_dir, tmp_path, capsys):
    bad, message = BAD_ROWS[case]
    good = {"prompt_ids": [1, 2], "completion_ids": [3]}
    data = write_jsonl(tmp_path / "in.jsonl", [good, "", good, bad, good])  # a blank line: rows are file lines
    out = tmp_path / "out.jsonl"
    rc = cli.main(["score", "--model", str(hf_dir), "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("jaxalign score: error: ")
    assert f"{data}:4:" in err  # 1-based line number, as editors and the training data loader count
    assert message in err
    assert not out.exists()


def test_missing_data_file_and_model_dir(hf_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt_ids": [1], "completion_ids": [2]}])
    missing = tmp_path / "nope.jsonl"
    assert cli.main(["score", "--model", str(hf_dir), "--data", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "data file not found" in err and str(missing) in err
    no_model = tmp_path / "no-model"
    assert cli.main(["score", "--model", str(no_model), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(no_model) in err
    assert not (tmp_path / "o").exists()


def test_text_rows_without_tokenizer(ckpt_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi", "completion": " there"}])
    rc = cli.main(["score", "--model", str(ckpt_dir), "--data", str(data), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{data}:1:" in err and "--tokenizer" in err


def test_invalid_json_line(hf_dir, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt_ids": [1], "completion_ids": [2]}\n{"prompt_ids": [1\n', encoding="utf-8")
    assert cli.main(["score", "--model", str(hf_dir), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert f"{data}:2: malformed JSON" in capsys.readouterr().err


# --- help -------------------------------------------------------------------------------------

def test_help(capsys):
    for argv in (["--help"], ["score", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "score" in out and "--batch-size" in out and "--tokenizer" in out


def test_console_script_help():
    exe = pathlib.Path(sys.executable).with_name("jaxalign")
    if not exe.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    res = subprocess.run([str(exe), "score", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "--model" in res.stdout and "--data" in res.stdout and "--out" in res.stdout
