"""Data preparation at scale, side by side with TRL: rows/s, peak memory, warm start, training memory.

    python benchmarks/data_scale.py --rows 50000 [--trl] [--workers 2] [--out runs/data_scale]

1. Writes ROWS synthetic multi-turn `messages` rows (a system message and 1-3 user/assistant turns of
   English-like words, ~1.5 KB each) to OUT/rows-ROWS.jsonl (kept for the next run).
2. First preparation, in a fresh process, cache empty: jaxalign (load the rows, tokenize with the real
   Llama 2 SentencePiece tokenizer and the `llama2` template, assistant masks, one packing plan) and,
   with --trl, TRL's SFTTrainer dataset preparation of the same rows (the same tokenizer exported to
   tokenizer.json, the llama2 template with generation tags for assistant masks, packing, bfd),
   both with --workers processes. Wall time, rows/s and the peak memory of the whole process tree are
   printed: the sum of every process's PSS (resident memory, pages shared between processes counted
   once; file-backed pages included), sampled every 0.5 s.
3. Warm start: a fresh process opens the store the first run wrote and builds the first batch (the
   data side of the first training step).
4. Host memory while iterating: anonymous RSS (RssAnon: not the memory-mapped store pages the
   kernel may drop) after 20 and after 400 batches of 16 rows of 2048 tokens.
5. With --stream BATCHES: data.streaming over the same rows (read, tokenized and packed as they come,
   in the one training process): rows/s and RssAnon after 20 and after BATCHES batches.

Needs ../shared/data/llama2-tokenizer.model; prints one JSON line per measurement, then a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer.model"
MAX_LENGTH = 2048
WORDS = ("the of and to in is was that for on with as by at from his her this which or an be are had not "
         "one all were we when your can said there use each she do how their if will up other about out many "
         "then them these so some would make like him into time has look two more write go see number no way "
         "could people my than first water been call who oil its now find long down day did get come made may "
         "part over new sound take only little work know place year live me back give most very after thing our "
         "just name good sentence man think say great where help through much before line right too mean old any "
         "same tell boy follow came want show also around form three small set put end does another well large "
         "must big even such because turn here why ask went men read need land different home us move try kind "
         "hand picture again change off play spell air away animal house point page letter mother answer found "
         "study still learn should America world high every near add food between own below country plant last "
         "school father keep tree never start city earth eye light thought head under story saw left few while "
         "along might close something seem next hard open example begin life always those both paper together "
         "got group often run important until children side feet car mile night walk white sea began grow took "
         "river four carry state once book hear stop without second later miss idea enough eat face watch far "
         "Indian really almost let above girl sometimes mountain cut young talk soon list song being leave family "
         "it's algorithm function variable compute gradient tokenizer dataset model training inference").split()


def _sentence(rng: random.Random, low: int, high: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    return " ".join(words).capitalize() + rng.choice(".?!")


def _text(rng: random.Random, sentences: tuple[int, int]) -> str:
    return " ".join(_sentence(rng, 5, 18) for _ in range(rng.randint(*sentences)))


def generate(path: pathlib.Path, rows: int, seed: int = 0) -> None:
    """ROWS synthetic conversations: system + 1-3 user/assistant turns."""
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            messages = [{"role": "system", "content": _text(rng, (1, 2))}]
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": _text(rng, (1, 3))},
                             {"role": "assistant", "content": _text(rng, (2, 6))}]
            f.write(json.dumps({"messages": messages}) + "\n")
    tmp.rename(path)


# ----------------------------------------------------------------------------- measured processes


def _jaxalign_data(data: str, cache: str, workers: int = 0):
    """(train store, stats, a packed SFT iterator over it): what a run's first step needs from its data."""
    from jaxalign.config import default_config
    from jaxalign.data.iterator import BatchIterator
    from jaxalign.data.pipeline import load_examples
    from jaxalign.data.tokenizer import load_tokenizer

    cfg = default_config()
    cfg.data.train, cfg.data.cache_dir, cfg.data.num_workers = data, cache, workers
    cfg.data.max_length, cfg.data.max_prompt_length = MAX_LENGTH, MAX_LENGTH
    store, _, stats = load_examples(cfg, load_tokenizer(str(TOKENIZER), "llama2"), stage="sft")
    return store, stats["train"], BatchIterator(store, "sft", batch_size=16, max_length=MAX_LENGTH, packing=True)


def _jaxalign_prepare(data: str, cache: str, workers: int) -> dict:
    # The imports (jax among them) happen before the clock starts: the figure is the data's own time.
    import jaxalign.config  # noqa: F401
    from jaxalign.data import iterator, pipeline, tokenizer  # noqa: F401

    t = time.perf_counter()
    store, stats, it = _jaxalign_data(data, cache, workers)
    next(it)
    return {"seconds": time.perf_counter() - t, "rows": stats.rows_in, "kept": stats.rows_out,
            "from_cache": stats.from_cache, "tokens": int(store.lengths().sum())}


def _jaxalign_iterate(data: str, cache: str) -> dict:
    it = _jaxalign_data(data, cache)[2]
    out = {}
    for step in range(1, 401):
        next(it)
        if step in (20, 400):
            out[f"rss_anon_mb_after_{step}"] = _rss_anon_mb()
    return out


def _jaxalign_stream(data: str, batches: int) -> dict:
    """data.streaming: rows read, tokenized and packed as they come (one process), `batches` batches."""
    from jaxalign.config import load_config
    from jaxalign.data.iterator import make_iterator
    from jaxalign.data.pipeline import load_examples
    from jaxalign.data.tokenizer import load_tokenizer

    cfg = load_config(None, [f"data.train={data}", "data.streaming=true", "train.max_steps=1",
                             f"data.max_length={MAX_LENGTH}", f"data.max_prompt_length={MAX_LENGTH - 1}",
                             "train.batch_size=16"])
    t = time.perf_counter()
    stream, _, _ = load_examples(cfg, load_tokenizer(str(TOKENIZER), "llama2"), stage="sft")
    it = make_iterator(stream, cfg)
    out = {}
    for step in range(1, batches + 1):
        next(it)
        if step in (20, batches):
            out[f"rss_anon_mb_after_{step}"] = _rss_anon_mb()
    return out | {"seconds": time.perf_counter() - t, "rows": it.stats.rows_in, "batches": batches}


LLAMA2_GENERATION_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{% if loop.first and system %}{{ bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + "
    "message['content'] | trim + ' [/INST]' }}{% else %}{{ bos_token + '[INST] ' + message['content'] | trim + "
    "' [/INST]' }}{% endif %}{% else %}{% generation %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endgeneration %}{% endif %}{% endfor %}")


def _trl_prepare(data: str, hf_tokenizer: str, workers: int) -> dict:
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer

    t = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(hf_tokenizer)
    tok.chat_template = LLAMA2_GENERATION_TEMPLATE
    tok.pad_token = tok.unk_token
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2))
    # HF_DATASETS_CACHE is emptied before this run: TRL's map results are not reused from an earlier one.
    rows = datasets.load_dataset("json", data_files=data, split="train")
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_length=MAX_LENGTH, packing=True, assistant_only_loss=True,
                         dataset_num_proc=workers, bf16=False, report_to=[], save_strategy="no")
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok)
        n = len(trainer.train_dataset)
    return {"seconds": time.perf_counter() - t, "rows": len(rows), "packed_rows": n}


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------- the harness


def _measure(mode: str, *argv: str) -> dict:
    """Run one measured process; its result and the peak PSS of its process tree."""
    import psutil

    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, *argv], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "true"})
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_full_info().pss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.5)  # reading smaps is not free: sample slowly, the peak builds over seconds

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"{mode} failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1]) | {"mode": mode, "peak_pss_mb": peak / 2**20}
    if "rows" in result and "seconds" in result:
        result["rows_per_s"] = result["rows"] / result["seconds"]
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--trl", action="store_true", help="also measure TRL's SFTTrainer preparation")
    p.add_argument("--trl-only", action="store_true", help="measure TRL's preparation alone")
    p.add_argument("--stream", type=int, default=0, metavar="BATCHES",
                   help="also measure data.streaming over this many batches of 16 x 2048 (one process)")
    p.add_argument("--out", default=str(ROOT / "runs" / "data_scale"))
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, *rest = args.child
        fn = {"jaxalign": _jaxalign_prepare, "iterate": _jaxalign_iterate, "trl": _trl_prepare,
              "stream": _jaxalign_stream}[mode]
        print(json.dumps(fn(*[int(a) if a.isdigit() else a for a in rest])))
        return
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"rows-{args.rows}.jsonl"
    if not data.exists():
        t = time.perf_counter()
        generate(data, args.rows)
        print(f"wrote {args.rows} rows ({data.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - t:.0f}s")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.workers} workers")
    cache = out / f"cache-{args.rows}"
    shutil.rmtree(cache, ignore_errors=True)
    hf_cache = out / f"hf-{args.rows}"
    shutil.rmtree(hf_cache, ignore_errors=True)  # datasets' arrow copy of the rows: first time for both
    os.environ["HF_DATASETS_CACHE"] = str(hf_cache)
    results = {} if args.trl_only else {
        "first": _measure("jaxalign", str(data), str(cache), str(args.workers)),
        "warm": _measure("jaxalign", str(data), str(cache), str(args.workers)),
        "iterate": _measure("iterate", str(data), str(cache))}
    if args.trl or args.trl_only:
        from jaxalign.data.tokenizer import load_tokenizer

        hf_dir = out / "llama2-hf"
        load_tokenizer(str(TOKENIZER), "llama2").save_pretrained(str(hf_dir))
        shutil.rmtree(hf_cache, ignore_errors=True)
        results["trl"] = _measure("trl", str(data), str(hf_dir), str(args.workers))
    if args.trl_only:
        return
    first, warm = results["first"], results["warm"]
    print(f"\nfirst preparation: {first['rows_per_s']:,.0f} rows/s, peak PSS {first['peak_pss_mb']:,.0f} MB "
          f"({first['seconds']:.1f}s, {first['tokens']:,} tokens)")
    if "trl" in results:
        trl = results["trl"]
        print(f"TRL SFTTrainer:    {trl['rows_per_s']:,.0f} rows/s, peak PSS {trl['peak_pss_mb']:,.0f} MB "
              f"({trl['seconds']:.1f}s); jaxalign / TRL rows/s = {first['rows_per_s'] / trl['rows_per_s']:.2f}")
    print(f"warm store to the first batch: {warm['seconds']:.2f}s (from_cache={warm['from_cache']}), "
          f"peak PSS {warm['peak_pss_mb']:,.0f} MB")
    it = results["iterate"]
    print(f"iterating: RssAnon {it['rss_anon_mb_after_20']:,.0f} MB after 20 batches, "
          f"{it['rss_anon_mb_after_400']:,.0f} MB after 400")
    if args.stream:
        st = _measure("stream", str(data), str(args.stream))
        print(f"streaming (one process): {st['rows_per_s']:,.0f} rows/s over {args.stream} batches, RssAnon "
              f"{st['rss_anon_mb_after_20']:,.0f} MB after 20 batches, {st[f'rss_anon_mb_after_{args.stream}']:,.0f} MB "
              f"after {args.stream}, peak PSS {st['peak_pss_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
