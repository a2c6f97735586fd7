"""What notebooks/verify.ipynb shows, so that its cells stay a call and a display each.

`verify_session(globals())` turns the notebook's parameters into a ready Verifier (calibrated
on the development list when the checkpoint has no calibration yet) and the files to compare
(by default two demo utterances of one speaker and one of another).
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from IPython.display import HTML
from matplotlib.figure import Figure

from rawnet_lib.config import BLOCK_NAMES, Config, declared_parameters, input_path, notebook_config
from rawnet_lib.dataset.anyaudio import find_audio
from rawnet_lib.dataset.utterances import resolve_data_path
from rawnet_lib.eval.calibrate import Calibration
from rawnet_lib.models.checkpoint import load_checkpoint_model
from rawnet_lib.training.run import resolve_checkpoint, validation_roots, validation_trials
from rawnet_lib.verify import Verifier, VerifyError, read_pairs
from rawnet_lib.views.listen import samples_table
from rawnet_lib.views.plots import waveform_spectrogram

__all__ = ["VerifySession", "verify_session", "demo_inputs", "inputs", "listen", "waveforms", "comparison_table",
           "score_position"]

# The notebook's own parameters, not Config fields.
OWN = ("checkpoint", "enroll", "test", "impostor", "dev_trials", "far", "operating_point")


@dataclass
class VerifySession:
    verifier: Verifier
    cfg: Config
    enroll: list[Path]
    test: list[Path]
    impostor: list[Path]
    calibration_note: str


def demo_inputs(data_path: Path) -> tuple[Path, Path, Path]:
    """Two utterances of one speaker (different videos when there are) and one of another, from
    the corpus's VoxCeleb1 folders."""
    files, _ = find_audio([data_path / "VoxCeleb1"])
    by_speaker: dict[str, list[Path]] = {}
    for f in files:
        by_speaker.setdefault(f.parent.parent.name, []).append(f)
    speakers = [s for s, fs in sorted(by_speaker.items()) if len(fs) >= 2]
    if len(speakers) < 2:
        raise VerifyError(f"{data_path / 'VoxCeleb1'}: needs two speakers with two utterances each for the "
                          "default inputs; give enroll=, test= and impostor= files")
    first = by_speaker[speakers[0]]
    other_video = next((f for f in first[1:] if f.parent != first[0].parent), first[1])
    return first[0], other_video, by_speaker[speakers[1]][0]


def verify_session(namespace: Mapping[str, Any]) -> VerifySession:
    """The notebook's verifier and inputs from its parameters (`verify_session(globals())`)."""
    declared_parameters(namespace, accept=BLOCK_NAMES)  # a misspelt -p is named before any loading
    ckpt = resolve_checkpoint(namespace.get("checkpoint"))
    _, cfg = load_checkpoint_model(ckpt, base=namespace.get("preset") or "paper")
    cfg = notebook_config(namespace, base=cfg, own=OWN)
    verifier = Verifier.from_checkpoint(ckpt, preset=namespace.get("preset"), device=cfg.train.device,
                                        crop_mode=cfg.evaluation.crop_mode, eval_hop=cfg.evaluation.eval_hop)
    data_path = resolve_data_path(cfg.data)
    given = [namespace.get(k) or "" for k in ("enroll", "test", "impostor")]
    defaults = demo_inputs(data_path) if not all(given) else (None, None, None)
    inputs = [find_audio([input_path(g)])[0] if g else [d] for g, d in zip(given, defaults)]
    note = f"calibration from {verifier.calibration.source.get('trials')}" if verifier.calibration else ""
    if verifier.calibration is None:
        given = namespace.get("dev_trials")  # else the run's validation list: the data set's, or its own
        dev = input_path(given) if given else validation_trials(cfg, data_path, ckpt.parent.parent)
        roots = validation_roots(cfg, data_path)
        far = namespace.get("far")
        verifier.calibrate(read_pairs(dev, roots), far=0.01 if far is None else far)
        note = f"calibrated now on {dev}, saved beside the checkpoint"
    return VerifySession(verifier, cfg, *inputs, note)


def inputs(session: VerifySession) -> dict[str, Path]:
    """The first file of each input, to listen to and look at (the table scores every file)."""
    return {"enroll": session.enroll[0], "test": session.test[0], "impostor": session.impostor[0]}


def listen(session: VerifySession) -> HTML:
    """A player per input, playing what the model hears (mono, its rate); it plays in the saved
    notebook too (rawnet_lib/views/listen.py)."""
    named = {name: (path, session.verifier.samples(path)) for name, path in inputs(session).items()}
    return samples_table(named, session.cfg.model.sample_rate, "the inputs as the model hears them")


def comparison_table(session: VerifySession, operating_point: str = "eer") -> pd.DataFrame:
    """Score, LLR and decision of the enrolment (its file, or the speaker its files make, enrolled
    once) against every test file (same speaker expected) and every impostor file."""
    v = session.verifier
    enrolled: Path | str = session.enroll[0]
    if len(session.enroll) > 1:
        v.enroll(enrolled := "enrolled", session.enroll)
    rows = []
    for name, side in (("test", session.test), ("impostor", session.impostor)):
        for path in side:
            result = v.verify(enrolled, path, operating_point)
            rows.append({"pair": f"enroll vs {name}" + (f": {path.name}" if len(side) > 1 else ""),
                         "score": result["score"], "llr": result.get("llr"), "same speaker?": result["decision"],
                         "operating point": result["operating_point"], "threshold": result["threshold"],
                         "crop_mode": result["crop_mode"]})
    return pd.DataFrame(rows)


def score_position(calibration: Calibration, scores: Mapping[str, float], ax=None) -> Figure:
    """The development list's target and non-target score densities, with these scores marked."""
    if ax is None:  # a Figure of its own, not pyplot's: the notebook shows it once, and it is freed when dropped
        fig = Figure(figsize=(6, 3), layout="constrained")
        ax = fig.subplots()
    fig = ax.figure
    hist = calibration.histogram
    edges = np.asarray(hist["edges"])
    for kind, color in (("target", "tab:green"), ("nontarget", "tab:red")):
        counts = np.asarray(hist[kind], dtype=float)
        ax.stairs(counts / max(counts.sum() * np.diff(edges).mean(), 1e-12), edges, color=color, label=kind,
                  fill=True, alpha=0.35)
    for (name, score), style in zip(scores.items(), itertools.cycle(("-", "--", ":", "-."))):
        ax.axvline(score, color="black", linestyle=style, label=f"{name}: {score:.3f}")
    ax.axvline(calibration.thresholds["eer"], color="grey", linewidth=0.8, label="EER threshold")
    ax.set_xlabel("cosine score")
    ax.set_ylabel("density (development list)")
    ax.legend(fontsize="small")
    return fig


def waveforms(session: VerifySession) -> Figure:
    """Waveform over spectrogram of each input, side by side."""
    files = inputs(session)
    fig = Figure(figsize=(4 * len(files), 3.5))
    axes = fig.subplots(2, len(files), sharey="row", squeeze=False, gridspec_kw={"height_ratios": (1, 2)})
    for i, (name, path) in enumerate(files.items()):
        waveform_spectrogram(session.verifier.samples(path), session.cfg.model.sample_rate, f"{name}: {path.name}",
                             ax=axes[:, i])
    fig.tight_layout()
    return fig
