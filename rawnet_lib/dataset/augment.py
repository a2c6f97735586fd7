"""Training-crop augmentation: reverberation with room impulse responses, then additive noise.

Folders follow the public layouts, so MUSAN and RIRS_NOISES work as downloaded:

    noise_dir/{noise,music,speech}/<source>/*.wav   (MUSAN; speech/ files are summed into babble)
    rir_dir/**/*.wav                                 (RIRS_NOISES: simulated_rirs/ when present)

Without folders, built-in sets are made once under `sets_dir` (`ensure_builtin_sets`):
coloured noise (white, pink, brown, blue) and synthetic tone music, written by this module
(by the workbook's own code, no third-party audio), and 24 impulse responses of 12
shoebox rooms (three sizes) simulated with pyroomacoustics' image method (MIT licence,
EPFL-LCAV). Each room's absorption is Sabine's for an RT60 drawn in 0.2-0.9 s, but the image
sources stop at order 20 (Sabine asks 20-96 here), so the simulated decays are not those
RT60s: measured (T30, `pyroomacoustics.experimental.measure_rt60`) 0.16-0.74 s in the small
and medium rooms and 0.45-2.2 s in the large, flat ones (15-30 m wide, 2.5-5 m high). The set
is kept as it is so runs stay comparable; for reverberation of known RT60, give rir_dir
RIRS_NOISES. Babble then comes from the training speech itself (`builtin_babble`: a fixed
sample of training utterances per seed), never from VoxCeleb1: its dev part is the validation
data here, and Vox1-E and Vox1-H draw their trials from all of it, so babble from it would play
validation and test speakers into training. A crop's own speaker may be one of the talkers (about
one chance in the number of training speakers per talker); the label stays right. On the demo
corpus that speech is synthesised by espeak-ng (GPL-3.0) with MBROLA voices (each voice's own
licence, mostly non-commercial research use); on VoxCeleb it is VoxCeleb2 dev (CC BY 4.0).

Each crop's draws come from its own generator, seeded by (seed, epoch, index) in
`data.CropDataset`, so augmented runs are reproducible and resume bit-identically with any
number of loader workers. Order per crop: reverb (p = rir_prob), then one noise kind chosen
uniformly among those present (p = noise_prob) at an SNR drawn from that kind's range (for
babble, each talker at its own SNR from the range, summed, as voxceleb_trainer and
RawNet2-modified do), then peak normalisation as every training crop.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf
from scipy.signal import fftconvolve

from rawnet_lib.config import AugmentConfig, input_path, repo_path
from rawnet_lib.dataset.audio import SAMPLE_RATE, peak_normalise, probe, tile
from rawnet_lib.dataset.utterances import UtteranceList
from rawnet_lib.errors import WorkbookError

__all__ = ["AugmentError", "KINDS", "Mixture", "Augmenter", "check_folders", "find_noises", "find_rirs",
           "ensure_builtin_sets", "builtin_babble", "add_noise", "reverberate"]

KINDS = ("noise", "music", "speech")
BUILTIN_VERSION = "v1"
BABBLE_FILES = 2000  # training utterances in the built-in babble's pool (MUSAN's speech/ has 426 files)


class AugmentError(WorkbookError, ValueError):
    """A noise or RIR folder the augmentation cannot use; the message names it and the fix."""


def find_noises(folder: str | Path) -> dict[str, list[Path]]:
    """MUSAN layout: the wav files under each of noise/, music/, speech/ (kinds without files left out)."""
    folder = input_path(folder)
    found = {kind: sorted((folder / kind).rglob("*.wav")) for kind in KINDS}
    found = {kind: files for kind, files in found.items() if files}
    if not found:
        raise AugmentError(f"noise_dir {folder} has no .wav files under {', '.join(k + '/' for k in KINDS)} "
                           "(the MUSAN layout); point noise_dir at the musan/ folder, or leave it empty for the "
                           "built-in set")
    return found


def find_rirs(folder: str | Path) -> list[Path]:
    """RIRS_NOISES layout: the simulated_rirs/ files when present (real_rirs_isotropic_noises/
    also holds noises), else every wav under the folder."""
    folder = input_path(folder)
    simulated = [p for p in (folder / "simulated_rirs", folder / "RIRS_NOISES" / "simulated_rirs") if p.is_dir()]
    files = sorted((simulated[0] if simulated else folder).rglob("*.wav"))
    if not files:
        raise AugmentError(f"rir_dir {folder} has no .wav impulse responses; point rir_dir at RIRS_NOISES/ "
                           "(simulated_rirs/...), or leave it empty for the built-in set")
    return files


def add_noise(x: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """`noise` scaled so that 10 log10(P_x / P_noise) = snr_db (powers as mean squares)."""
    p_x, p_n = float(np.mean(x * x)), float(np.mean(noise * noise))
    if p_n <= 0:
        return np.zeros_like(x)
    return noise * np.sqrt(p_x / (p_n * 10 ** (snr_db / 10)))


def reverberate(x: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """x convolved with a unit-energy RIR, aligned on the direct path so the crop stays in place
    (a silent RIR leaves x as it is)."""
    energy = float(np.sum(rir * rir))
    if energy <= 0:
        return x
    rir = rir / np.sqrt(energy)
    peak = int(np.argmax(np.abs(rir)))
    return fftconvolve(x, rir)[peak:peak + len(x)].astype(x.dtype)


@lru_cache(maxsize=512)  # per worker process; RIRs are short
def _rir(path: Path) -> np.ndarray:
    data, _ = sf.read(str(path), dtype="float32", always_2d=True)
    return _finite(data[:, 0], path, "RIR set")


def _finite(x: np.ndarray, path: Path, what: str) -> np.ndarray:
    """x, checked where it is read: a NaN or Inf sample would turn the whole crop into NaN, and
    the start-up check reads headers only (scanning every sample of MUSAN would be slow)."""
    if not np.isfinite(x).all():
        raise AugmentError(f"{path}: NaN or Inf samples; remove that file from the {what}, or replace it with a "
                           "clean copy")
    return x


def _segment(path: Path, n: int, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """A random n-sample stretch of a noise file (tiled when shorter), first channel."""
    try:
        info = sf.info(str(path))
        if info.samplerate != sample_rate:
            raise AugmentError(f"{path} is {info.samplerate} Hz, the training audio {sample_rate} Hz; resample "
                               "the noise set (sox in.wav -r 16000 out.wav) or remove the file")
        start = int(rng.integers(0, max(1, info.frames - n + 1)))
        data, _ = sf.read(str(path), start=start, frames=n, dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as err:
        raise AugmentError(f"{path}: unreadable noise file ({err}); remove it from the noise set") from None
    return tile(_finite(data[:, 0], path, "noise set"), n) if len(data) else np.zeros(n, np.float32)


@dataclass
class Mixture:
    """An augmented crop before normalisation: the (reverberated) speech and the scaled noise."""
    speech: np.ndarray
    noise: np.ndarray
    kind: str           # noise | music | speech (babble) | "" (none)
    snr_db: float       # of all the noise added (babble: its sum) to the speech, measured; nan without noise
    reverb: bool


class Augmenter:
    """Callable on (crop, rng); picklable, so each loader worker holds its own copy."""

    def __init__(self, cfg: AugmentConfig, noises: dict[str, list[Path]], rirs: list[Path],
                 sample_rate: int = SAMPLE_RATE):
        self.cfg, self.noises, self.rirs, self.sample_rate = cfg, noises, rirs, sample_rate
        self.snr = {"noise": cfg.snr_noise, "music": cfg.snr_music, "speech": cfg.snr_babble}

    @classmethod
    def from_config(cls, cfg: AugmentConfig, babble: Sequence[Path] = (),
                    sample_rate: int = SAMPLE_RATE) -> "Augmenter | None":
        """The augmenter of a config (None when disabled); builds the built-in sets on first use.
        `babble`: the speech files of the built-in babble (`builtin_babble`), used without a noise_dir.
        Raises AugmentError for a folder without audio or a file it cannot use, before anything trains."""
        if not cfg.enabled:
            return None
        builtin_noise, builtin_rir = (ensure_builtin_sets(cfg.sets_dir)
                                      if not (cfg.noise_dir and cfg.rir_dir) else (None, None))
        noises, rirs = find_noises(cfg.noise_dir or builtin_noise), find_rirs(cfg.rir_dir or builtin_rir)
        for files, what in [*((f, f"noise set ({kind}/)") for kind, f in noises.items()), (rirs, "RIR set")]:
            _check_files(files, what, sample_rate)
        if not cfg.noise_dir and babble:
            noises["speech"] = list(babble)  # training utterances: already checked by the training list
        return cls(cfg, noises, rirs, sample_rate)

    def mix(self, x: np.ndarray, rng: np.random.Generator) -> Mixture:
        cfg = self.cfg
        # every draw happens whatever is chosen, so one choice never shifts the others' random numbers
        use_rir, use_noise = rng.random() < cfg.rir_prob, rng.random() < cfg.noise_prob
        rir = self.rirs[int(rng.integers(len(self.rirs)))]
        kinds = sorted(self.noises)
        kind = kinds[int(rng.integers(len(kinds)))]
        snr = float(rng.uniform(*self.snr[kind]))
        speech = reverberate(x, _rir(rir)) if use_rir else x
        if not use_noise:
            return Mixture(speech, np.zeros_like(x), "", float("nan"), use_rir)
        files = self.noises[kind]
        if kind == "speech":  # babble: several talkers, each at its own SNR, summed
            k = int(rng.integers(cfg.babble_files[0], cfg.babble_files[1] + 1))
            picks = rng.choice(len(files), size=min(k, len(files)), replace=False)
            snrs = [snr, *rng.uniform(*self.snr[kind], size=len(picks) - 1)]
            noise = sum(add_noise(speech, _segment(files[i], len(x), rng, self.sample_rate), talker)
                        for i, talker in zip(picks, snrs))
        else:
            noise = add_noise(speech, _segment(files[int(rng.integers(len(files)))], len(x), rng, self.sample_rate),
                              snr)
        p_speech, p_noise = float(np.mean(speech * speech)), float(np.mean(noise * noise))
        if p_noise <= 0:  # a silent noise segment (or silent speech): nothing was added
            return Mixture(speech, np.zeros_like(x), "", float("nan"), use_rir)
        return Mixture(speech, noise.astype(x.dtype), kind, 10 * np.log10(p_speech / p_noise), use_rir)

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        m = self.mix(x, rng)
        return peak_normalise(m.speech + m.noise).astype(np.float32)


def builtin_babble(utts: UtteranceList, seed: int, n: int = BABBLE_FILES) -> list[Path]:
    """The built-in babble's speech: up to n training utterances drawn with the run's seed (the
    module's docstring says why training speech)."""
    pick = np.random.default_rng([seed, 3]).choice(len(utts), size=min(n, len(utts)), replace=False)
    return [utts.root / utts.keys[i] for i in np.sort(pick)]


def check_folders(cfg: AugmentConfig, sample_rate: int = SAMPLE_RATE) -> None:
    """A config's own noise and RIR folders hold audio and every file is usable, as `from_config`
    checks at a run's start, without making the built-in sets: a sweep checks every arm's before
    its first run trains, not when a later arm starts hours on."""
    if not cfg.enabled:
        return
    sets = [(f, f"noise set ({kind}/)") for kind, f in find_noises(cfg.noise_dir).items()] if cfg.noise_dir else []
    for files, what in [*sets, *([(find_rirs(cfg.rir_dir), "RIR set")] if cfg.rir_dir else [])]:
        _check_files(files, what, sample_rate)


def _check_files(files: list[Path], what: str, sample_rate: int) -> None:
    """Each file readable, not empty and at the training rate (its first channel is used), so a bad
    one stops the run before training, not when a loader worker first draws it hours later."""
    for path in files:
        problems = [found for kind, found in probe(path, sample_rate).problems if kind != "channels"]
        if problems:
            raise AugmentError(f"{path}: {'; '.join(problems)}; resample it to {sample_rate} Hz (sox in.wav -r "
                               f"{sample_rate} out.wav) if only its rate is wrong, else remove it from the {what}")


# -- the built-in sets -------------------------------------------------------------------------
def ensure_builtin_sets(sets_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """(noise folder, RIR folder) of the built-in sets, made once (a few seconds) under sets_dir."""
    root = repo_path(sets_dir) / BUILTIN_VERSION
    if not (root / "sets.json").is_file():
        tmp = root.with_name(f".{root.name}.{np.random.default_rng().integers(1 << 30)}.tmp")
        _write_noise(tmp / "noise", np.random.default_rng([seed, 1]))
        rooms = _write_rirs(tmp / "rirs" / "simulated_rirs", np.random.default_rng([seed, 2]))
        (tmp / "sets.json").write_text(json.dumps({
            "noise": "coloured noise (white, pink, brown, blue) and tone music, "
                     "synthesised by rawnet_lib.dataset.augment",
            "rirs": f"{rooms} shoebox rooms, pyroomacoustics image method (MIT licence)",
            "babble": "training speech of the run's data (builtin_babble), see rawnet_lib/dataset/augment.py"},
            indent=1))
        try:
            tmp.rename(root)  # atomic: a concurrent maker (another rank) may have won, which is fine
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return root / "noise", root / "rirs"


def _write(path: Path, x: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), (0.9 * peak_normalise(x)).astype(np.float32), SAMPLE_RATE, subtype="PCM_16")


def _write_noise(folder: Path, rng: np.random.Generator, seconds: float = 8.0) -> None:
    n = int(seconds * SAMPLE_RATE)
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    for name, alpha in (("white", 0.0), ("pink", 1.0), ("brown", 2.0), ("blue", -1.0)):
        for i in range(3):
            spectrum = np.fft.rfft(rng.standard_normal(n)) / np.maximum(freqs, 20.0) ** (alpha / 2)
            _write(folder / "noise" / "synthetic" / f"{name}-{i}.wav", np.fft.irfft(spectrum, n))
    t = np.arange(int(0.6 * SAMPLE_RATE)) / SAMPLE_RATE
    for i in range(6):  # tone "music": random notes with a few harmonics and a decaying envelope
        notes = []
        while sum(map(len, notes)) < n:
            length = int(rng.uniform(0.15, 0.6) * SAMPLE_RATE)
            pitches = 440 * 2 ** ((rng.integers(-21, 16, size=rng.integers(1, 4)) / 12))
            tone = sum(np.sin(2 * np.pi * f * h * t[:length]) / h for f in pitches for h in (1, 2, 3, 4))
            notes.append(tone * np.exp(-3 * t[:length] / t[length - 1]))
        _write(folder / "music" / "synthetic" / f"tones-{i}.wav", np.concatenate(notes)[:n])


def _write_rirs(folder: Path, rng: np.random.Generator) -> int:
    try:
        import pyroomacoustics as pra
    except ImportError:
        raise AugmentError("the built-in RIR set needs pyroomacoustics (pip install pyroomacoustics), "
                           "or give rir_dir a folder of impulse responses (RIRS_NOISES)") from None
    sizes = {"smallroom": (3.0, 6.0), "mediumroom": (6.0, 15.0), "largeroom": (15.0, 30.0)}
    count = 0
    for size, (low, high) in sizes.items():
        for r in range(4):
            dims = [rng.uniform(low, high), rng.uniform(low, high), rng.uniform(2.5, 5.0)]
            rt60 = rng.uniform(0.2, 0.9)
            absorption, order = pra.inverse_sabine(rt60, dims)
            for s in range(2):
                room = pra.ShoeBox(dims, fs=SAMPLE_RATE, materials=pra.Material(absorption), max_order=min(order, 20))
                room.add_source([rng.uniform(0.5, d - 0.5) for d in dims])
                room.add_microphone([rng.uniform(0.5, d - 0.5) for d in dims])
                room.compute_rir()
                _write(folder / size / f"Room{r + 1:03d}" / f"Room{r + 1:03d}-{s + 1:05d}.wav", room.rir[0][0])
                count += 1
    return count // 2
