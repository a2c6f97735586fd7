"""Looking at evaluation results: score files, validation EER per epoch, the worst trials, and
players to listen to them.

Score files are those `rawnet_lib.evaluate` writes (`score target`, or `score target enroll test`
for the `_names.txt` variant). The widgets need a Jupyter front end and a kernel to play audio;
without one (papermill, tests, a saved notebook opened later) they show their text form, which
points to the static players of `rawnet_lib.views.listen` shown above them.
"""
from __future__ import annotations

import hashlib
import html
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from rawnet_lib.config import DataConfig, input_path, repo_path
from rawnet_lib.dataset.trials import list_tag, resolve, speaker_of
from rawnet_lib.errors import MissingPathError, WorkbookError
from rawnet_lib.eval.metrics import eer_threshold
from rawnet_lib.eval.scoring import ScoreFileError, load_scores
from rawnet_lib.views.listen import read_clip
from rawnet_lib.views.plots import det_plot, history_plot, save_figure, score_histogram, waveform_spectrogram

__all__ = ["score_sources", "Results", "open_results", "det_figure", "validation_figures", "histogram_figures",
           "run_folder", "eval_info", "audio_roots", "figures_folder", "comparison_folder", "eer_history",
           "worst_trials", "trial_player", "misverified_browser", "file_stem"]


_KINDS = ("false_reject", "false_accept")
_EERS_LINE = re.compile(r"epoch:\s*(\d+),\s*TA_eval_eer:\s*([-+0-9.eE]+|nan)")


@dataclass(frozen=True)
class _Entry:
    """A score file found in the sources: the trial list it scored, its name in its evaluation
    (`O`, `O asnorm`), and whose it is (`<run>/<checkpoint>`, or `<arm>-seed<seed>` in a sweep)."""
    path: Path
    list: str
    name: str
    owner: str


def _file_entry(path: Path) -> _Entry:
    """A score file without a metrics table, named from its file name (`scores_O_asnorm_names.txt`)."""
    stem = re.sub(r"_names$", "", path.stem).removeprefix("scores_")
    tag = stem.removesuffix("_asnorm")
    run = run_folder(path)
    return _Entry(path, tag, tag + (" asnorm" if tag != stem else ""),
                  f"{run.name + '/' if run else ''}{path.parent.name}")


def _eval_dir_entries(folder: Path) -> list[_Entry]:
    """The names variants of an evaluation folder, in and named by its metrics table when it has one."""
    info = folder / "metrics.json"
    if not info.is_file():
        return [_file_entry(f) for f in sorted(folder.glob("scores_*_names.txt"))]
    rows = json.loads(info.read_text())["metrics"]
    return [replace(_file_entry(folder / r["scores_file"]), list=r["list"], name=_name(r["list"], r["scoring"]))
            for r in rows]


def _name(tag: str, scoring: str) -> str:
    """A result's name in its evaluation: the list, and the scoring unless cosine (`O`, `O asnorm`)."""
    return tag if scoring == "cosine" else f"{tag} {scoring}"


def _sweep_entries(folder: Path, prefix: str) -> list[_Entry]:
    """Every run and list of a sweep's runs.csv, owned by `<prefix><arm>-seed<seed>` and named by
    list and scoring as in an evaluation (an arm with AS-norm is summarised on its AS-norm scores;
    a runs.csv without the column is older, from when every arm's were cosine)."""
    runs = pd.read_csv(folder / "runs.csv", dtype={"list": str})
    if "scores" not in runs:
        raise ScoreFileError(f"{folder / 'runs.csv'} names no score files (an older version wrote it); run the "
                             "sweep's command again (python -m rawnet_lib.sweep SWEEP.yaml ...): it reuses every "
                             "finished run and evaluation and rewrites its tables")
    scoring = runs["scoring"] if "scoring" in runs else ["cosine"] * len(runs)
    return [_Entry((folder / r.scores).resolve(), r.list, _name(r.list, how), f"{prefix}{r.arm}-seed{r.seed}")
            for r, how in zip(runs.itertuples(), scoring)]


def _sweep_name(folder: Path) -> str:
    """A sweep results folder's name: `<sweep>`, or `<sweep>/<pick>` for another model choice."""
    summary = json.loads((folder / "summary.json").read_text())
    pick = summary.get("pick", summary.get("checkpoint", "best"))  # `checkpoint` before it was named pick
    return folder.name if pick == "best" else f"{folder.parent.name}/{pick}"


def _is_sweep(folder: Path) -> bool:
    """A sweep's results folder: DIR, or DIR/<pick>/ for another model choice (rawnet_lib.sweep)."""
    return (folder / "runs.csv").is_file() and (folder / "summary.json").is_file()


def _source_paths(sources: str | Path | Sequence[str | Path]) -> list[Path]:
    """The sources as paths: comma-separated in a string, "" the newest run, relative ones found
    from the working folder first, then the repository's (`input_path`)."""
    if isinstance(sources, str):
        sources = sources.split(",")
    elif isinstance(sources, Path):
        sources = [sources]
    sources = [s for s in (str(s).strip() for s in sources) if s]
    if not sources:
        from rawnet_lib.training.run import newest_run
        sources = [newest_run()]
    return [input_path(s) for s in sources]


def _entries(paths: list[Path]) -> list[_Entry]:
    found: list[_Entry] = []
    for source in paths:
        if source.is_file():
            found.append(_file_entry(source))
        elif _is_sweep(source):  # the sweep's name only where more than one thing is open
            found += _sweep_entries(source, f"{_sweep_name(source)}/" if len(paths) > 1 else "")
        elif (source / "models").is_dir():
            found += [e for d in sorted((source / "eval").glob("*/")) for e in _eval_dir_entries(d)]
        elif (source / "sweep.yaml").is_file():  # a sweep folder whose best models have no tables (yet)
            picks = sorted(p.name for p in source.iterdir() if _is_sweep(p))
            raise MissingPathError(f"{source} holds no tables of the runs' best models; "
                                   + (f"open {', '.join(str(source / p) for p in picks)}, the tables of " if picks
                                      else "") + "the sweep's other choices, or run the sweep (python -m "
                                   "rawnet_lib.sweep ...) to write them")
        elif source.is_dir():
            found += _eval_dir_entries(source)
        else:
            raise MissingPathError(f"{source} is neither a score file nor a folder; give score files, evaluation "
                                   "folders (<run>/eval/<checkpoint>), run folders or sweep folders")
    return found


def score_sources(sources: str | Path | Sequence[str | Path] = "", lists: str | Sequence[str] = ()
                  ) -> dict[str, Path]:
    """{label: score file} from score files, evaluation folders, run folders and sweep folders.

    A string may hold several comma-separated entries; "" means the newest run. A run folder
    stands for every evaluation under its eval/, a sweep folder (DIR, or DIR/<pick>) for the runs
    its runs.csv lists. Labels are `<list>[ asnorm]`, prefixed with whose results they are when
    there are several (`<run>/<checkpoint>: O`, `<arm>-seed<seed>: O`, the sweep's name before the
    arm when more than one source is open); labels still alike get the score file's path. `lists`
    keeps the score files of those trial lists only (O, E, H, or a .txt list's stem; a string
    may hold several, comma-separated).
    """
    return _score_files(_source_paths(sources), lists)


def _score_files(paths: list[Path], lists: str | Sequence[str]) -> dict[str, Path]:
    """score_sources of sources already found (`_source_paths`)."""
    if isinstance(lists, str):
        lists = [x.strip() for x in lists.split(",") if x.strip()]
    paths = list(dict.fromkeys(paths))  # a source given twice counts once
    unique: dict[Path, _Entry] = {}
    for entry in _entries(paths):  # so does a score file two sources hold (a run and its sweep)
        unique.setdefault(entry.path.resolve(), entry)
    entries = list(unique.values())
    if lists:
        wanted = {list_tag(str(x)) for x in lists}
        entries = [e for e in entries if e.list in wanted]
    if not entries:
        raise MissingPathError(f"no score files{' of lists ' + ', '.join(map(str, lists)) if lists else ''} in "
                               f"{', '.join(map(str, paths))}; evaluate the run first (notebooks/evaluate.ipynb)")
    several = len({e.owner for e in entries}) > 1
    labels = [f"{e.owner}: {e.name}" if several else e.name for e in entries]
    return {(label if labels.count(label) == 1 else f"{e.path}"): e.path for label, e in zip(labels, entries)}


@dataclass
class Results:
    """What the analysis notebook looks at: score files by label, their scores, the folder its
    figures go to, and `data_path` (see audio_roots) for listening to the first file's trials."""
    files: dict[str, Path]
    scores: dict[str, pd.DataFrame]
    figures: Path
    data_path: str | Path = ""

    @cached_property
    def roots(self) -> list[Path]:
        """Where the first score file's audio is; asked only to listen, so the figures of a score
        file that says nothing of its audio need none."""
        return audio_roots(next(iter(self.files.values())), self.data_path)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"score file": {label: str(path) for label, path in self.files.items()}})

    def worst_trials(self, n: int = 10, speaker: str | None = None) -> tuple[str, pd.DataFrame]:
        """The first score file's label and its n worst false rejects, then its n worst false accepts."""
        label, scores = next(iter(self.scores.items()))
        return label, worst_trials(scores, _KINDS, n=n, speaker=speaker or None)


def open_results(sources: str | Path | Sequence[str | Path] = "", lists: str | Sequence[str] = (),
                 data_path: str | Path = "", out_dir: str | Path = "") -> Results:
    """Load the score files of `sources` (see score_sources). Figures go to `out_dir` (relative: the
    repository's), else to the sweep's `figures/` when the first source is a sweep folder, else
    to the `figures/` of the first score file's run (or beside it, outside a run), in a `vs_<other
    runs>/` folder there when the files come from several runs (see comparison_folder). The audio is
    under `data_path`, else where the first evaluation found it."""
    paths = _source_paths(sources)  # once: "" is the newest run, which a run starting meanwhile would change
    files = _score_files(paths, lists)
    if out_dir:
        figures = repo_path(out_dir)
    else:
        figures = paths[0] / "figures" if _is_sweep(paths[0]) else comparison_folder(list(files.values()))
    return Results(files, {label: load_scores(path) for label, path in files.items()}, figures, data_path)


def det_figure(results: Results) -> Figure:
    """Every score file's DET curve on one figure, saved as `det` (.png, .svg, and .npz of the
    scores and labels it was drawn from)."""
    fig = det_plot({label: (s["score"], s["label"]) for label, s in results.scores.items()})
    arrays = {"names": np.array(list(results.scores))}  # curve i is names[i]'s score_i and label_i
    for i, s in enumerate(results.scores.values()):
        arrays |= {f"score_{i}": s["score"].to_numpy(), f"label_{i}": s["label"].to_numpy()}
    save_figure(fig, results.figures, "det", arrays)
    return fig


def validation_figures(results: Results) -> list[Figure]:
    """Validation EER per epoch (from eers.txt) of each run the score files come from, saved as
    `val_eer_<run>`."""
    runs = sorted({run for run in map(run_folder, results.files.values()) if run and (run / "eers.txt").is_file()})
    names = [run.name for run in runs]
    figures = []
    for run in runs:
        name = run.name if names.count(run.name) == 1 else str(run)  # same-named runs of two sweeps
        history = eer_history(run)
        fig = history_plot(history)
        fig.suptitle(name)
        save_figure(fig, results.figures, f"val_eer_{file_stem(name)}", {c: history[c].to_numpy() for c in history})
        figures.append(fig)
    return figures


def histogram_figures(results: Results) -> list[Figure]:
    """Target and non-target score densities of each score file, saved as `hist_<label>`."""
    figures = []
    for label, s in results.scores.items():
        fig = score_histogram(s["score"], s["label"])
        fig.suptitle(label)
        save_figure(fig, results.figures, f"hist_{file_stem(label)}",
                    {"score": s["score"].to_numpy(), "label": s["label"].to_numpy()})
        figures.append(fig)
    return figures


def run_folder(score_file: str | Path) -> Path | None:
    """The training run a score file `<run>/eval/<checkpoint>/scores_*.txt` belongs to, or None."""
    folder = Path(score_file).parent
    run = folder.parent.parent
    return run if folder.parent.name == "eval" and (run / "models").is_dir() else None


def eval_info(score_file: str | Path) -> dict:
    """The metrics.json beside a score file (checkpoint, data_path, roots, metrics), {} when absent."""
    path = Path(score_file).parent / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def audio_roots(score_file: str | Path, data_path: str | Path = "") -> list[Path]:
    """Folders the trial files resolve against: the evaluation's folders (its config's eval_dirs,
    else the defaults) under data_path when given, else those the evaluation itself used (from its
    metrics.json), which must still exist."""
    info = eval_info(score_file)
    if data_path:
        dirs = info.get("config", {}).get("data", {}).get("eval_dirs") or DataConfig().eval_dirs
        return [input_path(data_path) / d for d in dirs]
    roots = [Path(r) for r in info.get("roots", [])]
    if not roots:
        raise ScoreFileError(f"no metrics.json beside {score_file} says where its audio is; give data_path, "
                             "the folder holding VoxCeleb1/")
    if not any(r.is_dir() for r in roots):
        raise MissingPathError(f"the audio of {score_file} was in {', '.join(map(str, roots))}, which no longer "
                               "exist (the corpus moved?); give data_path, the folder now holding VoxCeleb1/")
    return roots


def figures_folder(score_file: str | Path) -> Path:
    """Where the figures of a score file go: `<run>/figures/`, or `figures/` beside it outside a run."""
    return (run_folder(score_file) or Path(score_file).parent) / "figures"


def comparison_folder(score_files: Sequence[str | Path]) -> Path:
    """Where the figures of these score files go: the first one's figures folder when they all come
    from its run (or folder), else its `vs_<the other runs>/` there, so that comparing run A with B
    neither replaces A's own figures nor leaves A's histograms beside the pair's."""
    homes = list(dict.fromkeys(run_folder(f) or Path(f).parent for f in score_files))
    folder = figures_folder(score_files[0])
    if len(homes) == 1:
        return folder
    others = "_".join(file_stem(home.name) for home in homes[1:])
    if len(others) > 80:  # many runs: a name of fixed length that still differs per set
        others = f"{len(homes) - 1}_runs_" + hashlib.sha1("\n".join(map(str, homes)).encode()).hexdigest()[:10]
    return folder / f"vs_{others}"


def file_stem(label: str) -> str:
    """A figure label as a safe file stem (`demo/best_opt_eval: O asnorm` -> `demo_best_opt_eval_O_asnorm`)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "figure"


def eer_history(run: str | Path) -> pd.DataFrame:
    """Validation EER (fraction) per epoch from a run's eers.txt: columns epoch, val_eer."""
    path = Path(run) / "eers.txt"
    if not path.is_file():
        raise MissingPathError(f"{path} does not exist; give a run folder that finished at least one epoch")
    rows = [(int(m[1]), float(m[2])) for m in map(_EERS_LINE.match, path.read_text().splitlines()) if m]
    return pd.DataFrame(rows, columns=["epoch", "val_eer"])


def worst_trials(scores: pd.DataFrame, kind: str | Sequence[str] = "false_reject", n: int = 10,
                 threshold: float | None = None, speaker: str | None = None, min_score: float | None = None,
                 max_score: float | None = None) -> pd.DataFrame:
    """The n most confidently wrong trials at `threshold` (default: the EER threshold), worst first.

    false_reject: same-speaker trials scored below the threshold, lowest first; false_accept:
    different-speaker trials at or above it, highest first; several kinds: n of each, one after
    the other. `speaker` keeps trials with that speaker on either side; min_score / max_score
    bound the scores. Needs a `_names` score file.
    """
    if not isinstance(kind, str):
        return pd.concat([worst_trials(scores, k, n, threshold, speaker, min_score, max_score) for k in kind],
                         ignore_index=True)
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {', '.join(_KINDS)}")
    if not {"enroll", "test"} <= set(scores.columns):
        raise ValueError("the scores have no file names; load the `_names.txt` score file "
                         "(score target enroll test) that rawnet_lib.evaluate writes")
    if threshold is None:
        _, threshold = eer_threshold(scores["score"], scores["label"])
    frame = scores.rename_axis("trial").reset_index()
    frame["enroll_speaker"] = frame["enroll"].map(speaker_of)
    frame["test_speaker"] = frame["test"].map(speaker_of)
    if kind == "false_reject":
        keep = (frame["label"] == 1) & (frame["score"] < threshold)
    else:
        keep = (frame["label"] == 0) & (frame["score"] >= threshold)
    if speaker:
        keep &= (frame["enroll_speaker"] == speaker) | (frame["test_speaker"] == speaker)
    if min_score is not None:
        keep &= frame["score"] >= min_score
    if max_score is not None:
        keep &= frame["score"] <= max_score
    frame = frame[keep].sort_values("score", ascending=kind == "false_reject", kind="stable")
    return frame.head(n).assign(kind=kind).reset_index(drop=True)


def _picture(wave: np.ndarray, sample_rate: int, title: str) -> bytes:
    """A small waveform/spectrogram PNG for one side of a trial."""
    fig = waveform_spectrogram(wave, sample_rate, title=title)
    fig.set_size_inches(3.2, 2.4)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    return buffer.getvalue()


def trial_player(row: pd.Series | dict, roots: Sequence[str | Path]) -> widgets.VBox:
    """Both sides of one trial: a header with score and label, an audio player and a
    waveform/spectrogram picture each for enroll and test, at each file's own rate."""
    sides = []
    for side in ("enroll", "test"):
        path = resolve(row[side], [Path(r) for r in roots])
        wave, rate = read_clip(path)
        sides.append(widgets.VBox([
            widgets.Label(f"{side}: {row[side]}"),
            widgets.Audio(value=path.read_bytes(), format="wav", autoplay=False, loop=False),
            widgets.Image(value=_picture(wave, rate, row[side]), format="png"),
        ]))
    same = "same speaker" if int(row["label"]) == 1 else "different speakers"
    header = widgets.HTML(f"<b>score {float(row['score']):.4f}</b> ({same})")
    return widgets.VBox([header, widgets.HBox(sides)])


def _player_or_error(row: pd.Series, roots: Sequence[str | Path]) -> widgets.Widget:
    """The trial's player, or why it cannot play (a missing or unusable file, named with the fix):
    an error raised in a widget's callback goes to the front end's log, where nobody sees it."""
    try:
        return trial_player(row, roots)
    except (FileNotFoundError, WorkbookError) as err:
        return widgets.HTML(f"<pre>{html.escape(str(err))}</pre>")


class _Browser(widgets.VBox):
    """The browser's box; its text form (what a saved notebook shows without a kernel) says so
    instead of listing its children."""

    def __repr__(self) -> str:
        return "[trial browser: needs a running kernel; the table above plays without one]"


def misverified_browser(trials: pd.DataFrame, roots: Sequence[str | Path]) -> widgets.VBox:
    """A table of trials (e.g. from worst_trials) with a speaker filter, a score range slider and
    a trial chooser that shows the chosen trial's players."""
    if trials.empty:
        return _Browser([widgets.HTML("no trials to show")])
    trials = trials.reset_index(drop=True)  # row labels pick the trial
    speakers = sorted(set(trials["enroll"].map(speaker_of)) | set(trials["test"].map(speaker_of)))
    speaker = widgets.Dropdown(options=["(all)", *speakers], description="speaker")
    low, high = float(trials["score"].min()), float(trials["score"].max())
    score = widgets.FloatRangeSlider(value=(low, high), min=low, max=high, step=max((high - low) / 100, 1e-6),
                                     description="score", readout_format=".3f",
                                     style={"description_width": "initial"}, layout=widgets.Layout(width="460px"))
    chooser = widgets.Dropdown(description="trial", layout=widgets.Layout(width="720px"))
    table, player = widgets.HTML(), widgets.VBox()

    def selected() -> pd.DataFrame:
        keep = trials["score"].between(*score.value)
        if speaker.value != "(all)":
            keep &= ((trials["enroll"].map(speaker_of) == speaker.value)
                     | (trials["test"].map(speaker_of) == speaker.value))
        return trials[keep]

    shown: list = [object()]  # the trial on display; drawing a player reads audio, so only on change

    def show_trial(_=None) -> None:
        if chooser.value != shown[0]:
            shown[0] = chooser.value
            player.children = [] if chooser.value is None else [_player_or_error(trials.loc[chooser.value], roots)]

    def refresh(_=None) -> None:
        rows = selected()
        columns = [c for c in ("kind", "score", "label", "enroll", "test") if c in rows]
        table.value = rows[columns].to_html(float_format="%.4f")
        chooser.options = [(f"{r.score:.4f}  {r.enroll} vs {r.test}", i) for i, r in rows.iterrows()]
        chooser.value = chooser.options[0][1] if chooser.options else None
        show_trial()

    speaker.observe(refresh, names="value")
    score.observe(refresh, names="value")
    chooser.observe(show_trial, names="value")
    refresh()
    return _Browser([widgets.HBox([speaker, score]), table, chooser, player])
