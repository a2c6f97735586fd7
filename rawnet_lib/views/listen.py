"""Audio players that still play in a saved notebook, opened without a kernel.

Widgets need their kernel, and JupyterLab sanitises the HTML of a notebook it does not trust
(every notebook executed elsewhere, e.g. by papermill): it keeps the `src` of `<audio>` but
drops the one of `<source>`, which is where IPython.display.Audio puts its data. So the players
here are `<audio controls src="data:audio/wav;base64,...">` elements in plain HTML tables,
each holding a short clip: mono PCM16 at the file's own rate, about 43 kB of notebook per second
of 16 kHz audio. A file plays at the rate it holds: the evaluation's files are at the model's
rate (`model.sample_rate`), which need not be 16 kHz.
"""
from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import HTML

from rawnet_lib.dataset.audio import SAMPLE_RATE, probe, read_audio, wav_bytes
from rawnet_lib.dataset.trials import resolve

__all__ = ["CLIP_SECONDS", "read_clip", "audio_element", "trials_table", "utterances_table", "samples_table"]

CLIP_SECONDS = 3.0  # enough to hear a voice; 10 trials x 2 sides of it add about 2.6 MB to the notebook
_STYLE = "border-collapse: collapse; text-align: left"


def read_clip(path: str | Path, seconds: float | None = None) -> tuple[np.ndarray, int]:
    """The first `seconds` (None: all) of a wav file and its sample rate, whatever rate it holds;
    any other problem (unreadable, stereo) is an AudioError naming the file and the fix."""
    rate = probe(path).sample_rate or SAMPLE_RATE  # 0: no header, which read_audio reports
    frames = -1 if seconds is None else round(seconds * rate)
    return read_audio(path, frames=frames, sample_rate=rate), rate


def audio_element(path: str | Path, seconds: float = CLIP_SECONDS) -> str:
    """An `<audio controls>` element holding the first `seconds` of a wav file, at its own rate."""
    return _player(*read_clip(path, seconds))


def _player(wave: np.ndarray, sample_rate: int) -> str:
    data = base64.b64encode(wav_bytes(np.clip(wave, -1.0, 1.0), sample_rate)).decode("ascii")
    return f'<audio controls preload="none" src="data:audio/wav;base64,{data}"></audio>'


def _table(header: Sequence[str], rows: list[list[str]], caption: str) -> HTML:
    """An HTML table of already escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return HTML(f'<table style="{_STYLE}"><caption>{html.escape(caption)}</caption>'
                f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _file_cell(name: str, path: Path, seconds: float) -> str:
    return f"<code>{html.escape(name)}</code><br>{audio_element(path, seconds)}"


def trials_table(trials: pd.DataFrame, roots: Sequence[str | Path], per_kind: int = 5,
                 seconds: float = CLIP_SECONDS) -> HTML:
    """Trials (e.g. from worst_trials, worst first) as a static table with both sides playable:
    the first `per_kind` of each kind, each side cut to its first `seconds`; the caption says how
    many were left out (the notebook's table above lists them all)."""
    given = len(trials)
    if "kind" in trials:
        trials = trials.groupby("kind", sort=False).head(per_kind)
    else:
        trials = trials.head(per_kind)
    folders = [Path(r) for r in roots]
    rows = []
    for _, row in trials.iterrows():
        same = "same speaker" if int(row["label"]) == 1 else "different speakers"
        rows.append([html.escape(str(row.get("kind", "")).replace("_", " ")), f"{float(row['score']):.4f}", same,
                     *(_file_cell(row[side], resolve(row[side], folders), seconds) for side in ("enroll", "test"))])
    shown = f"{len(rows)} trials"
    if given > len(rows):
        shown = f"{len(rows)} of {given} trials (the first {per_kind}{' of each kind' if 'kind' in trials else ''})"
    caption = f"{shown}, first {seconds:g} s of each file (plays without a kernel)"
    return _table(["kind", "score", "label", "enroll", "test"], rows, caption)


def utterances_table(paths: Sequence[str | Path], root: str | Path, seconds: float = CLIP_SECONDS) -> HTML:
    """Utterance files as a static table of players (names relative to root), each cut to its
    first `seconds`, with its length."""
    rows = [[_file_cell(str(Path(p).relative_to(root)), Path(p), seconds), f"{probe(p).seconds:.2f} s"]
            for p in paths]
    return _table(["utterance", "length"], rows, f"{len(rows)} utterances, first {seconds:g} s of each")


def samples_table(named: dict[str, tuple[str | Path, np.ndarray]], sample_rate: int = SAMPLE_RATE,
                  caption: str = "") -> HTML:
    """Waveforms already in memory (e.g. what a model hears of a user's file), one row each:
    name, source and a player of the whole waveform."""
    rows = [[html.escape(name), f"<code>{html.escape(str(source))}</code>", _player(wave, sample_rate)]
            for name, (source, wave) in named.items()]
    return _table(["input", "file", "audio"], rows, caption)
