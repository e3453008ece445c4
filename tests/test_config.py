"""Config system: schema defaults, YAML + overrides, error messages, safe loading, round trip."""

import textwrap

import pytest
import yaml

from jaxalign.config import (
    apply_overrides,
    config_to_dict,
    default_config,
    load_config,
    save_config,
    schema_help,
    validate,
)
from jaxalign.config.schema import iter_fields
from jaxalign.errors import JaxalignError


def write(tmp_path, text, name="x.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_defaults_load_and_validate():
    cfg = load_config(None)
    assert cfg.stage == "sft" and cfg.output_dir == "runs/default"
    assert cfg.dpo.beta == 0.1 and cfg.optimizer.lr == 1e-5 and cfg.mesh.fsdp == -1
    assert cfg.model.config.to_dict() == {} and cfg.generate.stop == []
    assert config_to_dict(cfg) == config_to_dict(default_config())
    validate(default_config())


def test_every_key_documented():
    for key, field in iter_fields():
        assert field.doc.strip(), key
    assert "dpo.beta (float) = 0.1" in schema_help()


def test_yaml_and_overrides_merge(tmp_path):
    path = write(tmp_path, """
        stage: dpo
        model: {config: {model_type: llama, hidden_size: 64, rms_norm_eps: 1e-6}}
        data: {train: [a.jsonl, b.jsonl], max_length: 256, max_prompt_length: 128}
        dpo:
          beta: 0.5
        sft:   # empty section is fine
        """)
    cfg = load_config(path, ["dpo.beta=0.2", "train.batch_size=16", "model.config.num_layers=2",
                             "mesh.rules.embed=[fsdp, tensor]"])
    assert cfg.stage == "dpo"
    assert cfg.dpo.beta == 0.2                      # override wins over the file
    assert cfg.dpo.loss == "sigmoid"                # untouched defaults stay
    assert cfg.data.train == ["a.jsonl", "b.jsonl"] and cfg.data.max_length == 256
    assert cfg.train.batch_size == 16
    mc = cfg.model.config.to_dict()
    assert mc == {"model_type": "llama", "hidden_size": 64, "rms_norm_eps": 1e-6, "num_layers": 2}
    assert cfg.mesh.rules.embed == ["fsdp", "tensor"]


def test_override_types_parsed():
    cfg = load_config(None, ["dpo.beta=0.2", "data.packing=false", "generate.stop=[a, b]",
                             "train.seed=3", "run_name=x y", "data.train=", "optimizer.lr=1"])
    assert cfg.dpo.beta == 0.2 and isinstance(cfg.dpo.beta, float)
    assert cfg.data.packing is False
    assert cfg.generate.stop == ["a", "b"]
    assert cfg.train.seed == 3 and isinstance(cfg.train.seed, int)
    assert cfg.run_name == "x y" and cfg.data.train == ""
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)   # int accepted as float
    cfg2 = apply_overrides(cfg, ["dpo.loss=ipo"])
    assert cfg2.dpo.loss == "ipo" and cfg.dpo.loss == "sigmoid"              # pure: input untouched


def test_exponent_string_accepted_for_float(tmp_path):
    path = write(tmp_path, "optimizer:\n  lr: 1e-5\n  eps: 1E-6\n")
    assert yaml.safe_load(open(path))["optimizer"]["lr"] == "1e-5"  # the YAML 1.1 quirk
    cfg = load_config(path, ["optimizer.b2=9.5e-1"])
    assert cfg.optimizer.lr == pytest.approx(1e-5) and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.eps == pytest.approx(1e-6) and cfg.optimizer.b2 == pytest.approx(0.95)


def test_unknown_key_names_key_and_suggestion(tmp_path):
    path = write(tmp_path, "dpo:\n  betta: 0.2\n")
    with pytest.raises(JaxalignError) as e:
        load_config(path)
    msg = str(e.value)
    assert "unknown config key 'dpo.betta'" in msg and path in msg
    assert "did you mean 'dpo.beta'?" in msg
    with pytest.raises(JaxalignError, match=r"'train\.lr'.*did you mean 'optimizer\.lr'"):
        load_config(None, ["train.lr=1e-4"])
    with pytest.raises(JaxalignError, match=r"unknown config key 'dpo\.betta'.*--set.*'dpo\.beta'"):
        load_config(None, ["dpo.betta=0.2"])


def test_a_key_holding_dots_is_an_unknown_key_not_a_crash(tmp_path):
    """Found by test_fuzz (hypothesis): a YAML key "." inside a section used to raise KeyError."""
    path = write(tmp_path, 'model:\n  ".": 1\n')
    with pytest.raises(JaxalignError, match=r"unknown config key 'model\.\.' \(in .*x\.yaml\)"):
        load_config(path)


def test_unknown_section(tmp_path):
    path = write(tmp_path, "dpoo:\n  beta: 0.2\n")
    with pytest.raises(JaxalignError, match=r"unknown config section 'dpoo'.*did you mean 'dpo'"):
        load_config(path)
    with pytest.raises(JaxalignError, match=r"unknown config section 'optimiser'.*'optimizer'"):
        load_config(None, ["optimiser.lr=1"])


def test_wrong_type_message(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: eight\n")
    with pytest.raises(JaxalignError) as e:
        load_config(path)
    assert "config key 'train.batch_size' expects int, got 'eight' (str)" in str(e.value)
    assert path in str(e.value)
    with pytest.raises(JaxalignError, match=r"'train\.seed' expects int, got True \(bool\)"):
        load_config(None, ["train.seed=true"])                   # bools are not ints
    with pytest.raises(JaxalignError, match=r"'dpo\.beta' expects float, got False \(bool\)"):
        load_config(None, ["dpo.beta=false"])
    with pytest.raises(JaxalignError, match=r"'data\.train' expects str, list of str, or list of \{path, weight\}"):
        load_config(None, ["data.train=[a, 1]"])
    with pytest.raises(JaxalignError, match=r"'data\.eval' expects str or list of str"):
        load_config(None, ["data.eval=[a, 1]"])
    with pytest.raises(JaxalignError, match=r"'model\.config' expects mapping"):
        load_config(None, ["model.config=[1]"])
    with pytest.raises(JaxalignError, match=r"'dpo\.beta' is a float, not a section"):
        load_config(None, ["dpo.beta.x=1"])


def test_bad_choice_lists_choices():
    with pytest.raises(JaxalignError) as e:
        load_config(None, ["dpo.loss=kto"])
    msg = str(e.value)
    assert "'dpo.loss'" in msg and "'kto'" in msg
    for choice in ("sigmoid", "ipo", "hinge", "robust"):
        assert f"'{choice}'" in msg
    with pytest.raises(JaxalignError, match=r"'stage' must be one of 'sft', 'dpo', 'rm', 'kto', 'orpo', 'simpo'; got 'ppo'"):
        load_config(None, ["stage=ppo"])


def test_dpo_loss_lists_and_their_rules():
    from jaxalign.config.checks import dpo_losses

    cfg = load_config(None, ["dpo.loss=[sigmoid, sft, bco_pair]", "dpo.loss_weights=[1, 0.5, 0.2]"])
    assert dpo_losses(cfg.dpo) == (("sigmoid", "sft", "bco_pair"), (1.0, 0.5, 0.2))
    assert dpo_losses(load_config(None, ["dpo.loss=hinge"]).dpo) == (("hinge",), (1.0,))
    # the old sft_weight is the sft term of the list
    assert dpo_losses(load_config(None, ["dpo.sft_weight=0.7"]).dpo) == (("sigmoid", "sft"), (1.0, 0.7))
    with pytest.raises(JaxalignError, match=r"'dpo\.loss' must be one of .*got 'kto'"):
        load_config(None, ["dpo.loss=[sigmoid, kto]"])
    with pytest.raises(JaxalignError, match=r"'dpo\.loss_weights' must have one weight per dpo\.loss entry \(2"):
        load_config(None, ["dpo.loss=[sigmoid, sft]", "dpo.loss_weights=[1]"])
    with pytest.raises(JaxalignError, match=r"'dpo\.loss_weights' expects list of float, got"):
        load_config(None, ["dpo.loss_weights=[a]"])
    with pytest.raises(JaxalignError, match=r"'dpo\.sft_weight' is the old spelling .* dpo\.loss_weights"):
        load_config(None, ["dpo.loss=[sigmoid, sft]", "dpo.sft_weight=1"])
    with pytest.raises(JaxalignError, match=r"'dpo\.f_divergence_type' js_divergence applies to .* not \['bco_pair'\]"):
        load_config(None, ["dpo.loss=[sigmoid, bco_pair]", "dpo.f_divergence_type=js_divergence"])
    with pytest.raises(JaxalignError, match=r"'dpo\.label_smoothing' must be > 0 for the exo_pair loss"):
        load_config(None, ["dpo.loss=exo_pair"])
    with pytest.raises(JaxalignError, match=r"'dpo\.ld_alpha' must be in \[0, 1\]"):
        load_config(None, ["dpo.ld_alpha=1.5"])
    # reference-free losses: auto means no reference; an explicit one is refused; ORPO holds its NLL term
    from jaxalign.run.build import objective_from_config, reference_kind

    cfg = load_config(None, ["stage=dpo", "dpo.loss=simpo"])
    assert reference_kind(cfg) == "none" and objective_from_config(cfg).dpo.reference_free
    assert reference_kind(load_config(None, ["stage=dpo", "dpo.reference=none"])) == "none"
    assert not objective_from_config(load_config(None, ["stage=dpo"])).dpo.reference_free
    with pytest.raises(JaxalignError, match=r"'dpo\.reference' must be none \(or auto\) for the simpo loss"):
        load_config(None, ["dpo.loss=simpo", "dpo.reference=precomputed"])
    with pytest.raises(JaxalignError, match=r"'dpo\.loss' orpo includes ORPO's NLL term .*drop sft"):
        load_config(None, ["dpo.loss=[orpo, sft]"])


def test_mesh_two_auto_axes_error():
    with pytest.raises(JaxalignError, match=r"at most one mesh axis may be -1.*mesh\.fsdp, mesh\.tensor"):
        load_config(None, ["mesh.tensor=-1"])
    with pytest.raises(JaxalignError, match=r"'mesh\.data' must be >= 1"):
        load_config(None, ["mesh.data=0"])
    with pytest.raises(JaxalignError, match=r"mesh\.rules\.embed"):
        load_config(None, ["mesh.rules.embed=fsd"])
    assert load_config(None, ["mesh.rules.embed=null"]).mesh.rules.embed is None


def test_cross_field_checks():
    with pytest.raises(JaxalignError, match=r"divisible by train\.micro_batch_size"):
        load_config(None, ["train.batch_size=8", "train.micro_batch_size=3"])
    assert load_config(None, ["train.micro_batch_size=4"]).train.micro_batch_size == 4
    with pytest.raises(JaxalignError, match=r"'dpo\.label_smoothing' must be in \[0, 0\.5\)"):
        load_config(None, ["dpo.label_smoothing=0.5"])
    with pytest.raises(JaxalignError, match=r"'data\.max_prompt_length' must be .*< data\.max_length"):
        load_config(None, ["data.max_length=512", "data.max_prompt_length=512"])
    with pytest.raises(JaxalignError, match=r"data\.format.*stage dpo"):
        load_config(None, ["stage=dpo", "data.format=messages"])
    # several problems are reported together
    with pytest.raises(JaxalignError, match=r"2 config errors"):
        load_config(None, ["dpo.beta=0", "generate.top_p=0"])


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, ["stage=dpo", "dpo.beta=0.25", "optimizer.lr=3e-6",
                             "data.train=[a.jsonl, b.jsonl]", "generate.stop=['###']",
                             "model.config={model_type: llama, hidden_size: 64, rope_theta: 1e4}",
                             "mesh.rules={embed: fsdp, heads: [tensor], vocab: null}"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    back = load_config(out)
    assert back == cfg
    assert config_to_dict(back) == config_to_dict(cfg)
    assert list(config_to_dict(cfg))[:3] == ["stage", "output_dir", "run_name"]  # schema order


def test_missing_file():
    with pytest.raises(JaxalignError, match=r"config file not found: /nonexistent/x\.yaml"):
        load_config("/nonexistent/x.yaml")


def test_override_without_equals():
    with pytest.raises(JaxalignError, match=r"config override 'dpo\.beta' is not KEY=VALUE"):
        load_config(None, ["dpo.beta"])
    with pytest.raises(JaxalignError, match=r"has no key"):
        load_config(None, ["=3"])


def test_python_object_tag_rejected(tmp_path):
    path = write(tmp_path, "stage: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(JaxalignError, match=r"cannot parse config file .*x\.yaml"):
        load_config(path)
    path = write(tmp_path, "stage: !!python/object:collections.OrderedDict {}\n", "y.yaml")
    with pytest.raises(JaxalignError, match=r"y\.yaml"):
        load_config(path)


def test_non_mapping_file(tmp_path):
    with pytest.raises(JaxalignError, match=r"must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    assert load_config(write(tmp_path, "", "empty.yaml")).stage == "sft"


def test_stage_orpo_and_simpo_name_stage_dpo_with_that_loss(tmp_path):
    """stage orpo / simpo resolve to stage dpo with that dpo.loss (saved that way, read back equal); a list must
    hold it; another loss is an error naming both keys."""
    cfg = load_config(None, ["stage=orpo"])
    assert cfg.stage == "dpo" and cfg.dpo.loss == "orpo"
    cfg = load_config(write(tmp_path, "stage: simpo\ndpo: {loss: [simpo, sft], loss_weights: [1.0, 0.5]}\n"))
    assert cfg.stage == "dpo" and list(cfg.dpo.loss) == ["simpo", "sft"]
    saved = save_config(cfg, tmp_path / "saved.yaml")
    assert config_to_dict(load_config(saved)) == config_to_dict(cfg)
    with pytest.raises(JaxalignError, match=r"'stage' is orpo, which trains dpo.loss orpo, but dpo.loss is 'ipo'"):
        load_config(write(tmp_path, "stage: orpo\ndpo: {loss: ipo}\n", "bad.yaml"))
    with pytest.raises(JaxalignError, match=r"dpo.loss is \['sigmoid', 'sft'\].*\(in --set stage=simpo\)"):
        load_config(None, ["dpo.loss=[sigmoid, sft]", "stage=simpo"])


def test_pipeline_recipes_and_the_preference_stages_overrides():
    """pipeline.stages takes the listed recipes only; every preference stage (dpo, kto, orpo, simpo) takes
    dpo.overrides, and an unknown key there names dpo.overrides."""
    from jaxalign.config import stage_config

    for stages in ("[sft, kto]", "[orpo]", "[sft, rm, simpo]", "[sft, orpo]"):
        load_config(None, [f"pipeline.stages={stages}"])
    for stages in ("[kto]", "[sft, rm, kto]", "[dpo]", "[sft, sft]"):
        with pytest.raises(JaxalignError, match=r"pipeline.stages.*must be one of \[sft, dpo\], \[sft, kto\]"):
            load_config(None, [f"pipeline.stages={stages}"])
    cfg = load_config(None, ["dpo.overrides={train: {max_steps: 7}, kto: {desirable_weight: 2.0}}"])
    for stage in ("dpo", "kto", "orpo", "simpo"):
        resolved = stage_config(cfg, stage)
        assert resolved.train.max_steps == 7 and resolved.kto.desirable_weight == 2.0
        assert resolved.stage == ("kto" if stage == "kto" else "dpo")
    assert stage_config(cfg, "orpo").dpo.loss == "orpo" and stage_config(cfg, "sft").train.max_steps != 7
    with pytest.raises(JaxalignError, match=r"dpo.overrides: unknown config key 'train.max_step'"):
        stage_config(load_config(None, ["dpo.overrides={train: {max_step: 7}}"]), "kto")


def test_wpo_weighting_refuses_the_losses_it_cannot_weigh():
    load_config(None, ["stage=dpo", "dpo.use_weighting=true", "dpo.loss=[sigmoid, sft]"])
    for loss in ("[sigmoid, aot]", "simpo"):
        with pytest.raises(JaxalignError, match=r"dpo.use_weighting.*does not apply to the \['(aot|simpo)'\] loss"):
            load_config(None, ["stage=dpo", "dpo.use_weighting=true", f"dpo.loss={loss}"])


def test_kto_unpaired_format_and_wpo_with_micro_batches():
    cfg = load_config(None, ["stage=kto", "data.format=unpaired"])
    assert cfg.data.format == "unpaired"
    with pytest.raises(JaxalignError, match=r"dpo.use_weighting.*needs the whole batch in one micro-batch"):
        load_config(None, ["stage=dpo", "dpo.use_weighting=true", "dpo.loss=[sigmoid, sft]", "train.batch_size=8",
                           "train.micro_batch_size=4"])
