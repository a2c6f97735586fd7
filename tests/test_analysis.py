"""Score files, EER history, worst trials, the trial players and the analysis notebook."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from rawnet_lib.dataset.audio import probe, read_audio
from rawnet_lib.dataset.trials import TrialList, resolve
from rawnet_lib.eval.scoring import ScoreFileError, load_scores, write_scores
from rawnet_lib.evaluate import evaluate
from rawnet_lib.views import analysis as an
from rawnet_lib.views.listen import trials_table, utterances_table

_CLIP = re.compile(r'<audio controls[^>]* src="data:audio/wav;base64,([A-Za-z0-9+/=]+)"')

# A hand-made list: speaker a/b/c, label 1 = same speaker.
HAND = pd.DataFrame({
    "score": [0.9, 0.2, 0.5, 0.1, 0.8, 0.6, 0.3, 0.7],
    "label": [1, 1, 1, 1, 0, 0, 0, 0],
    "enroll": ["a/v/1.wav", "a/v/2.wav", "b/v/1.wav", "c/v/1.wav", "a/v/1.wav", "b/v/1.wav", "c/v/1.wav", "c/v/2.wav"],
    "test": ["a/w/1.wav", "a/w/2.wav", "b/w/1.wav", "c/w/1.wav", "b/v/2.wav", "c/v/3.wav", "a/v/3.wav", "b/w/3.wav"],
})


@pytest.fixture(scope="module")
def eval_dir(smoke_run: Path) -> Path:
    """The smoke run evaluated on O and O2 into its own eval/ folder, as the evaluate notebook does."""
    evaluate(smoke_run / "models" / "best_opt_eval.pt", lists=["O", "O2"], progress=False)
    return smoke_run / "eval" / "best_opt_eval"


def test_load_scores_reads_both_variants(tmp_path: Path) -> None:
    trials = TrialList(HAND["label"].to_numpy(np.int8), list(HAND["enroll"]), list(HAND["test"]))
    write_scores(tmp_path / "plain.txt", HAND["score"].to_numpy(), trials)
    write_scores(tmp_path / "names.txt", HAND["score"].to_numpy(), trials, with_names=True)
    plain, named = load_scores(tmp_path / "plain.txt"), load_scores(tmp_path / "names.txt")
    assert list(plain.columns) == ["score", "label"]
    pd.testing.assert_frame_equal(named, HAND, check_dtype=False)
    pd.testing.assert_frame_equal(plain, HAND[["score", "label"]], check_dtype=False)
    (tmp_path / "tabs.txt").write_text("0.5\t1  a b \n\n-0.25 0 c d\n")  # any whitespace, blank lines
    assert load_scores(tmp_path / "tabs.txt").to_dict("list") == {"score": [0.5, -0.25], "label": [1, 0],
                                                                 "enroll": ["a", "c"], "test": ["b", "d"]}
    for text, why in (("0.5 1 a\n", r":1: '0.5 1 a': has 2 or 4 fields, not 3"),
                      ("0.5 1 a b\n0.1 0\n", r":2: '0.1 0': has 2 fields where the first line has 4"),
                      ("0.5 1\n0.1 2\n", r":2: '0.1 2': label '2' is not 0 or 1"),
                      ("0.5 1\nnan 0\n", r":2: 'nan 0': score 'nan' is not a finite number"),
                      ("0.5 1\nx 0\n", r":2: 'x 0': score 'x' is not a finite number"),
                      ("\n", r": no scores")):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(ScoreFileError, match=r"bad\.txt" + why):
            load_scores(tmp_path / "bad.txt")


def test_eer_history_parses_eers_txt(tmp_path: Path) -> None:
    (tmp_path / "eers.txt").write_text("epoch:1, TA_eval_eer:0.5333\nepoch:2, TA_eval_eer:0.1250\n\n")
    history = an.eer_history(tmp_path)
    assert history.to_dict("list") == {"epoch": [1, 2], "val_eer": [0.5333, 0.125]}
    with pytest.raises(FileNotFoundError, match="eers.txt does not exist"):
        an.eer_history(tmp_path / "missing")


def test_worst_trials_finds_the_most_confident_errors() -> None:
    fr = an.worst_trials(HAND, "false_reject", threshold=0.55)
    assert list(fr["score"]) == [0.1, 0.2, 0.5] and list(fr["trial"]) == [3, 1, 2]
    fa = an.worst_trials(HAND, "false_accept", threshold=0.55)
    assert list(fa["score"]) == [0.8, 0.7, 0.6] and (fa["kind"] == "false_accept").all()
    assert list(an.worst_trials(HAND, "false_accept", n=1, threshold=0.55)["score"]) == [0.8]
    assert list(an.worst_trials(HAND, "false_reject", threshold=0.55, speaker="b")["trial"]) == [2]
    assert list(an.worst_trials(HAND, "false_accept", threshold=0.55, speaker="c")["score"]) == [0.7, 0.6]
    assert list(an.worst_trials(HAND, "false_accept", threshold=0.55, max_score=0.75)["score"]) == [0.7, 0.6]
    assert list(an.worst_trials(HAND, "false_reject", threshold=0.55, min_score=0.15)["score"]) == [0.2, 0.5]
    # Default threshold: the EER threshold, so both lists hold errors and nothing else.
    default = an.worst_trials(HAND, "false_reject")
    assert (default["label"] == 1).all() and 0 < len(default) < 4
    with pytest.raises(ValueError, match="kind='miss'"):
        an.worst_trials(HAND, "miss")
    with pytest.raises(ValueError, match="_names.txt"):
        an.worst_trials(HAND[["score", "label"]])


def test_score_sources_labels_and_figure_folders(eval_dir: Path, smoke_run: Path) -> None:
    files = an.score_sources(str(smoke_run))
    assert list(files) == ["O", "O2"] and files["O"] == eval_dir / "scores_O_names.txt"
    assert an.score_sources(f"{eval_dir / 'scores_O.txt'}") == {"O": eval_dir / "scores_O.txt"}
    assert an.figures_folder(files["O"]) == smoke_run / "figures"
    assert an.run_folder(files["O"]) == smoke_run
    with pytest.raises(FileNotFoundError, match="neither a score file nor a folder"):
        an.score_sources("/nonexistent/scores.txt")


def test_labels_say_whose_results_and_never_merge_two(tmp_path: Path) -> None:
    """Same-named runs in two folders keep one label each (their paths); the list a score file
    scored comes from its metrics table, so a list whose name ends in _asnorm is itself."""
    trials = TrialList(HAND["label"].to_numpy(np.int8), list(HAND["enroll"]), list(HAND["test"]))
    folders = []
    for where in ("a", "b"):
        run = tmp_path / where / "train_1P" / "DNNS" / "demo"
        (run / "models").mkdir(parents=True)
        folder = run / "eval" / "best_opt_eval"
        folder.mkdir(parents=True)
        for stem in ("scores_O_names", "scores_O_asnorm_names", "scores_x_asnorm_names"):
            write_scores(folder / f"{stem}.txt", HAND["score"].to_numpy(), trials, with_names=True)
        folders.append(folder)
    a, b = folders
    (b / "metrics.json").write_text(json.dumps({"metrics": [
        {"list": "O", "scoring": "cosine", "scores_file": "scores_O_names.txt"},
        {"list": "x_asnorm", "scoring": "cosine", "scores_file": "scores_x_asnorm_names.txt"}]}))
    assert an.score_sources(a.parents[1]) == {
        "O": a / "scores_O_names.txt", "O asnorm": a / "scores_O_asnorm_names.txt", "x asnorm": a / "scores_x_asnorm_names.txt"}
    both = an.score_sources([a.parents[1], b.parents[1]])
    assert list(both) == ["O asnorm", str(a / "scores_O_names.txt"), "x asnorm", str(b / "scores_O_names.txt"),
                          "x_asnorm"]
    assert list(an.score_sources(b, lists="x_asnorm")) == ["x_asnorm"]  # a string is a list name, not letters
    assert an.score_sources([a.parents[1], str(a.parents[1]), a]) == an.score_sources(a)  # each file once
    comma = tmp_path / "c,d"
    shutil.copytree(a, comma)
    assert list(an.score_sources(comma)) == ["O asnorm", "O", "x asnorm"]  # a Path is one source, commas and all
    assert list(an.score_sources(a, lists="O,x")) == ["O asnorm", "O", "x asnorm"]


def test_trial_player_and_browser(eval_dir: Path) -> None:
    scores = load_scores(eval_dir / "scores_O_names.txt")
    roots = an.audio_roots(eval_dir / "scores_O_names.txt")
    worst = pd.concat([an.worst_trials(scores, kind, n=2) for kind in ("false_reject", "false_accept")],
                      ignore_index=True)
    player = an.trial_player(worst.iloc[0], roots)
    audio = [w for side in player.children[1].children for w in side.children if isinstance(w, widgets.Audio)]
    images = [w for side in player.children[1].children for w in side.children if isinstance(w, widgets.Image)]
    assert len(audio) == 2 and all(a.value[:4] == b"RIFF" for a in audio)
    assert len(images) == 2 and all(i.value[:4] == b"\x89PNG" for i in images)

    browser = an.misverified_browser(worst, roots)
    (speaker, score), table, chooser, shown = browser.children[0].children, *browser.children[1:]
    assert len(chooser.options) == len(worst) and len(shown.children) == 1
    one = worst["enroll"].iloc[-1].split("/")[0]
    speaker.value = one
    rows = worst.loc[[index for _, index in chooser.options]]
    assert len(rows) >= 1 and one in table.value
    assert ((rows["enroll"].str.split("/").str[0] == one) | (rows["test"].str.split("/").str[0] == one)).all()
    speaker.value = "(all)"
    score.value = (score.max, score.max)
    assert [worst.loc[i, "score"] for _, i in chooser.options] == [worst["score"].max()]
    # what a saved notebook shows in place of the widget without a kernel
    assert "needs a running kernel" in browser._repr_mimebundle_()["text/plain"]
    assert score.style.description_width == "initial"


def _clips(html: str) -> list[tuple[np.ndarray, object]]:
    """The samples and format of every embedded <audio> clip, in order."""
    out = []
    for data in _CLIP.findall(html):
        raw = io.BytesIO(base64.b64decode(data, validate=True))
        info = sf.info(raw)
        raw.seek(0)
        out.append((sf.read(raw, dtype="float32")[0], info))
    return out


def test_static_tables_play_both_sides_without_a_kernel(eval_dir: Path) -> None:
    scores = load_scores(eval_dir / "scores_O_names.txt")
    roots = an.audio_roots(eval_dir / "scores_O_names.txt")
    worst = pd.concat([an.worst_trials(scores, kind, n=3) for kind in ("false_reject", "false_accept")],
                      ignore_index=True)
    html = trials_table(worst, roots, per_kind=2, seconds=0.5).data
    shown = worst.groupby("kind").head(2)
    files = [resolve(key, [Path(r) for r in roots]) for _, row in shown.iterrows() for key in (row.enroll, row.test)]
    clips = _clips(html)
    assert len(clips) == len(files) == 2 * len(shown)
    for (wave, info), path in zip(clips, files):
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert len(wave) == min(8000, probe(path).frames)
        # PCM16 rounds each sample to a step of 2^-15
        np.testing.assert_allclose(wave, np.clip(read_audio(path)[:len(wave)], -1, 1), rtol=0, atol=2.0 ** -15)
    assert all(f"{s:.4f}" in html for s in shown["score"]) and all(k in html for k in shown["enroll"])

    utts = utterances_table(files[:2], files[0].parents[2], seconds=0.25).data
    assert [len(w) for w, _ in _clips(utts)] == [min(4000, probe(p).frames) for p in files[:2]]
    assert str(files[0].relative_to(files[0].parents[2])) in utts


@pytest.mark.notebook
def test_analysis_notebook_saves_figures(eval_dir: Path, smoke_run: Path, run_notebook) -> None:
    out = run_notebook("analysis", sources=str(smoke_run), n_worst=2)
    html = [o["data"]["text/html"] for cell in json.loads(out.read_text())["cells"] for o in cell.get("outputs", [])
            if "text/html" in o.get("data", {})]
    assert any(_clips("".join(h)) for h in html)  # the worst trials play in the saved notebook
    figures = smoke_run / "figures"
    for name in ("det", "hist_O", "hist_O2", f"val_eer_{smoke_run.name}"):
        for ext in ("png", "svg"):
            assert (figures / f"{name}.{ext}").stat().st_size > 0
    with np.load(figures / "det.npz") as det, np.load(figures / "hist_O.npz") as hist:
        scores = load_scores(eval_dir / "scores_O_names.txt")
        assert list(det["names"]) == ["O", "O2"] and np.array_equal(det["score_0"], scores["score"])
        assert np.array_equal(hist["label"], scores["label"])
    with np.load(figures / f"val_eer_{smoke_run.name}.npz") as val:
        assert np.array_equal(val["epoch"], an.eer_history(smoke_run)["epoch"])


def _corpus(root: Path, rate: int) -> list[str]:
    """Four one-second noise wavs at `rate` under root (spk/video/utt.wav); returns their keys."""
    keys = ["a/v/1.wav", "a/w/1.wav", "b/v/1.wav", "b/w/1.wav"]
    rng = np.random.default_rng(0)
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / key, 0.1 * rng.standard_normal(rate), rate, subtype="PCM_16")
    return keys


def test_players_play_each_file_at_its_own_rate(tmp_path: Path) -> None:
    """An evaluation at model.sample_rate 8000 has 8 kHz files: the players play them at 8 kHz
    (they refused them, expecting 16 kHz, so such a run's worst trials could not be heard)."""
    a1, a2, b1, b2 = _corpus(tmp_path, 8000)
    trials = pd.DataFrame({"score": [0.1, 0.9], "label": [1, 0], "enroll": [a1, a2], "test": [a2, b1],
                           "kind": ["false_reject", "false_accept"]})
    clips = _clips(trials_table(trials, [tmp_path], seconds=0.5).data)
    assert [(len(wave), info.samplerate) for wave, info in clips] == [(4000, 8000)] * 4
    assert "<caption>2 trials, first 0.5 s" in trials_table(trials, [tmp_path], seconds=0.5).data
    cut = trials_table(pd.concat([trials] * 3, ignore_index=True), [tmp_path], per_kind=2, seconds=0.1).data
    assert "<caption>4 of 6 trials (the first 2 of each kind), first 0.1 s" in cut  # said so, not silently
    assert "1.00 s" in utterances_table([tmp_path / b2], tmp_path).data
    player = an.trial_player(trials.iloc[0], [tmp_path])
    images = [w for side in player.children[1].children for w in side.children if isinstance(w, widgets.Image)]
    assert len(images) == 2 and all(i.value[:4] == b"\x89PNG" for i in images)


def test_a_comparison_of_runs_keeps_its_figures_apart_from_each_run_s(tmp_path: Path) -> None:
    """Comparing run A with B writes into A's figures/vs_B/, so A's own figures stay as they were."""
    trials = TrialList(HAND["label"].to_numpy(np.int8), list(HAND["enroll"]), list(HAND["test"]))
    files = {}
    for name in ("a", "b"):
        folder = tmp_path / name / "eval" / "best_opt_eval"
        folder.mkdir(parents=True)
        (tmp_path / name / "models").mkdir()
        files[name] = folder / "scores_O_names.txt"
        write_scores(files[name], HAND["score"].to_numpy(), trials, with_names=True)
    alone = an.open_results(str(files["a"]))
    both = an.open_results([str(files["a"]), str(files["b"])])
    assert alone.figures == tmp_path / "a" / "figures" and both.figures == tmp_path / "a" / "figures" / "vs_b"
    an.det_figure(alone)
    before = (alone.figures / "det.png").read_bytes()
    an.det_figure(both)
    assert (alone.figures / "det.png").read_bytes() == before and (both.figures / "det.png").is_file()
    with np.load(both.figures / "det.npz") as arrays:  # what the figure was drawn from, to redraw it
        assert list(arrays["names"]) == list(both.scores)
        assert np.array_equal(arrays["score_1"], HAND["score"]) and np.array_equal(arrays["label_1"], HAND["label"])
    assert an.comparison_folder([files["a"], files["a"].with_name("scores_E_names.txt")]) == alone.figures
    many = [tmp_path / f"run_with_a_long_name_{i}" / "scores_O.txt" for i in range(9)]
    assert re.fullmatch(r"vs_8_runs_[0-9a-f]{10}", an.comparison_folder(many).name)


def test_a_bare_score_file_is_drawn_and_asks_for_audio_only_to_listen(tmp_path: Path) -> None:
    """A score file with no metrics.json beside it opens (open_results refused it before any figure,
    as it looked for the audio first); listening then asks for data_path."""
    trials = TrialList(HAND["label"].to_numpy(np.int8), list(HAND["enroll"]), list(HAND["test"]))
    write_scores(tmp_path / "scores_O_names.txt", HAND["score"].to_numpy(), trials, with_names=True)
    results = an.open_results(str(tmp_path / "scores_O_names.txt"))
    an.det_figure(results)
    assert (tmp_path / "figures" / "det.png").is_file()
    with pytest.raises(ScoreFileError, match="says where its audio is; give data_path"):
        results.roots
    assert an.open_results(str(tmp_path / "scores_O_names.txt"), data_path=tmp_path).roots == [
        tmp_path / "VoxCeleb1/eval_wav", tmp_path / "VoxCeleb1/dev_wav"]


def test_audio_roots_of_a_moved_corpus(tmp_path: Path) -> None:
    """Roots the evaluation recorded that are gone are named with the fix (resolve blamed each
    file); data_path takes the evaluation's own eval_dirs, not the defaults."""
    scores = tmp_path / "eval" / "scores_O_names.txt"
    scores.parent.mkdir()
    scores.write_text("0.5 1 a/v/1.wav a/w/1.wav\n0.1 0 a/v/1.wav b/v/1.wav\n")
    (scores.parent / "metrics.json").write_text(json.dumps({
        "roots": [str(tmp_path / "old" / "mine")], "config": {"data": {"eval_dirs": ["mine"]}}}))
    with pytest.raises(FileNotFoundError, match=r"old/mine, which no longer exist .*give data_path"):
        an.audio_roots(scores)
    _corpus(tmp_path / "new" / "mine", 16000)
    roots = an.audio_roots(scores, tmp_path / "new")
    assert roots == [tmp_path / "new" / "mine"]
    assert resolve("b/v/1.wav", roots) == tmp_path / "new" / "mine" / "b/v/1.wav"


def test_a_sweep_arm_scored_with_asnorm_says_so(tmp_path: Path) -> None:
    """runs.csv's scoring names each run's scores as an evaluation's do (`O asnorm`); it was left out,
    so an AS-norm arm's scores were labelled as if cosine. An older runs.csv has cosine scores."""
    trials = TrialList(HAND["label"].to_numpy(np.int8), list(HAND["enroll"]), list(HAND["test"]))
    for stem in ("ref", "asn"):
        write_scores(tmp_path / f"{stem}.txt", HAND["score"].to_numpy(), trials, with_names=True)
    (tmp_path / "summary.json").write_text(json.dumps({"pick": "best"}))
    runs = pd.DataFrame({"arm": ["ref", "asn"], "seed": [1, 1], "list": ["O", "O"], "scores": ["ref.txt", "asn.txt"],
                         "scoring": ["cosine", "asnorm"]})
    runs.to_csv(tmp_path / "runs.csv", index=False)
    assert list(an.score_sources(tmp_path)) == ["ref-seed1: O", "asn-seed1: O asnorm"]
    runs.drop(columns="scoring").to_csv(tmp_path / "runs.csv", index=False)
    assert list(an.score_sources(tmp_path)) == ["ref-seed1: O", "asn-seed1: O"]


def test_the_browser_says_why_a_trial_cannot_play(tmp_path: Path) -> None:
    """A trial whose file is missing shows the error naming it in the browser (it was raised in the
    chooser's callback, which a front end only logs); the other trials still play."""
    a1, a2, b1, _ = _corpus(tmp_path, 16000)
    trials = pd.DataFrame({"score": [0.1, 0.9], "label": [1, 0], "enroll": [a1, "c/v/9.wav"], "test": [a2, b1]})
    browser = an.misverified_browser(trials, [tmp_path])
    chooser, player = browser.children[2:]
    assert isinstance(player.children[0], widgets.VBox)
    chooser.value = 1
    assert "trial file c/v/9.wav is in none of the roots" in player.children[0].value
