"""gs:// run dirs, checkpoints, data, models and tokenizers, against a fake Cloud Storage (no network).

`fake_gcs` serves gs://BUCKET/KEY from a local directory through fsspec, which is what etils.epath
(and so Orbax) uses for gs:// when TensorFlow is absent, with the two object-store behaviours code
gets wrong: there are no directories (mkdir does nothing; a "directory" exists while objects share
its prefix) and no append (gcsfs opens "a" as "w", dropping what was there). Orbax writes arrays
through TensorStore's own GCS driver; the fixture points that driver at the same local directory,
so checkpoints go through Orbax's GCS code paths (commit-file atomicity, no renames) as well.

Each test runs in an empty working directory: a URL that pathlib or os.path collapsed to
"gs:/bucket/..." would land there, and the fixture fails the test if one did.
"""

from __future__ import annotations

import gc
import gzip
import importlib.util
import json
import pathlib
import warnings

import jax
import numpy as np
import pytest
import yaml
from etils import epath
from etils.epath import backend as epath_backend
from flax import nnx
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry as fsspec_registry
from orbax.checkpoint._src.path import gcs_utils
from tiny_runs import TINY_LLAMA, train_until

from jaxalign.checkpoint import model_io
from jaxalign.checkpoint.store import RunCheckpointer
from jaxalign.config import load_config, save_config, stage_config, validate
from jaxalign.data.sources import load_rows
from jaxalign.data.tokenize import DEFAULT_CACHE_DIR, resolve_cache_dir
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.errors import JaxalignError
from jaxalign.eval.report import build_report, write_report
from jaxalign.export.hf import save_hf
from jaxalign.models import ModelConfig, init_model
from jaxalign.run.loop import Trainer, check_run_dir
from jaxalign.runtime import paths, run_lock
from jaxalign.runtime.sharding import make_mesh, use_mesh


class FakeGCS(DirFileSystem):
    """gs://BUCKET/KEY kept in ROOT/BUCKET/KEY, with object-store semantics where they matter."""

    protocol = ("gs", "gcs")
    cachable = False  # `root` changes per test
    root = ""

    def __init__(self, *args, **kwargs):  # gcsfs options (finalize_on_close, ...) do not apply
        super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True))

    def mkdir(self, path, *args, **kwargs):
        pass

    def makedirs(self, path, *args, **kwargs):
        pass

    def open(self, path, mode="rb", *args, **kwargs):
        if "a" in mode:  # what gcsfs does
            warnings.warn("Append mode 'a' is not supported in GCS. Using overwrite mode instead.")
            mode = mode.replace("a", "w")
        return super().open(path, mode, *args, **kwargs)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """The local directory behind gs://; the working directory is an empty tmp dir."""
    root = tmp_path / "gcs"
    root.mkdir()
    monkeypatch.setattr(FakeGCS, "root", str(root))
    for protocol in FakeGCS.protocol:
        monkeypatch.setitem(fsspec_registry, protocol, FakeGCS)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    # Orbax asks the GCS API about the bucket's layout and gives TensorStore a GCS spec: answer
    # "flat bucket" and point TensorStore's spec at the same files.
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda path: {
        "driver": "file", "path": str(root / "/".join(gcs_utils.parse_gcs_path(path, add_trailing_slash=False)))})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    mangled = sorted(str(p) for p in cwd.rglob("gs:*"))
    assert not mangled, f"gs:// paths were collapsed to local paths: {mangled}"


def upload(local: pathlib.Path, url: str) -> str:
    paths.as_path(url).write_bytes(local.read_bytes())
    return url


# --- paths: the helpers themselves --------------------------------------------------------------

def test_urls_stay_urls():
    assert str(pathlib.Path("gs://bucket/run")) == "gs:/bucket/run"  # the bug as_path exists for
    run = paths.as_path("gs://bucket/run")
    assert isinstance(run, epath.Path) and paths.is_remote(run)
    assert str(run / "checkpoints" / "10") == "gs://bucket/run/checkpoints/10"
    assert str(paths.absolute(run)) == "gs://bucket/run"  # epath's own absolute() prepends the cwd
    assert str(run.parent) == "gs://bucket" and run.name == "run"
    assert str(paths.as_path(run / "x")) == "gs://bucket/run/x"
    local = paths.as_path("runs/x")
    assert type(local) is type(pathlib.Path()) and paths.absolute(local) == pathlib.Path.cwd() / "runs/x"
    assert not paths.exists("") and not paths.isdir("")  # as os.path has it; pathlib reads "" as "."


def test_object_store_file_operations(fake_gcs):
    log = paths.as_path("gs://bucket/run/metrics.jsonl")
    with pytest.warns(UserWarning, match="Append mode"):  # the fake overwrites on "a", as gcsfs does
        log.write_text("old\n")
        with log.open("a") as f:
            f.write("new\n")
    assert log.read_text() == "new\n"
    paths.append_text(log, "a\n")
    paths.append_text(log, "b\n")
    assert (fake_gcs / "bucket/run/metrics.jsonl").read_text() == "new\na\nb\n"

    paths.write_text_atomic("gs://bucket/run/config.yaml", "x: 1\n")
    assert sorted(p.name for p in (fake_gcs / "bucket/run").iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert paths.mtime("gs://bucket/run/config.yaml") > 0

    step = paths.as_path("gs://bucket/run/checkpoints/3")
    (step / "params").mkdir(parents=True, exist_ok=True)
    assert not step.exists()  # no directories on an object store until an object is in one
    (step / "params" / "a").write_text("A")
    (step / "meta").write_text("M")
    paths.move(step, "gs://bucket/run/skipped/3")
    assert not step.exists()
    assert (fake_gcs / "bucket/run/skipped/3/params/a").read_text() == "A"
    assert paths.glob("gs://bucket/run/*.yaml") == ["gs://bucket/run/config.yaml"]

    local = paths.local_copy("gs://bucket/run", keep=lambda name: name != "meta")
    assert not paths.is_remote(local) and (local / "skipped/3/params/a").read_text() == "A"
    assert not (local / "skipped/3/meta").exists()
    with paths.downloaded("gs://bucket/run/config.yaml") as copy:
        assert copy.read_text() == "x: 1\n"
    assert not copy.exists()

    with paths.local_dir_for("gs://bucket/up") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f.txt").write_text("up")
    assert (fake_gcs / "bucket/up/sub/f.txt").read_text() == "up"
    paths.remove("gs://bucket/up")
    assert not paths.exists("gs://bucket/up/sub/f.txt")


# --- data, config, tokenizer --------------------------------------------------------------------

def test_data_files_globs_and_dirs_on_gs(fake_gcs, tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    paths.as_path("gs://bucket/data/a.jsonl").write_text(lines[: len(lines) // 2])
    paths.as_path("gs://bucket/data/b.jsonl.gz").write_bytes(gzip.compress(lines.encode()))

    ds = load_rows("gs://bucket/data/*.jsonl*")
    assert len(ds) == 9 and set(ds["_source"]) == {"gs://bucket/data/a.jsonl", "gs://bucket/data/b.jsonl.gz"}
    assert len(load_rows("gs://bucket/data")) == 9
    assert load_rows("gs://bucket/data/b.jsonl.gz", max_rows=2)["prompt"] == ["p0", "p1"]

    paths.as_path("gs://bucket/bad.jsonl").write_text('{"prompt": "p"}\n{"prompt": \n')
    with pytest.raises(JaxalignError, match=r"gs://bucket/bad\.jsonl:2: malformed JSON"):
        load_rows("gs://bucket/bad.jsonl")
    with pytest.raises(JaxalignError, match="'gs://bucket/missing.jsonl' does not exist"):
        load_rows("gs://bucket/missing.jsonl")


def test_config_and_tokenizer_on_gs(fake_gcs, shared_data):
    cfg = load_config(None, ["output_dir=gs://bucket/run", "data.train=gs://bucket/data/train.jsonl"])
    assert save_config(cfg, "gs://bucket/run/config.yaml") == "gs://bucket/run/config.yaml"
    assert load_config("gs://bucket/run/config.yaml").to_dict() == cfg.to_dict()
    sft_dir = paths.as_path(cfg.output_dir) / "sft"  # how the pipeline points its stages at their run dirs
    assert stage_config(cfg, "sft", [f"output_dir={sft_dir}"]).output_dir == "gs://bucket/run/sft"

    local = load_tokenizer(str(shared_data / "llama2-tokenizer.model"))
    remote = load_tokenizer(upload(shared_data / "llama2-tokenizer.model", "gs://bucket/tok/tokenizer.model"))
    assert remote.encode(" Hello  world") == local.encode(" Hello  world")
    paths.as_path("gs://bucket/tok/t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with_template = load_tokenizer("gs://bucket/tok/tokenizer.model", "gs://bucket/tok/t.jinja")
    assert with_template.chat_template_name == "gs://bucket/tok/t.jinja"
    with pytest.raises(JaxalignError, match="does not exist"):
        load_tokenizer("gs://bucket/nope")


def test_tokenized_cache_stays_local():
    cfg = {"output_dir": "gs://bucket/run", "data": {"cache_dir": ""}}
    assert resolve_cache_dir(cfg) == DEFAULT_CACHE_DIR
    assert resolve_cache_dir({**cfg, "output_dir": "runs/x"}) == "runs/x/cache"
    with pytest.raises(JaxalignError, match="data.cache_dir"):
        validate({"data": {"cache_dir": "gs://bucket/cache"}})


# --- models and checkpoints -------------------------------------------------------------------

def params_of(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def assert_same_params(a, b) -> None:
    jax.tree.map(np.testing.assert_array_equal, params_of(a), params_of(b))


def test_hf_export_and_jaxalign_checkpoint_on_gs(fake_gcs, shared_data):
    """save_hf and save_model_checkpoint write to gs:// (tokenizer files uploaded); both load back from
    gs://, the HF dir through a download that is deleted once the weights are on the devices."""
    mesh = make_mesh({"fsdp": -1})
    tokenizer = load_tokenizer(str(shared_data / "llama2-tokenizer.model"))
    with use_mesh(mesh):
        model = init_model(ModelConfig.from_hf_dict(TINY_LLAMA), mesh, seed=1)
        save_hf(model, model.cfg, "gs://bucket/hf", tokenizer=tokenizer)
        assert (fake_gcs / "bucket/hf/model.safetensors").is_file()
        assert (fake_gcs / "bucket/hf/tokenizer.json").is_file()
        assert model_io.source_dtype("gs://bucket/hf") == "float32"
        from_hf = model_io.load_model("gs://bucket/hf", mesh)
        assert_same_params(model, from_hf)
        assert not list(paths._scratch_root().rglob("*.safetensors"))

        out = model_io.save_model_checkpoint(model, "gs://bucket/ckpt", tokenizer, "float32")
        assert str(out) == "gs://bucket/ckpt"
        assert (fake_gcs / "bucket/ckpt/tokenizer/tokenizer.model").is_file()
        assert_same_params(model, model_io.load_model("gs://bucket/ckpt", mesh))
        again = model_io.model_tokenizer("gs://bucket/ckpt")
        assert again.encode("a b c") == tokenizer.encode("a b c")


def test_checkpoint_dir_is_handed_to_orbax_as_a_url_and_quarantine_moves_objects(fake_gcs):
    ckpt = RunCheckpointer("gs://bucket/run/checkpoints", keep=3, async_save=False)
    assert str(ckpt.manager.directory) == "gs://bucket/run/checkpoints"
    tree = {"w": np.arange(4.0)}
    for step in (1, 2):
        ckpt.save(step, tree, tree, {"note": step})
    assert ckpt.all_steps() == [1, 2]
    moved = ckpt.quarantine(2)
    assert str(moved) == "gs://bucket/run/skipped_checkpoints/2"
    assert (fake_gcs / "bucket/run/skipped_checkpoints/2/meta").exists()
    assert ckpt.all_steps() == [1] and ckpt.restore_meta(1)["note"] == 1
    ckpt.close()


# --- a whole run ----------------------------------------------------------------------------------

def train_config(shared_data: pathlib.Path, **train) -> dict:
    rows = gzip.open(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz", "rt").readlines()[:96]
    paths.as_path("gs://bucket/data/train.jsonl").write_text("".join(rows))
    upload(shared_data / "llama2-tokenizer.model", "gs://bucket/tok/tokenizer.model")
    return {
        "stage": "sft", "output_dir": "gs://bucket/runs/sft",
        "model": {"config": dict(TINY_LLAMA)},
        "tokenizer": {"path": "gs://bucket/tok/tokenizer.model", "chat_template": "plain"},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "data": {"train": "gs://bucket/data/train.jsonl", "format": "preference", "sft_from_preference": True,
                 "eval_fraction": 0.2, "max_length": 128, "max_prompt_length": 64, "pad_to_multiple_of": 64,
                 "on_bad_row": "skip"},
        "train": {"batch_size": 8, "max_steps": 4, "eval_every": 2, "log_every": 1, **train},
        "eval": {"batch_size": 8},
        "checkpoint": {"every_steps": 2, "keep": 2},
    }


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_train_resume_and_load_a_run_on_gs(fake_gcs, shared_data, tmp_path, monkeypatch, caplog):
    """SFT into gs://, stopped after step 2 and resumed: every run-dir file is an object in the bucket,
    metrics.jsonl keeps every record (no append on GCS), the run dir resolves to its best checkpoint
    as a gs:// path, and that checkpoint loads; the tokenized cache goes to the local default."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config_file = tmp_path / "sft.yaml"
    config_file.write_text(yaml.safe_dump(train_config(shared_data)))
    cfg = load_config(config_file)

    first = train_until(Trainer(cfg), 2)
    assert first["stopped_at"] == 2
    with pytest.raises(JaxalignError, match="already holds a run"):
        check_run_dir(cfg, resume=False, overwrite=False)
    summary = Trainer(cfg, resume=True).train()
    assert summary["steps"] == 4
    assert "gs://bucket/runs/sft is a URL: it is not locked" in caplog.text
    if importlib.util.find_spec("tensorboardX"):  # the `tensorboard` extra: it needs google-cloud-storage for gs://
        assert "no TensorBoard events in gs://bucket/runs/sft/tensorboard" in caplog.text
    caplog.clear()  # its records hold tensorboardX's half-built GCS writer, whose __del__ fails:
    gc.collect()  # let that happen here, where the filter above ignores it
    assert run_lock.live_holder("gs://bucket/runs/sft") is None

    run = fake_gcs / "bucket/runs/sft"
    for name in ("config.yaml", "best.json", "summary.json", "data_stats.json", "model/jaxalign_model.json",
                 "model/tokenizer/tokenizer.json", "checkpoints/2/params", "checkpoints/4/params"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if "loss" in r) == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval/loss" in r] == [2, 4]

    best = json.loads((run / "best.json").read_text())["step"]
    assert summary["best_checkpoint"] == f"gs://bucket/runs/sft/checkpoints/{best}"
    resolved = model_io.resolve_model_path("gs://bucket/runs/sft")
    assert str(resolved) == summary["best_checkpoint"]
    mesh = make_mesh({"fsdp": -1})
    with use_mesh(mesh):
        remote = model_io.load_model("gs://bucket/runs/sft", mesh)
        local = model_io.load_model(run, mesh)  # the same files, read as a local run dir
    assert_same_params(remote, local)
    assert list((tmp_path / "home/.cache/jaxalign/tokenized").glob("*/meta.json"))

    files = write_report("gs://bucket/runs/report", build_report({"sft": {"eval_loss": 1.0}}, {"title": "t"}),
                         {"sft": "gs://bucket/runs/sft/metrics.jsonl"})
    assert [str(f) for f in files][:2] == ["gs://bucket/runs/report/report.json", "gs://bucket/runs/report/report.md"]
    assert (fake_gcs / "bucket/runs/report/report.md").is_file()


class FakeHub(DirFileSystem):
    """hf://[datasets/]OWNER/NAME/FILE kept in ROOT/[datasets/]OWNER/NAME/FILE: the hub, offline."""

    protocol = ("hf",)
    cachable = False
    root = ""

    def __init__(self, *args, **kwargs):
        super().__init__(path=self.root, fs=LocalFileSystem())


def test_hh_tiny_reads_the_hub_and_offline_its_local_copies(shared_data, tmp_path, monkeypatch, capsys):
    """configs/hh_tiny.yaml names the hub's files; the documented local override gives the same data.
    Without the hub (HF_HUB_OFFLINE, as here) the hub config fails with an error that says what to do."""
    from jaxalign import cli

    config = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "hh_tiny.yaml")
    run = [f"output_dir={tmp_path / 'run'}", "data.max_rows=400"]
    local = ["data.train=" + str(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz"),
             "tokenizer.path=" + str(shared_data / "llama2-tokenizer.model")]
    inspect = lambda sets: cli.main(["data", "inspect", "--config", config,  # noqa: E731
                                     *[a for s in sets for a in ("--set", s)]])
    assert inspect(run) == 2
    assert "'hf://NousResearch/Llama-2-7b-hf/tokenizer.model' does not exist (HF_HUB_OFFLINE is set" \
        in capsys.readouterr().err
    assert inspect([*run, local[1]]) == 2
    assert "'hf://datasets/Anthropic/hh-rlhf/harmless-base/test.jsonl.gz' does not exist (HF_HUB_OFFLINE is set" \
        in capsys.readouterr().err
    assert inspect([*run, *local]) == 0
    offline = capsys.readouterr().out
    assert "stage: sft\nexamples: 379\n" in offline  # 400 rows less the 5% held out, one empty reply skipped

    hub = tmp_path / "hub"
    cfg = load_config(config)
    for url, copy in zip((cfg.data.train, cfg.tokenizer.path), local):
        target = hub / url.removeprefix("hf://")
        target.parent.mkdir(parents=True)
        target.write_bytes(pathlib.Path(copy.split("=", 1)[1]).read_bytes())
    monkeypatch.setattr(FakeHub, "root", str(hub))
    monkeypatch.setitem(fsspec_registry, "hf", FakeHub)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        assert inspect(run) == 0
    finally:
        epath_backend.fsspec_backend._get_filesystem.cache_clear()
    assert capsys.readouterr().out == offline
