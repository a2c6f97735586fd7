"""Issue 12: confidence intervals against scipy, sweep files checked before training, and a
tiny sweep (smoke preset, tiny corpus, 2 seeds x 2 arms x 1 epoch) resumed after an interruption."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml
from scipy import stats as sps

from rawnet_lib import sweep as sweep_mod
from rawnet_lib.config import REPO_DIR, Config, ConfigError, load_config
from rawnet_lib.dataset.augment import AugmentError
from rawnet_lib.dataset.trials import read_trials
from rawnet_lib.dataset.utterances import load_utterances
from rawnet_lib.errors import MissingPathError, WorkbookError
from rawnet_lib.eval.metrics import eer
from rawnet_lib.eval.scoring import load_scores
from rawnet_lib.eval.stats import bootstrap_eer, bootstrap_interval, paired_difference, t_interval
from rawnet_lib.evaluate import evaluation_identity
from rawnet_lib.io import file_sha1
from rawnet_lib.training.run import NonFiniteLossError, RunDir
from rawnet_lib.views.analysis import score_sources


def test_t_interval_matches_scipy():
    x = np.array([3.1, 2.4, 4.0, 3.3])
    mean, low, high = t_interval(x)
    ref = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert mean == pytest.approx(x.mean()) and (low, high) == pytest.approx(ref, rel=1e-12)
    assert np.isnan(t_interval([2.0])[1])
    a, b = np.array([3.0, 4.0, 5.0]), np.array([2.0, 3.5, 3.9])
    diff = paired_difference(a, b)
    ref = sps.ttest_rel(b, a).confidence_interval(0.95)
    assert diff[1:] == pytest.approx((ref.low, ref.high), rel=1e-12)


def test_bootstrap_matches_scipy_percentile():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200)
    n_boot = 4000
    ours = bootstrap_interval(np.mean, [x], n_boot=n_boot, seed=1)
    ref = sps.bootstrap((x,), np.mean, n_resamples=n_boot, method="percentile", random_state=2).confidence_interval
    # two Monte-Carlo estimates of a 2.5 % quantile of the bootstrap distribution (sd ~ se): each
    # has sd sqrt(p(1-p)/B) / pdf(z_p) * se; allow 5 such sds for their difference
    se = x.std(ddof=1) / np.sqrt(len(x))
    sd = np.sqrt(0.025 * 0.975 / n_boot) / sps.norm.pdf(sps.norm.ppf(0.025)) * se
    assert ours == pytest.approx((ref.low, ref.high), abs=5 * np.sqrt(2) * sd)


def test_bootstrap_eer_brackets_the_eer():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(1, 1, 300), rng.normal(-1, 1, 3000)])
    labels = np.concatenate([np.ones(300), np.zeros(3000)])
    low, high = bootstrap_eer(scores, labels, n_boot=300)
    true_eer = sps.norm.cdf(-1)  # the crossing of two unit normals 2 apart
    assert low < true_eer < high and high - low < 0.1


def test_speaker_bootstrap_resamples_whole_speakers():
    """Identical speakers: every resample of speakers has the same trials, so the interval is a
    point; speakers that differ (an offset each) widen it well beyond the trial bootstrap."""
    rng = np.random.default_rng(0)
    one = np.concatenate([rng.normal(1, 1, 30), rng.normal(-1, 1, 60)])
    labels = np.tile(np.r_[np.ones(30), np.zeros(60)], 8)
    same = np.tile(one, 8)
    low, high = bootstrap_eer(same, labels, n_boot=100, groups=np.repeat(np.arange(8), 90))
    assert low == high == pytest.approx(eer(same, labels))
    shifted = same + np.repeat(rng.normal(0, 1.5, 8), 90) * labels  # each speaker's targets sit elsewhere
    by_speaker = bootstrap_eer(shifted, labels, n_boot=300, groups=np.repeat(np.arange(8), 90))
    by_trial = bootstrap_eer(shifted, labels, n_boot=300)
    assert by_speaker[1] - by_speaker[0] > 1.5 * (by_trial[1] - by_trial[0])


def test_two_way_speaker_bootstrap_is_the_bootstrap_of_the_resampled_trial_lists():
    """Each resample of voices built literally: every ordered pair of draws (i, j) of different
    voices brings the trials from voice i to voice j, a draw paired with itself its own voice's
    trials (targets, and non-targets of another speed of it), two draws of one voice nothing more;
    the EERs of those lists give the same interval as the multiplicity weights."""
    rng = np.random.default_rng(3)
    n_voices, n, n_boot, seed = 7, 600, 150, 5
    enroll, test = rng.integers(0, n_voices, n), rng.integers(0, n_voices, n)
    test[:200] = enroll[:200]  # within-voice trials: targets, and some non-targets
    labels = (enroll == test) & (rng.random(n) < 0.8)
    scores = rng.normal(size=n) + 2 * labels + rng.normal(size=n_voices)[enroll] + rng.normal(size=n_voices)[test]
    names = np.array([f"voice{v}" for v in range(n_voices)])
    ours = bootstrap_eer(scores, labels, n_boot, seed=seed, groups=names[enroll], test_groups=names[test])
    draws, eers = np.random.default_rng(seed), []
    for _ in range(n_boot):
        drawn = draws.integers(0, n_voices, n_voices)
        picked = np.concatenate([np.flatnonzero((enroll == a) & (test == b)) for i, a in enumerate(drawn)
                                 for j, b in enumerate(drawn) if i == j or a != b])
        y = labels[picked]
        eers.append(eer(scores[picked], y) if 0 < y.sum() < len(y) else np.nan)
    assert ours == pytest.approx(tuple(np.nanquantile(eers, [0.025, 0.975])), rel=1e-12, abs=0)
    with pytest.raises(ValueError, match="test_groups needs groups"):
        bootstrap_eer(scores, labels, test_groups=names[test])


def test_two_way_speaker_bootstrap_sees_what_the_test_side_s_voices_do():
    """Voices that shift the non-target scores when they are tested (not when they enrol): the
    one-way bootstrap over enrolment voices keeps every test voice in each draw and is barely wider
    than the trial bootstrap; the two-way one leaves them out too."""
    rng = np.random.default_rng(0)
    n_voices, n = 20, 1500
    enroll, test = rng.integers(0, n_voices, n), rng.integers(0, n_voices, n)
    test[:500] = enroll[:500]
    labels = (enroll == test) & (rng.random(n) < 0.8)
    scores = rng.normal(size=n) + 2 * labels + rng.normal(0, 1, n_voices)[test] * ~labels
    width = {name: np.diff(bootstrap_eer(scores, labels, 200, seed=1, **groups))[0] for name, groups in (
        ("trials", {}), ("one_way", {"groups": enroll}), ("two_way", {"groups": enroll, "test_groups": test}))}
    assert width["one_way"] < 1.5 * width["trials"] and width["two_way"] > 2 * width["one_way"]


def test_a_speaker_draw_without_targets_is_left_out_not_fatal():
    """With few voices a draw can hold no target trial (every copy a voice enrolled in non-targets
    only): that draw has no EER and is left out instead of stopping the sweep's summary."""
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.15])
    labels = np.array([1, 1, 0, 0, 0, 0])
    groups = np.array(["a", "a", "a", "b", "b", "b"])  # b enrols non-targets only
    low, high = bootstrap_eer(scores, labels, n_boot=40, groups=groups)
    assert low == high == 0.0  # the draws with a's trials separate perfectly


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # the first arm is the baseline
    return path


@pytest.mark.parametrize("spec, error, match", [
    ({"seeds": [1], "arms": {"a": {"loss": {"hed": "am"}}}}, ConfigError,
     r"arm 'a': YAML blocks: unknown parameter 'loss.hed'; did you mean head"),
    ({"seeds": [1], "arms": {"a": {"loss": {"head": "arc"}}}}, ConfigError,
     r"arm 'a': head='arc' is not one of softmax, am, aam"),
    ({"seeds": [1], "arms": {"a": {"train": {"seed": 4}}}}, ConfigError, r"seed are set by the sweep"),
    ({"seeds": [1], "arms": {"a": {"preset": "demo_modern", "loss": {"head": "softmax"}},
                             "b": {"loss": {"margin": 0.3}}}}, ConfigError,
     r"arm 'b': YAML blocks: loss\.margin acts only with loss\.head: am or aam, not softmax"),
    ({"seeds": [1], "arms": {"a": {}}, "armz": {}}, ConfigError, r"unknown key\(s\) armz; valid keys: seeds"),
    ({"seeds": "1", "arms": {"a": {}}}, ConfigError, r"seeds must be a list of distinct integers"),
    ({"seeds": [1], "arms": {"a b": {}}}, ConfigError, r"arm 'a b': an arm name becomes a folder name"),
    ({"seeds": [1], "arms": {"base": {}, "Base": {}}}, ConfigError, r"arm names base, Base differ only in case"),
    ({"seeds": [-1], "arms": {"a": {}}}, ConfigError, r"arm 'a': seed=-1 must be between 0 and 2\*\*32 - 1"),
    ({"seeds": [1], "lists": ["O", "E", "my/O.txt"], "arms": {"a": {}}}, ConfigError,
     r"s\.yaml: lists \['O', 'E', 'my/O.txt'\] would report O twice .* rename one of the files"),
    ({"seeds": [1], "arms": {"a": {"augment": {"enabled": True, "noise_dir": "EMPTY"}}}}, AugmentError,
     r"arm 'a': noise_dir .* has no \.wav files"),
    ({"seeds": [1], "pick": "average", "arms": {"a": {}}}, ConfigError,
     r"s.yaml: unknown checkpoint choice 'average'; valid: best, last or avg_last<N>"),
    ({"seeds": [1], "pick": "avg_last20", "arms": {"a": {"train": {"epochs": 10}}}}, ConfigError,
     r"arm 'a' trains 10 epochs, pick avg_last20 averages 20; choose avg_last10 or fewer"),
    ({"seeds": [1], "pick": "avg_last2", "arms": {"a": {"train": {"save_every_epoch": False}}}}, ConfigError,
     r"arm 'a' keeps no model per epoch \(save_every_epoch: false\), which pick avg_last2 needs"),
    ({"seeds": [1], "checkpoint": "last", "arms": {"a": {}}}, ConfigError,
     r"unknown key\(s\) checkpoint \(checkpoint is now pick\); valid keys: seeds, lists, arms, preset, pick"),
])
def test_bad_sweeps_fail_before_training(tmp_path, monkeypatch, spec, error, match):
    (tmp_path / "EMPTY").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep_mod, "train", lambda cfg: pytest.fail("trained despite a bad sweep"))
    with pytest.raises(error, match=match):
        sweep_mod.run_sweep(_write(tmp_path / "s.yaml", spec), tmp_path / "out")


def test_data_the_sweep_cannot_use_fails_before_training(tiny_db, tmp_path, monkeypatch):
    """A validation list the data cannot hold, a noise file the augmentation cannot use, a test list
    that is not there, n_boot 0 or a folder holding another sweep's tables: each named before any
    run trains."""
    monkeypatch.setattr(sweep_mod, "train", lambda cfg: pytest.fail("trained despite a bad sweep"))
    ok = {"preset": "smoke", "data": {"data_path": str(tiny_db)}}
    spec = {"seeds": [1], "arms": {"a": ok, "b": {**ok, "data": {**ok["data"], "val_pairs": 100000}}}}
    path, out = _write(tmp_path / "s.yaml", spec), tmp_path / "out"
    with pytest.raises(ConfigError, match=r"s\.yaml: arm 'b': val_pairs=100000, but the \d+ validation utterances "
                                          r".* set data\.val_pairs"):
        sweep_mod.run_sweep(path, out)
    path = _write(tmp_path / "s.yaml", {"seeds": [1], "lists": ["O", "H"], "arms": {"a": ok}})
    (tiny_db / "VoxCeleb1" / "list_test_hard.txt").rename(tmp_path / "hard.txt")
    try:
        with pytest.raises(ConfigError, match=r"s\.yaml: arm 'a': trial list H: .*list_test_hard\.txt does not exist; "
                                              r"the seed's layout keeps the official lists in .*VoxCeleb1: put it"):
            sweep_mod.run_sweep(path, out)
    finally:
        (tmp_path / "hard.txt").rename(tiny_db / "VoxCeleb1" / "list_test_hard.txt")
    noise = tmp_path / "musan" / "noise" / "hum.wav"  # a second arm's noise at the wrong rate: named before arm a
    noise.parent.mkdir(parents=True)
    sf.write(noise, np.zeros(8000, dtype=np.float32), 8000)
    noisy = {**ok, "augment": {"enabled": True, "noise_dir": str(noise.parents[1])}}
    path = _write(tmp_path / "s.yaml", {"seeds": [1], "arms": {"a": ok, "b": noisy}})
    with pytest.raises(AugmentError, match=r"s\.yaml: arm 'b': .*hum\.wav: .*8000 Hz.*resample it to 16000 Hz"):
        sweep_mod.run_sweep(path, out)
    path = _write(tmp_path / "s.yaml", {"seeds": [1], "lists": [str(tmp_path / "no.txt")], "arms": {"a": ok}})
    with pytest.raises(ConfigError, match=r"trial list .*no\.txt: .*no\.txt does not exist; give an existing file"):
        sweep_mod.run_sweep(path, out)
    with pytest.raises(ConfigError, match=r"n_boot=0: the bootstrap needs at least 1 resample"):
        sweep_mod.run_sweep(path, out, n_boot=0)
    other = _write(tmp_path / "other.yaml", {"seeds": [1], "arms": {"a": ok}})
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"sweep": str(other)}))
    with pytest.raises(WorkbookError, match=r"out holds the tables of the sweep .*other\.yaml, not of .*s\.yaml; give "
                                            r"this sweep a folder of its own"):
        sweep_mod.run_sweep(_write(tmp_path / "s.yaml", {"seeds": [1], "arms": {"a": ok}}), out)


def test_another_sweep_s_tables_refuse_the_folder_whichever_model_either_scores(tmp_path):
    """The tables of another sweep file in DIR (its best models') or in DIR/<choice>/ refuse this
    sweep for every choice: it would overwrite DIR/sweep.yaml and take that sweep's runs of arms of
    the same names for its own. Its own tables are no obstacle."""
    arms = {"a": {"preset": "smoke"}}
    other, path = (_write(tmp_path / name, {"seeds": [1], "arms": arms}) for name in ("other.yaml", "s.yaml"))
    out = tmp_path / "out"
    for tables in (out, out / "avg_last2"):
        tables.mkdir(parents=True, exist_ok=True)
        (tables / "summary.json").write_text(json.dumps({"sweep": str(other)}))
        for pick in ("best", "last"):
            with pytest.raises(WorkbookError, match=rf"{tables.name} holds the tables of the sweep .*other\.yaml, "
                                                    r"not of .*s\.yaml; give this sweep a folder of its own"):
                sweep_mod._check_own_folder(sweep_mod.load_sweep(path, out, pick=pick))
        (tables / "summary.json").write_text(json.dumps({"sweep": str(path)}))
    sweep_mod._check_own_folder(sweep_mod.load_sweep(path, out, pick="last"))


def test_a_relative_folder_is_the_repository_s_as_for_runs(tmp_path, monkeypatch):
    """The notebook runs in notebooks/: the tables and the runs must land in one folder."""
    monkeypatch.chdir(tmp_path)
    spec = sweep_mod.load_sweep(_write(tmp_path / "s.yaml", {"seeds": [1], "arms": {"a": {}}}), "outputs/sweeps/x")
    assert spec.out == REPO_DIR / "outputs" / "sweeps" / "x"
    assert sweep_mod.run_path(spec.configs["a"][1]).is_relative_to(spec.out)


def test_an_arm_edited_after_training_is_refused(tmp_path, monkeypatch):
    """A finished run of an arm whose overrides changed since would be reused as the new recipe's result."""
    monkeypatch.setattr(sweep_mod, "train", lambda cfg: pytest.fail("trained despite an edited arm"))
    spec = {"seeds": [1], "arms": {"a": {"preset": "smoke"}}}
    cfg = sweep_mod.load_sweep(_write(tmp_path / "s.yaml", spec), tmp_path / "out").configs["a"][1]
    run = sweep_mod.run_path(cfg)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    spec["arms"]["a"]["optim"] = {"lr_decay": "cosine"}
    sweep_mod.load_sweep(_write(tmp_path / "s.yaml", spec), tmp_path / "out")  # killed in epoch 1: trained again
    (run / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"arm 'a': .*a-seed1 was trained with other settings \(lr_decay: 'keras' "
                                          r"-> 'cosine'\); give the arm another name"):
        sweep_mod.run_sweep(_write(tmp_path / "s.yaml", spec), tmp_path / "out")
    # a run may resume with another precision or path, but an arm's results depend on them
    spec["arms"]["a"] = {"preset": "smoke", "train": {"amp": "bf16"}, "model": {"fast": True}}
    with pytest.raises(ConfigError, match=r"other settings \(fast: False -> True; amp: 'off' -> 'bf16'\)"):
        sweep_mod.load_sweep(_write(tmp_path / "s.yaml", spec), tmp_path / "out")


def test_a_finished_run_is_not_reused_for_other_training_data(tiny_db, tmp_path, monkeypatch):
    """Data folders may move, so an arm pointed at another corpus would reuse models trained on the
    old one: the corpus itself (utterances and hours) decides, before anything trains."""
    monkeypatch.setattr(sweep_mod, "train", lambda cfg: pytest.fail("trained"))
    monkeypatch.setattr(sweep_mod, "_evaluate_run", lambda *args, **kwargs: None)
    monkeypatch.setattr(sweep_mod, "summarise", lambda spec, n_boot, failed: "summarised")
    spec = {"seeds": [1], "arms": {"a": {"preset": "smoke", "data": {"data_path": str(tiny_db)}}}}
    cfg = sweep_mod.load_sweep(_write(tmp_path / "s.yaml", spec), tmp_path / "out").configs["a"][1]
    run = sweep_mod.run_path(cfg)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    utts = load_utterances(tiny_db, cfg.data.train_dir, progress=False)
    (run / "run.json").write_text(json.dumps({"utterances": len(utts), "hours": utts.seconds() / 3600}))
    (run / "summary.json").write_text("{}")
    moved = tmp_path / "moved"
    shutil.copytree(tiny_db, moved)
    spec["arms"]["a"]["data"]["data_path"] = str(moved)
    assert sweep_mod.run_sweep(_write(tmp_path / "s.yaml", spec), tmp_path / "out") == "summarised"
    next((moved / cfg.data.train_dir).rglob("*.wav")).unlink()  # now another corpus
    with pytest.raises(WorkbookError, match=rf"s\.yaml: arm 'a': .*a-seed1 trained on {len(utts)} utterances .*, "
                                            rf"but its training data now holds {len(utts) - 1} .*moved.*: its results "
                                            r"would describe other data; point data_path back, or move"):
        sweep_mod.run_sweep(_write(tmp_path / "s.yaml", spec), tmp_path / "out")
    shutil.rmtree(moved / cfg.data.train_dir)  # scored again where only VoxCeleb1 is: reused, with a warning
    with pytest.warns(UserWarning, match=r"arm 'a': .*VoxCeleb2/wav is not there, so whether the finished run "
                                         r"a-seed1 trained on the arm's data is not checked"):
        assert sweep_mod.run_sweep(_write(tmp_path / "s.yaml", spec), tmp_path / "out") == "summarised"


def test_an_arm_on_several_devices_trains_through_torchrun(tmp_path, monkeypatch):
    """Ranks never run inside the sweep's process (or a notebook's kernel): devices: 2 goes to the
    launcher, one device trains in-process; several nodes are refused."""
    started = []
    monkeypatch.setattr(sweep_mod, "launch", lambda cfg, cwd: started.append(("launch", cfg.train.devices)))
    monkeypatch.setattr(sweep_mod, "train", lambda cfg: started.append(("train", cfg.train.devices)))
    spec = {"seeds": [1], "arms": {"one": {"preset": "smoke"}, "two": {"preset": "smoke", "train": {"devices": 2}}}}
    configs = sweep_mod.load_sweep(_write(tmp_path / "s.yaml", spec), tmp_path / "out").configs
    for arm in ("one", "two"):
        sweep_mod._train_run(configs[arm][1], print)
    assert started == [("train", 1), ("launch", 2)]
    spec["arms"]["two"]["train"]["nnodes"] = 2
    with pytest.raises(ConfigError, match=r"arm 'two': nnodes 2: a sweep trains on one machine"):
        sweep_mod.load_sweep(_write(tmp_path / "s.yaml", spec), tmp_path / "out")


def test_the_tables_cover_every_seed_finished_for_every_arm(tmp_path):
    """Seeds beyond those asked join the sweep when every arm's run of them finished with the arm's
    settings; one arm only, a started run, a name the sweep does not write (01) or a run of other
    settings (with a warning) do not."""
    spec = {"seeds": [1], "arms": {"a": {"preset": "smoke"}, "a2": {"preset": "smoke"}}}
    path, out = _write(tmp_path / "s.yaml", spec), tmp_path / "out"
    assert sweep_mod.load_sweep(path, out).seeds == [1]  # no folder yet
    runs = out / "train_1P" / "DNNS"
    for name in ("a-seed4", "a2-seed4", "a-seed5", "a-seed01", "a2-seed01", "a-seed6", "a-seed7", "a2-seed7"):
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text("{}")
    (runs / "a2-seed6" / "models").mkdir(parents=True)
    (runs / "a2-seed6" / "models" / "last.pt").write_text("")  # started, not finished
    edited = sweep_mod.load_sweep(path, out, seeds=[7]).configs["a2"][7].to_dict()
    edited["optim"]["lr"] = 0.5
    (runs / "a2-seed7" / "config.yaml").write_text(yaml.safe_dump(edited))
    with pytest.warns(UserWarning, match=r"seed\(s\) 7 finished in .* with other settings"):
        sweep = sweep_mod.load_sweep(path, out, seeds=[2, 1])
    assert sweep.seeds == [1, 2, 4] and sorted(sweep.configs["a2"]) == [1, 2, 4]
    assert "--seeds 1 2 4" in sweep.command


def test_an_arm_fine_tunes_each_seed_s_run_of_an_earlier_arm(tmp_path):
    """WeSpeaker's large-margin step compared over seeds: `init_from_arm` starts each seed's run from
    the best model of the named arm's run of the same seed, which the seed-major order trains first."""
    ft = {"preset": "smoke", "init_from_arm": "base", "model": {"n_samples": 8000},
          "loss": {"head": "aam", "margin": 0.5}}
    path = _write(tmp_path / "s.yaml", {"seeds": [1, 2], "arms": {"base": {"preset": "smoke"}, "ft": ft}})
    sweep = sweep_mod.load_sweep(path, tmp_path / "out")  # the base's runs need not exist yet
    for seed in (1, 2):
        cfg = sweep.configs["ft"][seed]
        assert cfg.train.init_from == str(sweep_mod.run_path(sweep.configs["base"][seed]))
        assert cfg.model.n_samples == 8000 and cfg.loss.margin == 0.5 and cfg.train.seed == seed
    for arms, match in (({"ft": ft, "base": {}}, r"arm 'ft': init_from_arm 'base' is not an arm before it .*arms "
                                                 r"before it: none \(it is the first arm\)"),
                        ({"a": {}, "ft": {**ft, "init_from_arm": "b"}}, r"init_from_arm 'b' is not an arm before it"
                                                                         r".*arms before it: a$"),
                        ({"base": {}, "ft": {**ft, "train": {"init_from": "x.pt"}}}, r"init_from_arm 'base' and "
                                                                                     r"train\.init_from both say")):
        with pytest.raises(ConfigError, match=match):
            sweep_mod.load_sweep(_write(tmp_path / "s.yaml", {"seeds": [1], "arms": arms}), tmp_path / "out")


def test_example_sweeps_load(tmp_path):
    spec = sweep_mod.load_sweep("demo_recipes", tmp_path)
    assert spec.arms[:2] == ["reference_2020", "modern"] and spec.seeds == [1, 2, 3]
    assert spec.configs["modern"][2].train.seed == 2 and spec.configs["modern"][2].loss.head == "aam"
    more = sweep_mod.load_sweep("demo_recipes", tmp_path, seeds=[1, 2, 3, 4, 5])  # more seeds, same runs
    assert more.seeds == [1, 2, 3, 4, 5] and more.configs["modern"][5].train.seed == 5
    assert sweep_mod.run_path(more.configs["modern"][2]) == sweep_mod.run_path(spec.configs["modern"][2])
    with pytest.raises(ConfigError, match="seeds given .--seeds.*must be a list of distinct integers"):
        sweep_mod.load_sweep("demo_recipes", tmp_path, seeds=[4, 4])
    amp = sweep_mod.load_sweep("demo_amp", tmp_path)
    assert [amp.configs[arm][1].train.amp for arm in amp.arms] == ["off", "bf16"]


def test_results_of_a_changed_list_are_not_reused(tiny_db, tmp_path, monkeypatch):
    """A run's earlier evaluation counts only while it scored the same model with the arm's settings
    and each list is the file it scored: a new corpus version rewrites the lists, and results on the
    old ones would be silently mixed in. Results of the same model scored otherwise are not replaced."""
    trials = tmp_path / "mine.txt"
    trials.write_text((tiny_db / "VoxCeleb1" / "veri_test.txt").read_text())
    out = tmp_path / "run" / "eval" / "best_opt_eval"
    out.mkdir(parents=True)
    model = tmp_path / "run" / "models" / "best_opt_eval.pt"
    model.parent.mkdir()
    model.write_bytes(b"weights")
    calls = []
    monkeypatch.setattr(sweep_mod, "evaluate", lambda ckpt, cfg, lists, *a, **k: calls.append((lists, k["overwrite"])))
    cfg = load_config("smoke", {"data": {"data_path": str(tiny_db)}})
    roots = [tiny_db / d for d in cfg.data.eval_dirs]

    def evaluated_on(sha: str | None, weights: str = "", scored_as: Config = cfg) -> bool:
        identity = evaluation_identity(model, scored_as, roots) | ({"fingerprint": weights} if weights else {})
        row = {"list": "mine", "scoring": "cosine"} | ({"list_sha1": sha} if sha else {})
        (out / "metrics.json").write_text(json.dumps({"fingerprint": identity["fingerprint"], "identity": identity,
                                                      "metrics": [row]}))
        calls.clear()
        sweep_mod._evaluate_run(tmp_path / "run", cfg, [str(trials)], progress=False)
        assert calls in ([], [([str(trials)], bool(weights))])  # only another model's results are replaced
        return bool(calls)

    assert not evaluated_on(read_trials(trials).sha1)  # the same list: reused
    moved = evaluation_identity(model, cfg, roots) | {"roots": ["/elsewhere/VoxCeleb1/test_wav"]}
    row = {"list": "mine", "scoring": "cosine", "list_sha1": read_trials(trials).sha1}
    (out / "metrics.json").write_text(json.dumps({"identity": moved, "metrics": [row]}))
    calls.clear()
    sweep_mod._evaluate_run(tmp_path / "run", cfg, [str(trials)], progress=False)
    assert calls == []  # the corpus moved since: the same results
    assert evaluated_on(None)  # an evaluation that did not record its list
    old = read_trials(trials).sha1
    trials.write_text("".join(trials.read_text().splitlines(keepends=True)[:-2]))
    assert evaluated_on(old)
    before = file_sha1(model)
    model.write_bytes(b"other weights")  # the same name, other weights (an average made again): scored again
    assert evaluated_on(read_trials(trials).sha1, weights=before)
    full = load_config("smoke", {"data": {"data_path": str(tiny_db)}, "evaluation": {"crop_mode": "full"}})
    with pytest.raises(WorkbookError, match=r"best_opt_eval holds results of this model scored with other settings "
                                            r"than the arm's \(differing: crop_mode, eval_hop\); move that folder"):
        evaluated_on(read_trials(trials).sha1, scored_as=full)


def test_the_training_table_reads_each_run_s_history(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    val = [0.30, 0.20, float("nan"), 0.25, 0.22, 0.26]  # epoch 3's validation failed: never best, left out
    history = [{"epoch": i + 1, "val_eer": v, "accuracy": 0.1 * (i + 1), "epoch_seconds": 10.0 + i}
               for i, v in enumerate(val)]
    (run / "history.json").write_text(json.dumps(history))
    runs = pd.DataFrame([{"arm": "a", "seed": 1, "list": tag, "run": str(run)} for tag in ("O", "E")])
    row = sweep_mod._training_table(runs).iloc[0]
    assert (row["epochs"], row["best_epoch"]) == (6, 2) and row["best_val_eer"] == pytest.approx(20.0)
    assert row["val_eer_last10"] == pytest.approx(np.mean([30, 20, 25, 22, 26]))
    assert row["val_eer_step_median"] == pytest.approx(np.median([3, 4]))  # second half: 25, 22, 26
    assert row["train_accuracy"] == pytest.approx(0.6) and row["epoch_seconds_median"] == pytest.approx(12.5)


def test_a_run_that_never_scored_a_list_of_the_sweep_is_named(tmp_path):
    path = _write(tmp_path / "s.yaml", {"seeds": [1], "lists": ["O", "E"], "arms": {"a": {"preset": "smoke"}}})
    spec = sweep_mod.load_sweep(path, tmp_path / "out")
    run = sweep_mod.run_path(spec.configs["a"][1])
    (run / "models").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    (run / "models" / "best_opt_eval.pt").write_bytes(b"weights")
    (run / "eval" / "best_opt_eval").mkdir(parents=True)
    (run / "eval" / "best_opt_eval" / "scores_O.txt").write_text("0.5 1\n0.1 0\n")
    row = {"list": "O", "scoring": "cosine", "eer": 0.0, "min_dcf_0.01": 0.0, "trials": 2}
    (run / "eval" / "best_opt_eval" / "metrics.json").write_text(json.dumps({"metrics": [row]}))
    with pytest.raises(MissingPathError, match=r"best_opt_eval/metrics\.json holds no cosine result of list E; run "
                                               r"`python -m rawnet_lib\.sweep"):
        sweep_mod.summarise(spec, n_boot=10)


def _scored_run(spec: sweep_mod.Sweep, arm: str, seed: int, db: Path, shift: float,
                scorings: tuple[str, ...] = ("cosine",)) -> None:
    """A finished run of the sweep scored on list O (names file included), without training: voices
    v0-v5 at two speeds each (speakers v<k>s<speed>), targets within a speaker; each scoring's
    scores are shifted by one more."""
    rng = np.random.default_rng(seed)
    run = sweep_mod.run_path(spec.configs[arm][seed])
    (run / "models").mkdir(parents=True)
    (run / "models" / "best_opt_eval.pt").write_bytes(b"weights")
    (run / "summary.json").write_text("{}")
    (run / "history.json").write_text(json.dumps([{"epoch": 1, "val_eer": 0.2, "accuracy": 0.5,
                                                            "epoch_seconds": 1.0}]))
    speakers = [f"v{v}s{s}" for v in range(6) for s in range(2)]
    enroll, test = rng.choice(speakers, 300), rng.choice(speakers, 300)
    test[:100] = enroll[:100]
    labels = (enroll == test).astype(int)
    out = run / "eval" / "best_opt_eval"
    out.mkdir(parents=True)
    rows = []
    for i, scoring in enumerate(scorings):
        scores = rng.normal(size=300) + (2 + i) * labels + shift
        stem = "scores_O" + ("_asnorm" if scoring == "asnorm" else "")
        (out / f"{stem}_names.txt").write_text("".join(f"{x} {y} {e}/vid/1.wav {t}/vid/2.wav\n"
                                                       for x, y, e, t in zip(scores, labels, enroll, test)))
        rows.append({"list": "O", "scoring": scoring, "eer": eer(scores, labels), "min_dcf_0.01": 1.0,
                     "trials": 300, "list_sha1": "a" * 40})
    (out / "metrics.json").write_text(json.dumps({"data_path": str(db), "metrics": rows}))


def test_the_runs_table_s_intervals_and_seeds_an_arm_lacks(tmp_path):
    """runs.csv: the speaker intervals resample base voices (both speeds of one voice together), the
    one-way over enrolment voices, the two-way (eer_spk_both_*) over both sides; a seed whose run of
    one arm did not finish is left out of that arm's mean and of the paired difference only."""
    db = tmp_path / "db"
    db.mkdir()
    (db / "corpus.json").write_text(json.dumps({"speakers": [{"id": f"v{v}s{s}", "voice": f"v{v}"}
                                                             for v in range(6) for s in range(2)]}))
    path = _write(tmp_path / "s.yaml", {"seeds": [1, 2], "arms": {"a": {"preset": "smoke"}, "b": {"preset": "smoke"}}})
    spec = sweep_mod.load_sweep(path, tmp_path / "out")
    for arm, seed in (("a", 1), ("a", 2), ("b", 1)):
        _scored_run(spec, arm, seed, db, shift=0.0 if arm == "a" else 0.5)
    with pytest.warns(UserWarning, match=r"1 run\(s\) not finished yet.*: b-seed2"):
        tables = sweep_mod.summarise(spec, n_boot=30)
    runs = tables["runs"]
    for row in runs.itertuples():
        scores = load_scores(tmp_path / "out" / row.scores)
        data = scores[["score", "label"]].to_numpy(float)
        enroll, test = (scores[side].str[:2].to_numpy() for side in ("enroll", "test"))  # v<k>s<speed>/...: v<k>
        one = bootstrap_eer(data[:, 0], data[:, 1], 30, seed=row.seed, groups=enroll)
        both = bootstrap_eer(data[:, 0], data[:, 1], 30, seed=row.seed, groups=enroll, test_groups=test)
        assert (row.eer_spk_low, row.eer_spk_high) == pytest.approx(tuple(100 * np.array(one)), rel=1e-12)
        assert (row.eer_spk_both_low, row.eer_spk_both_high) == pytest.approx(tuple(100 * np.array(both)), rel=1e-12)
    assert tables["summary"]["n_seeds"].tolist() == [2, 1] and np.isnan(tables["summary"]["eer_ci_low"].iloc[1])
    paired = tables["paired"].iloc[0]
    a1, b1 = (runs.query("arm == @arm and seed == 1")["eer"].iloc[0] for arm in ("a", "b"))
    assert paired["n_pairs"] == 1 and paired["eer_diff"] == pytest.approx(b1 - a1)
    assert np.isnan(paired["eer_diff_ci_low"])  # one pair: no interval
    assert list(pd.read_csv(tmp_path / "out" / "runs.csv").columns[:10]) == [
        "arm", "seed", "list", "eer", "eer_boot_low", "eer_boot_high", "eer_spk_low", "eer_spk_high",
        "eer_spk_both_low", "eer_spk_both_high"]


def test_an_arm_scored_with_asnorm_is_summarised_on_its_asnorm_scores(tmp_path):
    """An arm with evaluation.asnorm is compared on what it asked for, not on the cosine scores
    its evaluation writes beside them."""
    db = tmp_path / "db"
    db.mkdir()
    arms = {"cosine": {"preset": "smoke"}, "asnorm": {"preset": "smoke", "evaluation": {"asnorm": True}}}
    spec = sweep_mod.load_sweep(_write(tmp_path / "s.yaml", {"seeds": [1], "arms": arms}), tmp_path / "out")
    for arm in arms:
        _scored_run(spec, arm, 1, db, shift=0.0, scorings=("cosine", "asnorm"))
    runs = sweep_mod.summarise(spec, n_boot=10)["runs"].set_index("arm")
    out = {arm: sweep_mod.run_path(spec.configs[arm][1]) / "eval" / "best_opt_eval" for arm in arms}
    for arm, stem in (("cosine", "scores_O"), ("asnorm", "scores_O_asnorm")):
        scores = load_scores(out[arm] / f"{stem}_names.txt")
        assert runs.loc[arm, "scoring"] == arm
        assert runs.loc[arm, "eer"] == pytest.approx(100 * eer(scores["score"].to_numpy(), scores["label"].to_numpy()))
        assert Path(runs.loc[arm, "scores"]).name == f"{stem}_names.txt"
    assert runs.loc["cosine", "eer"] != runs.loc["asnorm", "eer"]


def test_a_failed_run_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    """A run that fails (here: a NaN loss) is named with its reason after every other run trained and
    was scored; the tables cover those, summary.json records it, and the command exits non-zero."""
    db = tmp_path / "db"
    db.mkdir()
    path = _write(tmp_path / "s.yaml", {"seeds": [1, 2], "arms": {"a": {"preset": "smoke"}, "b": {"preset": "smoke"}}})
    spec = sweep_mod.load_sweep(path, tmp_path / "out")
    done = []

    def train_run(cfg, log):
        if cfg.train.name == "a-seed1":
            raise NonFiniteLossError("epoch 3, step 17: the loss is nan")
        return sweep_mod.run_path(cfg)

    def evaluate_run(folder, cfg, lists, progress, which):
        arm = cfg.train.name.split("-seed")[0]
        _scored_run(spec, arm, cfg.train.seed, db, shift=0.0)
        done.append(cfg.train.name)

    monkeypatch.setattr(sweep_mod, "_check_data", lambda *args: None)
    monkeypatch.setattr(sweep_mod, "_train_run", train_run)
    monkeypatch.setattr(sweep_mod, "_evaluate_run", evaluate_run)
    with pytest.warns(UserWarning, match="not finished yet.*a-seed1"), \
            pytest.raises(sweep_mod.SweepRunsFailed, match=r"1 run\(s\) of .* failed; the tables in .* cover the "
                                                          r"others:\n  a-seed1: NonFiniteLossError: epoch 3, step 17"):
        sweep_mod.run_sweep(path, tmp_path / "out", n_boot=10)
    assert done == ["b-seed1", "a-seed2", "b-seed2"]
    assert "failed  a-seed1: the sweep goes on" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failed"] == {"a-seed1": "NonFiniteLossError: epoch 3, step 17: the loss is nan"}
    assert [row["n_seeds"] for row in summary["summary"]] == [1, 2]


@pytest.mark.slow
def test_a_sweep_resumes_a_run_stopped_between_its_epochs(tiny_db, tmp_path, monkeypatch, capsys):
    """A run stopped after epoch 1 of 2 (its last.pt saved) continues at epoch 2 when the sweep runs
    again: the first epoch is neither trained again nor rewritten."""
    spec = _write(tmp_path / "s.yaml", {"seeds": [1], "lists": ["O"], "arms": {
        "ref": {"preset": "smoke", "data": {"data_path": str(tiny_db)}, "train": {"epochs": 2}}}})
    end_epoch = RunDir.end_epoch

    def stop_after_the_first(self, epoch, *args, **kwargs):
        end_epoch(self, epoch, *args, **kwargs)
        if epoch == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "end_epoch", stop_after_the_first)
        with pytest.raises(KeyboardInterrupt):
            sweep_mod.run_sweep(spec, tmp_path / "out", progress=False, n_boot=20)
    run = tmp_path / "out" / "train_1P" / "DNNS" / "ref-seed1"
    first = json.loads((run / "history.json").read_text())
    weights = next((run / "models").glob("TA_1_*.pt"))
    stamp = weights.stat().st_mtime_ns
    assert sweep_mod.run_state(run) == "started" and len(first) == 1
    capsys.readouterr()
    tables = sweep_mod.run_sweep(spec, tmp_path / "out", progress=False, n_boot=20)
    assert "resume  ref-seed1" in capsys.readouterr().out
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 2 and history[0] == first[0] and weights.stat().st_mtime_ns == stamp
    assert tables["training"]["epochs"].tolist() == [2]


@pytest.mark.slow
def test_tiny_sweep_resumes_after_an_interruption(tiny_db, tmp_path, monkeypatch, run_notebook, capsys):
    smoke = {"preset": "smoke", "data": {"data_path": str(tiny_db)}, "train": {"epochs": 1}}
    spec = _write(tmp_path / "tiny.yaml", {"seeds": [1, 2], "lists": ["O"], "arms": {
        "ref": smoke, "aam": {**smoke, "loss": {"head": "aam", "margin": 0.2, "scale": 30}}}})
    out = tmp_path / "sweep"
    real_train, calls = sweep_mod.train, []

    def interrupted(cfg):  # the third run is killed after its epoch was saved, before it finished
        calls.append(cfg.train.name)
        result = real_train(cfg)
        if len(calls) == 3:
            (sweep_mod.run_path(cfg) / "summary.json").unlink()
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(sweep_mod, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep_mod.run_sweep(spec, out, progress=False, n_boot=50)
    runs = out / "train_1P" / "DNNS"
    stamps = {p.parent.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/models/best_opt_eval.pt")}
    assert sorted(stamps) == ["aam-seed1", "ref-seed1", "ref-seed2"]  # seed-major: both arms of seed 1 first

    # what is finished can be summarised meanwhile; the rest is named
    with pytest.warns(UserWarning, match="2 run.s. not finished yet.*ref-seed2, aam-seed2"):
        partial = sweep_mod.summarise(sweep_mod.load_sweep(spec, out), n_boot=50)
    assert list(partial["summary"]["n_seeds"]) == [1, 1] and partial["paired"]["n_pairs"].tolist() == [1]
    partial_json = json.loads((out / "summary.json").read_text(), parse_constant=pytest.fail)  # strict: null, no NaN
    assert partial_json["unfinished"] == ["ref-seed2", "aam-seed2"]
    assert partial_json["summary"][0]["eer_ci_low"] is None  # one seed: no interval

    calls.clear()
    tables = sweep_mod.run_sweep(spec, out, progress=False, n_boot=50)
    assert calls == ["ref-seed2", "aam-seed2"]  # only the interrupted run (resumed) and the missing one
    assert json.loads((runs / "ref-seed2" / "summary.json").read_text())["epochs"] == 1
    for name, stamp in stamps.items():  # finished and resumed runs keep their weights
        assert (runs / name / "models" / "best_opt_eval.pt").stat().st_mtime_ns == stamp

    summary = pd.read_csv(out / "summary.csv")
    rows = list(summary[["arm", "list", "n_seeds"]].itertuples(index=False, name=None))
    assert rows == [("ref", "O", 2), ("aam", "O", 2)]
    for arm in ("ref", "aam"):
        row = summary[summary["arm"] == arm].iloc[0]
        eers = tables["runs"].query("arm == @arm")["eer"]
        assert (row["eer_mean"], row["eer_ci_low"], row["eer_ci_high"]) == pytest.approx(t_interval(eers))
    paired = pd.read_csv(out / "paired.csv")
    assert list(paired["arm"]) == ["aam"] and paired["n_pairs"].iloc[0] == 2
    runs_table = pd.read_csv(out / "runs.csv")
    assert (runs_table["eer_boot_low"] <= runs_table["eer"] + 1e-9).all()
    assert (runs_table["eer_spk_low"] <= runs_table["eer_spk_high"]).all()  # the evaluation wrote the names files
    assert (out / "det_O.png").is_file() and json.loads((out / "summary.json").read_text())["baseline"] == "ref"
    assert runs_table["list_sha1"].nunique() == 1 and len(runs_table["list_sha1"].iloc[0]) == 40
    training = pd.read_csv(out / "training.csv")
    assert list(zip(training["arm"], training["seed"])) == [("ref", 1), ("ref", 2), ("aam", 1), ("aam", 2)]
    assert (training["epochs"] == 1).all() and (training["best_epoch"] == 1).all()

    # the file's seeds, or fewer, run again: the tables still cover every seed finished in the folder
    calls.clear()
    again = sweep_mod.run_sweep(spec, out, progress=False, n_boot=50, seeds=[2])
    assert calls == [] and again["summary"]["n_seeds"].tolist() == [2, 2]
    assert json.loads((out / "summary.json").read_text())["seeds"] == [1, 2]

    # a run scored on another version of the list is never summarised beside the others
    metrics_file = runs / "aam-seed1" / "eval" / "best_opt_eval" / "metrics.json"
    good = metrics_file.read_text()
    meta = json.loads(good)
    meta["metrics"][0]["list_sha1"] = "0" * 40
    metrics_file.write_text(json.dumps(meta))
    with pytest.raises(WorkbookError, match="aam-seed1 scored another version of list O than ref-seed1.*--seeds 1 2"):
        sweep_mod.summarise(sweep_mod.load_sweep(spec, out), n_boot=50)
    metrics_file.write_text(good)

    # another choice of model reuses the training and puts its tables beside the others; with one
    # epoch, the last epoch's model holds the best model's weights
    calls.clear()
    last = sweep_mod.run_sweep(spec, out, progress=False, n_boot=50, pick="last")
    assert calls == [] and (out / "last" / "summary.csv").is_file() and (out / "last" / "det_O.png").is_file()
    assert last["runs"]["eer"].to_numpy() == pytest.approx(tables["runs"]["eer"].to_numpy(), abs=1e-9)
    assert sorted(p.parent.name[:5] for p in runs.glob("*/eval/TA_1_*/metrics.json")) == ["TA_1_"] * 4
    assert pd.read_csv(out / "summary.csv").equals(summary)  # the best models' tables are untouched

    # the notebook over the same code: every run is reused, the tables and the DET figure come back
    executed = json.loads(run_notebook("sweep", sweep=str(spec), out_dir=str(out), n_boot=50).read_text())
    text = json.dumps([c.get("outputs", []) for c in executed["cells"]])
    assert "reuse   aam-seed2" in text and "eer_ci_low" in text and "image/png" in text

    # the analysis notebook opens the sweep folder: every run's scores, labelled by arm and seed
    assert list(score_sources(out)) == ["ref-seed1: O", "ref-seed2: O", "aam-seed1: O", "aam-seed2: O"]
    assert all(p.parent.name.startswith("TA_1_") for p in score_sources(out / "last").values())
    both = score_sources(f"{out},{out / 'last'}", lists="O")  # two results of one sweep: named apart
    assert list(both)[::4] == ["sweep/ref-seed1: O", "sweep/last/ref-seed1: O"] and len(set(both.values())) == 8
    with pytest.raises(MissingPathError, match="no score files of lists E in"):
        score_sources(out, lists=["E"])
    (out / "runs.csv").rename(out / "runs.csv.x")
    with pytest.raises(MissingPathError, match=r"sweep holds no tables of the runs' best models; open .*sweep/last"):
        score_sources(out)
    (out / "runs.csv.x").rename(out / "runs.csv")
    with pytest.raises(SystemExit):
        sweep_mod.main([str(spec), "--out", str(out), "--checkpoint", "last"])
    assert "--checkpoint is now --pick (--pick last)" in capsys.readouterr().err
    figures = tmp_path / "figures"
    run_notebook("analysis", sources=str(out), trial_lists=["O"], out_dir=str(figures), n_worst=2)
    assert (figures / "det.png").is_file() and len(list(figures.glob("hist_*-seed*_O.png"))) == 4
    assert len(list(figures.glob("val_eer_*-seed*.png"))) == 4
