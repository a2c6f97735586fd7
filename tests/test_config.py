"""Tests for rawnet_lib.config: presets, the paper recipe, layering, coercion, errors, f_params.txt,
notebook parameters and command-line flags."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rawnet_lib.io
from rawnet_lib.config import (PARAMS_DIR, REPO_DIR, Config, ConfigError, cli_config, cli_parser, declared_parameters,
                               input_path, load_config, notebook_config, preset_path, read_yaml, stage_frames,
                               write_f_params)
from rawnet_lib.errors import run_cli

PRESETS = ["paper", "demo", "smoke"]


# --- presets --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_name_themselves(name):
    cfg = load_config(name)
    assert cfg.preset == name
    assert cfg.train.name == name
    assert cfg.model.sinc_kernel % 2 == 1
    # Every preset YAML is in the block layout and only uses known blocks.
    raw = yaml.safe_load((PARAMS_DIR / f"{name}.yaml").read_text())
    assert set(raw) <= {"preset", *Config().blocks()}


def test_paper_preset_is_the_reference_recipe():
    cfg = load_config("paper")
    m, o, t, e = cfg.model, cfg.optim, cfg.train, cfg.evaluation
    assert m.n_samples == 59049 == 3 ** 10
    assert m.sample_rate == 16000
    assert m.sinc_filters == 128
    assert m.sinc_kernel == 251
    assert m.blocks == [128, 128, 256, 256, 256, 256]
    assert m.gru_units == 1024 and m.gru_layers == 1
    assert m.embedding_dim == 1024
    assert m.layer_norm is True and m.fast is False
    assert t.batch_size == 100
    assert t.epochs == 80
    assert o.lr == 1e-3 and isinstance(o.lr, float)
    assert o.weight_decay == 1e-4 and isinstance(o.weight_decay, float)
    assert o.amsgrad is True
    assert o.lr_decay == "keras"
    assert o.keras_decay == 1e-4 and isinstance(o.keras_decay, float)
    assert e.eval_hop == 47239 and m.n_samples - e.eval_hop == 11810
    assert e.crop_mode == "reference"


def test_defaults_are_the_paper_recipe():
    """With no preset the dataclass defaults alone give the reference model and optimiser."""
    bare, paper = load_config(None), load_config("paper")
    assert bare.model == paper.model
    assert bare.optim == paper.optim
    assert (bare.train.epochs, bare.train.batch_size) == (80, 100)


def test_preset_path_accepts_names_and_yaml_paths(tmp_path):
    assert preset_path("demo") == PARAMS_DIR / "demo.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("train: {epochs: 3}\n")
    assert preset_path(own) == own
    assert load_config(own).train.epochs == 3
    with pytest.raises(ConfigError, match="demo.*paper.*smoke"):
        preset_path("nosuch")
    with pytest.raises(ConfigError, match="does not exist"):
        preset_path(tmp_path / "missing.yaml")


# --- layering -------------------------------------------------------------------------------

def test_layering_order_defaults_preset_blocks_overrides():
    default = Config().train.epochs
    preset = load_config("demo")
    assert preset.train.epochs == 10 != default                      # preset over defaults
    assert preset.train.devices == Config().train.devices            # untouched field keeps default
    blocks = load_config("demo", blocks={"train": {"epochs": 4, "seed": 7}})
    assert (blocks.train.epochs, blocks.train.seed) == (4, 7)       # blocks over preset
    both = load_config("demo", blocks={"train": {"epochs": 4, "seed": 7}}, epochs=2)
    assert (both.train.epochs, both.train.seed) == (2, 7)           # flat overrides over blocks
    assert both.model == preset.model


def test_none_override_keeps_the_value():
    cfg = load_config("demo", blocks={"data": None}, epochs=None, lr=None, data_path=None)
    ref = load_config("demo")
    assert cfg.train.epochs == ref.train.epochs == 10
    assert cfg.optim.lr == ref.optim.lr
    assert cfg.data == ref.data


@pytest.mark.parametrize("name", PRESETS)
def test_papermill_block_layout_round_trips(name):
    """papermill -f params/x.yaml injects `preset`, `model`, `train`, ... as variables;
    passing them back as `blocks` must give the same config."""
    injected = yaml.safe_load((PARAMS_DIR / f"{name}.yaml").read_text())
    assert load_config(name, blocks=injected) == load_config(name)
    # The same blocks over a different preset set every key they name to the injected value.
    other = load_config("paper" if name != "paper" else "smoke", blocks=injected)
    want = load_config(name)
    for block, values in injected.items():
        if block != "preset":
            for key in values:
                assert getattr(getattr(other, block), key) == getattr(getattr(want, block), key), key


def test_block_widths_as_a_flat_override():
    """`blocks` is both the YAML-blocks argument and the model field; a list means the field,
    as `python -m rawnet_lib.train --blocks [16, 16]` passes it."""
    cfg = load_config("smoke", blocks=[16, 16, 32])
    assert cfg.model.blocks == [16, 16, 32]
    assert cfg.train == load_config("smoke").train
    # What the command line passes: `--blocks "[16, 32]"` parsed by yaml.safe_load, as a keyword.
    assert load_config("smoke", **{"blocks": yaml.safe_load("[16, 32]")}).model.blocks == [16, 32]


def test_flat_overrides_reach_every_block():
    cfg = load_config("smoke", n_samples=3 ** 8, data_path="/x", lr=0.5, devices=3, eval_hop=100)
    assert cfg.model.n_samples == 6561
    assert cfg.data.data_path == "/x"
    assert cfg.optim.lr == 0.5
    assert cfg.train.devices == 3
    assert cfg.evaluation.eval_hop == 100


# --- coercion -------------------------------------------------------------------------------

def test_yaml_exponent_strings_become_floats(tmp_path):
    """PyYAML reads `1e-3` (no dot) as a string; the loader must still give a float."""
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  weight_decay: 1e-4\n  keras_decay: 5E-5\n")
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == "1e-3"
    cfg = load_config(path)
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.0001 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.optim.keras_decay == 5e-5


def test_string_and_number_coercion():
    cfg = load_config("smoke", epochs="3", batch_size=16.0, lr=1, amsgrad="false", resume="yes",
                      name=12, blocks=[4, 4, "8"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.batch_size == 16 and isinstance(cfg.train.batch_size, int)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.amsgrad is False
    assert cfg.train.resume is True
    assert cfg.train.name == "12"
    assert cfg.model.blocks == [4, 4, 8]


@pytest.mark.parametrize("override, field", [
    ({"epochs": 2.5}, "epochs"), ({"epochs": "many"}, "epochs"), ({"lr": "fast"}, "lr"),
    ({"amsgrad": "maybe"}, "amsgrad"), ({"blocks": "128"}, "blocks"), ({"epochs": True}, "epochs"),
    ({"trial_lists": "O"}, "trial_lists"), ({"name": ["a"]}, "name"),
])
def test_wrong_types_raise_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config("smoke", **override)


# --- errors ---------------------------------------------------------------------------------

def test_unknown_flat_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown parameter 'devcies'.*did you mean devices"):
        load_config("smoke", devcies=2)


def test_unknown_block_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"'train\.epoch'.*did you mean.*epochs"):
        load_config("smoke", blocks={"train": {"epoch": 3}})
    # A real field in the wrong block is also refused, naming its block.
    with pytest.raises(ConfigError, match=r"YAML blocks: 'lr' is a field of the optim: block, not of model:; move"):
        load_config("smoke", blocks={"model": {"lr": 0.1}})


def test_values_out_of_range_are_refused_naming_the_file(tmp_path):
    bad = {"lr": -1, "gru_units": 0, "eval_hop": 0, "num_workers": -1, "val_pairs": 0, "momentum": -0.5,
           "blocks": [8, 0], "trial_lists": [], "node_rank": 1, "master_port": 99999}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config("smoke", **{key: value})
    with pytest.raises(ConfigError, match=r"lr=nan must be a positive number"):
        load_config("smoke", lr=float("nan"))
    with pytest.raises(ConfigError, match=r"margin=5\.0: an angular margin is in radians"):
        load_config("smoke", {"loss": {"head": "aam", "margin": 5}})
    mine = tmp_path / "mine.yaml"
    mine.write_text("train: {epochs: 0}\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(mine))}: epochs=0 must be at least 1"):
        load_config(mine)
    assert load_config(mine, epochs=2).train.epochs == 2  # a later layer mends it
    mine.write_text("loss: {scale: 30}\n")
    with pytest.raises(ConfigError, match=r"^scale=30\.0, margin=-1\.0"):  # two sources: no file blamed
        load_config(mine, margin=-1)
    mine.write_text("train: {epochs: ten}\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(mine))}: epochs='ten' is not a valid int"):
        load_config(mine)


def test_a_field_its_choice_rules_out_is_refused_where_it_was_set(tmp_path):
    """A margin without a margin head trained the reference softmax without a word. A preset's margin
    left over when a later layer switches the head to softmax is no error (a sweep arm on demo_modern),
    nor are fields set beside their choice (a run's config.yaml names every field)."""
    rule = r"loss\.margin acts only with loss\.head: am or aam, not softmax, so it would be ignored; set loss\.head: "
    with pytest.raises(ConfigError, match=rf"^parameters: {rule}am or aam, or remove loss\.margin$"):
        load_config("demo", margin=0.3)
    with pytest.raises(ConfigError, match=rf"^YAML blocks: {rule}"):
        load_config("demo", {"loss": {"margin": 0.3}})
    with pytest.raises(ConfigError, match=rf"^parameters: {rule}"):
        cli_config(cli_parser("prog", None).parse_args(["--margin", "0.3"]))
    mine = tmp_path / "mine.yaml"
    mine.write_text("preset: demo\nloss: {margin_schedule: [1, 4]}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(mine))}: loss\.margin_schedule acts only with loss\.head"):
        load_config(mine)
    assert load_config(mine, head="aam").loss.margin_schedule == [1, 4]  # a later layer chooses the head
    for preset, override, match in [
            ("rawnet2_modified", {"easy_margin": True}, r"loss\.easy_margin acts only with loss\.head: aam, not am"),
            ("rawnet2_modified", {"momentum": 0.5}, r"optim\.momentum acts only with optim\.optimizer: sgd, not adam"),
            ("rawnet2_modified", {"lr_gamma": 0.5}, r"optim\.lr_gamma acts only with optim\.lr_decay: exponential or "
                                                    r"step, not cosine"),
            ("demo", {"noise_prob": 0.9}, r"augment\.noise_prob acts only with augment\.enabled: true, not false"),
            ("demo", {"asnorm_top_k": 5}, r"evaluation\.asnorm_top_k acts only with evaluation\.asnorm: true")]:
        with pytest.raises(ConfigError, match=match):
            load_config(preset, **override)
    modern = load_config("demo_modern")
    switches = load_config("demo_modern", {"loss": {"head": "softmax"}}), load_config("demo_modern", head="softmax")
    for switched in switches:
        assert switched.loss.head == "softmax" and switched.loss.margin_schedule == modern.loss.margin_schedule
        assert Config.from_dict(switched.to_dict()) == switched
    mine.write_text("preset: demo_modern\nloss: {head: softmax}\naugment: {enabled: false}\n")
    assert load_config(mine).augment.noise_prob == modern.augment.noise_prob
    assert load_config("demo", head="softmax", margin=0.3).loss.margin == 0.3  # the head chosen beside it


def test_a_yaml_of_one_s_own_starts_from_the_preset_it_names(tmp_path):
    """As `-f` in a notebook and a sweep arm do; before, load_config and the CLI ignored it."""
    (tmp_path / "mine.yaml").write_text("preset: demo\ntrain: {epochs: 3}\n")
    (tmp_path / "more.yaml").write_text("preset: mine.yaml\noptim: {lr: 0.01}\n")
    cfg = load_config(tmp_path / "more.yaml")
    assert (cfg.model, cfg.train.epochs, cfg.optim.lr) == (load_config("demo").model, 3, 0.01)
    (tmp_path / "mine.yaml").write_text("preset: more.yaml\n")
    with pytest.raises(ConfigError, match=r"leads back to"):
        load_config(tmp_path / "more.yaml")
    (tmp_path / "mine.yaml").write_text("preset: demp\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: preset 'demp' is neither a preset \(.*demo.*\) nor a YAML"):
        load_config(tmp_path / "mine.yaml")
    # a run's config.yaml holds every block; its preset is then a label (the YAML it came from may be gone)
    resolved = tmp_path / "run" / "config.yaml"
    resolved.parent.mkdir()
    resolved.write_text(yaml.safe_dump({**cfg.to_dict(), "preset": "more.yaml"}))
    assert load_config(resolved).flat() == cfg.flat()
    merged = tmp_path / "sweep.yaml"  # YAML merge keys (sweep arms sharing settings) still load
    merged.write_text("arms:\n  a: &a {preset: smoke, train: {epochs: 1}}\n  b: {<<: *a, loss: {head: aam}}\n")
    assert read_yaml(merged)["arms"]["b"] == {"preset": "smoke", "train": {"epochs": 1}, "loss": {"head": "aam"}}


def test_a_key_given_twice_or_a_tab_is_named_with_its_line(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  epochs: 3\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"'epochs' is given twice in one mapping; keep one\s+in \".*twice\.yaml\", "
                                          r"line 3"):
        load_config(twice)
    tab = tmp_path / "tab.yaml"
    tab.write_text("train:\n\tepochs: 3\n")
    with pytest.raises(ConfigError, match=r"tab\.yaml is not valid YAML \(indent with spaces"):
        load_config(tab)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=rf"{path.name}.*learning_rate"):
        load_config(path)


def test_non_string_top_level_key_is_a_config_error(tmp_path):
    path = tmp_path / "intkey.yaml"
    path.write_text("1: 2\n")
    with pytest.raises(ConfigError, match="unknown parameter"):
        load_config(path)


@pytest.mark.parametrize("key, value, choices", [
    ("amp", "fp8", ["off", "bf16", "fp16"]),
    ("mode", "fast", ["full", "performance"]),
    ("device", "tpu", ["auto", "cpu", "cuda", "npu"]),
    ("lr_decay", "cosin", ["keras", "none", "cosine", "exponential", "step", "sgdr"]),
    ("on_bad_audio", "ignore", ["stop", "skip"]),
    ("crop_mode", "middle", ["reference", "full"]),
])
def test_bad_choice_names_the_valid_choices(key, value, choices):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", **{key: value})
    message = str(info.value)
    assert key in message and repr(value) in message
    assert all(c in message for c in choices)


@pytest.mark.parametrize("override, match", [
    ({"epochs": 0}, "epochs"), ({"batch_size": -1}, "batch_size"), ({"sinc_kernel": 250}, "odd"),
    ({"blocks": []}, "blocks"), ({"trial_lists": ["X"]}, "trial list"),
])
def test_invalid_values_raise(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("smoke", **override)


def test_non_finite_numbers_are_refused(tmp_path):
    """YAML's .nan and .inf are floats; they passed checks written as `x < 0` (false for nan)."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("preset: demo_modern\nloss: {scale: .inf}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(mine))}: scale=inf must be a finite number$"):
        load_config(mine)
    for override in ({"margin": float("nan")}, {"min_lr": float("nan")}, {"warmup_epochs": float("inf")},
                     {"weight_decay": float("inf")}, {"snr_noise": [0, float("inf")]}):
        with pytest.raises(ConfigError, match=rf"{next(iter(override))}=.* must be a finite number"):
            load_config("demo_modern", **override)


def test_a_crop_that_leaves_the_gru_no_frame_is_refused():
    """It passed validation and failed in max_pool1d at the first training step, after the run had
    set up; the least crop that works is named (smoke: 3^7 after the 60 samples the sinc layer takes)."""
    with pytest.raises(ConfigError, match=r"n_samples=2187 leaves the GRU no time frame.*at least 2247"):
        load_config("smoke", n_samples=2187)
    assert stage_frames(load_config("smoke", n_samples=2247).model)[-1][1] == 1
    assert load_config("smoke", n_samples=2187, block_pool=[True] * 5 + [False]).model.n_samples == 2187


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("text, match", [
    ("model: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("model: 3\n", "block 'model'"),
])
def test_malformed_yaml_files(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


# --- f_params.txt ---------------------------------------------------------------------------

def _read_f_params(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    assert all(":\t" in line for line in lines), lines
    pairs = [line.split(":\t", 1) for line in lines]
    return dict(pairs)


def test_f_params_has_every_field(tmp_path):
    cfg = load_config("paper", devices=8)
    path = tmp_path / "run" / "f_params.txt"
    write_f_params(cfg, path)
    values = _read_f_params(path)
    fields = [f.name for block in cfg.blocks().values() for f in dataclasses.fields(block)]
    assert list(values) == ["preset", *fields]
    assert len(fields) == len(set(fields))      # field names are unique across blocks
    assert values["preset"] == "paper"
    assert values["n_samples"] == "59049"
    assert values["devices"] == "8"
    assert values["lr"] == "0.001"
    assert values["blocks"] == "[128, 128, 256, 256, 256, 256]"
    assert values["amsgrad"] == "True"
    assert values["data_path"] == ""


def test_f_params_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "f_params.txt"
    path.write_text("old\n")
    seen = []

    def failing_replace(src, dst):
        seen.append((Path(src), Path(dst)))
        assert Path(src).read_text().startswith("preset:\tsmoke\n")   # complete before the swap
        raise OSError("disk gone")

    monkeypatch.setattr(rawnet_lib.io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_f_params(load_config("smoke"), path)
    assert path.read_text() == "old\n"                                  # target untouched
    assert os.listdir(tmp_path) == ["f_params.txt"]                     # temporary file removed
    (src, dst), = seen
    assert src.parent == dst.parent == tmp_path and src != dst


# --- fuzz -----------------------------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 6, 10 ** 6), st.floats(allow_nan=True),
                     st.text(max_size=12))
_field_names = st.sampled_from([f.name for b in Config().blocks().values() for f in dataclasses.fields(b)]
                               + ["preset", "modle", "lrr", ""])
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.one_of(_field_names, st.text(max_size=6)), inner, max_size=4),
                       max_leaves=10)
_block_names = st.sampled_from(["model", "data", "optim", "train", "evaluation", "preset"])


@settings(max_examples=150, deadline=None)
@given(blocks=st.dictionaries(st.one_of(_block_names, _field_names),
                              st.one_of(_values, st.dictionaries(_field_names, _values, max_size=4)),
                              max_size=4),
       overrides=st.dictionaries(_field_names.filter(lambda k: k.isidentifier() and k not in ("preset", "blocks")),
                                 _scalars, max_size=3))
def test_fuzz_random_dicts_raise_only_config_error(blocks, overrides):
    try:
        cfg = load_config("smoke", blocks=blocks, **overrides)
    except ConfigError:
        return
    assert isinstance(cfg, Config)
    assert cfg.model.sinc_kernel % 2 == 1 and cfg.model.blocks


_yaml_docs = st.one_of(
    st.text(max_size=80),
    _values.map(lambda v: yaml.safe_dump(v)),
    st.dictionaries(st.one_of(_block_names, _field_names, st.integers(), st.booleans()),
                    st.one_of(_values, st.dictionaries(_field_names, _values, max_size=3)), max_size=3)
    .map(lambda d: yaml.safe_dump(d)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_yaml_docs)
def test_fuzz_random_yaml_text_raises_only_config_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        cfg = load_config(path)
    except ConfigError:
        return
    assert isinstance(cfg, Config)


# --- notebook parameters --------------------------------------------------------------------
# IPython keeps each executed cell's source in `In` and the annotated names of the parameters
# cell in `__annotations__`; papermill's injected cell starts with `# Parameters`.

TRAIN_DECLARED = {"preset": "demo", "devices": None, "data_path": None, "epochs": None, "fast": None,
                  "mode": None, "device": None, "resume": None, "overwrite": None, "out_dir": None,
                  "master_port": None}


def _namespace(declared: dict, injected: dict | None = None) -> dict:
    """What a notebook's globals hold after its parameters cell (and papermill's cell, if any)."""
    cells = ["", "\n".join(f"{k}: {type(v).__name__} = {v!r}" for k, v in declared.items())]
    if injected is not None:
        cells.append("# Parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in injected.items()))
    return {"In": cells, "__annotations__": {k: object for k in declared}, **declared, **(injected or {})}


def test_notebook_defaults_keep_the_preset():
    assert notebook_config(_namespace(TRAIN_DECLARED)) == load_config("demo")
    assert notebook_config({**TRAIN_DECLARED, "__annotations__": dict.fromkeys(TRAIN_DECLARED)}) == load_config("demo")


def test_yaml_blocks_injected_with_f_survive():
    """papermill -f x.yaml injects the preset and the blocks; parameters left at None keep them."""
    yaml_blocks = {"preset": "smoke", "train": {"devices": 2, "mode": "performance", "device": "cpu", "resume": True,
                                                "overwrite": True, "out_dir": "/runs", "master_port": 29999},
                   "model": {"fast": True}, "data": {"data_path": "/db"}}
    cfg = notebook_config(_namespace(TRAIN_DECLARED, yaml_blocks))
    assert cfg.preset == "smoke" and cfg.model.sinc_filters == load_config("smoke").model.sinc_filters
    assert (cfg.train.devices, cfg.train.mode, cfg.train.device) == (2, "performance", "cpu")
    train = cfg.train
    assert (train.resume, train.overwrite, train.out_dir, train.master_port) == (True, True, "/runs", 29999)
    assert cfg.model.fast is True and cfg.data.data_path == "/db"
    # A parameter given with -p wins over the YAML.
    cfg = notebook_config(_namespace(TRAIN_DECLARED, {**yaml_blocks, "devices": 3}))
    assert cfg.train.devices == 3 and cfg.train.mode == "performance"


def test_fast_can_be_switched_off(tmp_path):
    preset = tmp_path / "fast.yaml"
    preset.write_text("model: {fast: true}\ntrain: {amp: bf16}\n")
    on = notebook_config(_namespace({**TRAIN_DECLARED, "preset": str(preset)}))
    assert on.model.fast is True
    off = notebook_config(_namespace({**TRAIN_DECLARED, "preset": str(preset)}, {"fast": False}))
    assert off.model.fast is False and off.train.amp == "bf16"


def test_misspelt_injected_parameter_names_the_declared_one():
    with pytest.raises(ConfigError, match=r"'epcohs'.*did you mean epochs"):
        notebook_config(_namespace(TRAIN_DECLARED, {"epcohs": 3}))
    # A notebook without a Config refuses the YAML blocks too: they would change nothing.
    with pytest.raises(ConfigError, match=r"'model'"):
        declared_parameters(_namespace({"sources": ""}, {"model": {"fast": True}}))
    values = declared_parameters(_namespace({"sources": "", "n_worst": 10}, {"n_worst": 2}))
    assert values == {"sources": "", "n_worst": 2}


@pytest.mark.parametrize("old, new", [("figures_dir", "out_dir"), ("out", "out_dir"), ("checkpoint", "pick"),
                                      ("batch", "batch_size")])
def test_a_renamed_parameter_names_its_new_name(old, new):
    """The names made one across the notebooks (every output folder `out_dir`, a run's model
    `pick`): an old name in a papermill command is told the new one, not a guess."""
    with pytest.raises(ConfigError, match=rf"{old!r} is now {new!r}; give -p {new} "):
        declared_parameters(_namespace({"sources": "", new: ""}, {old: "x"}))
    with pytest.raises(ConfigError, match=rf"unknown parameter {old!r}"):  # where the new name is not declared
        declared_parameters(_namespace({"sources": ""}, {old: "x"}))


def test_an_input_path_is_the_working_folders_else_the_repositorys(tmp_path, monkeypatch):
    """A notebook's kernel runs in notebooks/: `params/demo.yaml` or `outputs/...` given there
    are the repository's; a shell's relative path is its own folder's first."""
    monkeypatch.chdir(tmp_path)
    assert input_path("params/demo.yaml") == REPO_DIR / "params" / "demo.yaml"
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "demo.yaml").write_text("")
    assert input_path("params/demo.yaml") == Path("params/demo.yaml")
    assert input_path("no/such.txt") == Path("no/such.txt")  # as given, for the error naming it
    assert input_path(tmp_path / "x") == tmp_path / "x"


def test_injected_values_are_read_from_papermills_cell():
    """A later cell may reuse a block name (model.ipynb's `model` is the network): the injected
    literal counts, not whatever the name holds by the time the config cell runs."""
    namespace = _namespace({"preset": "smoke"}, {"model": {"fast": True}})
    namespace["model"] = object()
    assert notebook_config(namespace).model.fast is True


def test_interactive_edits_count_without_papermill():
    namespace = _namespace({**TRAIN_DECLARED, "preset": "smoke"})
    namespace["epochs"] = 7        # the user edited and reran the parameters cell
    namespace["In"].append("print(1)")
    assert notebook_config(namespace).train.epochs == 7


def test_own_parameters_are_not_config_fields():
    """evaluate.ipynb's out_dir is where its results go, not the training run's out_dir."""
    namespace = _namespace({"preset": "smoke", "out_dir": "/eval", "data_path": None})
    assert notebook_config(namespace, own=("out_dir",)).train.out_dir == load_config("smoke").train.out_dir
    stray = {**namespace, "lists": ["O"], "__annotations__": {**namespace["__annotations__"], "lists": list}}
    with pytest.raises(ConfigError, match=r"notebook parameter\(s\) lists are no Config field; name the field"):
        notebook_config(stray)  # a misnamed field (trial_lists) would be ignored silently
    assert notebook_config(stray, own=("lists",)) == notebook_config(namespace)
    assert notebook_config(namespace).train.out_dir == "/eval"


def test_a_base_config_keeps_its_model_block():
    base = load_config("smoke", epochs=5, data_path="/ckpt_db")
    cfg = notebook_config(_namespace({"preset": "paper", "data_path": None, "crop_mode": "full"}), base=base)
    assert cfg.model == base.model and cfg.train.epochs == 5 and cfg.data.data_path == "/ckpt_db"
    assert cfg.evaluation.crop_mode == "full"
    with pytest.raises(ConfigError, match=r"model\.sinc_filters.*checkpoint"):
        notebook_config(_namespace({"preset": "paper"}, {"preset": "demo", "model": {"sinc_filters": 4}}), base=base)


def test_injected_bad_value_names_the_field():
    with pytest.raises(ConfigError, match="epochs"):
        notebook_config(_namespace(TRAIN_DECLARED, {"epochs": "many"}))
    with pytest.raises(ConfigError, match=r"train\.epoch'.*epochs"):
        notebook_config(_namespace(TRAIN_DECLARED, {"train": {"epoch": 3}}))


# --- command lines --------------------------------------------------------------------------

def test_cli_flags_are_generated_from_the_config():
    parser = cli_parser("prog", None)
    cfg = cli_config(parser.parse_args(["--config", "smoke", "--amp", "off", "--resume", "--fast", "false",
                                        "--blocks", "8", "8", "16", "--trial_lists", "[O, E]", "--lr", "1e-2"]))
    assert (cfg.preset, cfg.train.amp, cfg.train.resume, cfg.model.fast) == ("smoke", "off", True, False)
    assert cfg.model.blocks == [8, 8, 16] and cfg.evaluation.trial_lists == ["O", "E"] and cfg.optim.lr == 0.01
    assert cli_config(parser.parse_args(["--config", "smoke"])) == load_config("smoke")
    with pytest.raises(SystemExit):
        parser.parse_args(["--epcohs", "3"])


def test_cli_fields_and_skip_choose_the_flags():
    parser = cli_parser("prog", None, fields=("data_path", "out_dir"), skip=("out_dir",))
    flags = {o for a in parser._actions for o in a.option_strings}
    assert flags == {"-h", "--help", "--config", "--data_path"}
    with pytest.raises(ConfigError, match=r"model\.n_samples"):
        cli_config(cli_parser("prog", None).parse_args(["--n_samples", "19683"]), base=load_config("smoke"))


def test_train_parse_args_layers_flags_over_the_preset():
    from rawnet_lib.train import _parse_args
    cfg = _parse_args(["--config", "smoke", "--epochs", "3", "--device", "cpu"])
    assert cfg == load_config("smoke", epochs=3, device="cpu")


def test_run_cli_prints_expected_errors_alone(capsys):
    def bad_preset():
        load_config("nosuch")

    with pytest.raises(SystemExit) as info:
        run_cli(bad_preset)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown preset 'nosuch'") and "Traceback" not in err
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: 1)
    assert info.value.code == 1
    with pytest.raises(ZeroDivisionError):   # a bug keeps its traceback
        run_cli(lambda: 1 / 0)


def test_module_command_prints_the_message_without_traceback(tmp_path, child_env):
    done = subprocess.run([sys.executable, "-m", "rawnet_lib.prep", "--config", "smoke", "--trial_lists", "X"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env=child_env())
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: trial list 'X'") and "Traceback" not in done.stderr


def test_misspelt_flag_names_the_real_one(capsys):
    from rawnet_lib.config import cli_parser
    with pytest.raises(SystemExit) as exit_:
        cli_parser("prog", None).parse_args(["--epcohs", "3"])
    assert exit_.value.code == 2
    assert "--epcohs (did you mean --epochs" in capsys.readouterr().err


def test_missing_data_path_is_a_message_without_traceback(tmp_path, child_env):
    done = subprocess.run([sys.executable, "-m", "rawnet_lib.prep", "--data_path", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env=child_env())
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: data_path {tmp_path / 'nowhere'} does not exist")


# --- presets as package data ----------------------------------------------------------------

def test_presets_are_package_data():
    """A regular install only has what the package carries: the presets must be inside it."""
    package = Path(rawnet_lib.io.__file__).parent
    assert PARAMS_DIR.resolve() == (package / "params").resolve()
    assert {p.name for p in PARAMS_DIR.glob("*.yaml")} >= {f"{n}.yaml" for n in PRESETS}
    pyproject = (package.parent / "pyproject.toml").read_text()
    assert '"params/*.yaml"' in pyproject
    # `papermill -f params/demo.yaml` from the checkout still finds the same file.
    assert (package.parent / "params" / "demo.yaml").read_text() == (PARAMS_DIR / "demo.yaml").read_text()


def test_from_dict_inverts_to_dict() -> None:
    """What a checkpoint or an ONNX export carries comes back as the same validated Config."""
    cfg = load_config("demo_modern", epochs=3)
    back = Config.from_dict(cfg.to_dict())
    assert back.to_dict() == cfg.to_dict() and back.preset == "demo_modern"
