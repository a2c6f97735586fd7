"""Synthetic speech for the demo corpus: the voices this machine can speak with (MBROLA diphone
voices driven by espeak-ng, else espeak-ng's own variants), and one speaker's files, each
utterance spoken at its speed factor and passed through its video's channel (band-pass, room,
coloured noise, gain). Every utterance has its own RNG, so the bytes do not depend on how many
processes render.
"""
from __future__ import annotations

import io
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.fft import next_fast_len
from scipy.signal import butter, fftconvolve, firwin, resample_poly, sosfilt

from rawnet_lib.dataset.audio import SAMPLE_RATE, wav_bytes
from rawnet_lib.dataset.ffmpeg import encode_m4a
from rawnet_lib.errors import WorkbookError
from rawnet_lib.io import atomic_write_bytes

__all__ = ["CorpusError", "INSTALL", "Voice", "find_voices", "render_speaker"]

INSTALL = "run ./setup.sh install or apt-get install espeak-ng sox ffmpeg"
_BROKEN_MBROLA = {"cn1", "bz1", "hn1"}  # espeak-ng cannot drive these
_ESPEAK_LANGS = ("en-us", "en", "de", "fr", "es", "it", "nl", "pt", "pl", "sv")
_ESPEAK_SKIP = {"whisper", "whisperf"}  # unvoiced: no pitch, no gender cue
_PROBE_TEXT = "bala tomi kanu seta, rimo dakelin lenu fasor gimu pelo"  # 10 words
_SYLLABLES = tuple([c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["an", "el", "is", "or", "um"])
# Syllables in a voice's own script, for the voices whose language does not read Latin text:
# consonant + vowel sign (Arabic fatha, kasra, damma; Hebrew qamats, hiriq, qubuts, tsere, holam;
# Devanagari and Telugu none (the inherent a), aa, i, u, e, o), and kana.
_NATIVE_SYLLABLES = {
    "ar": tuple(c + v for c in "بتدرزسشفقكلمنهوي" for v in "\u064e\u0650\u064f"),
    "he": tuple(c + v for c in "בגדהזכלמנפקרשת" for v in "\u05b8\u05b4\u05bb\u05b5\u05b9"),
    "hi": tuple(c + v for c in "कगटडतदनपबमयरलवसह" for v in ("", "\u093e", "\u093f", "\u0941", "\u0947", "\u094b")),
    "te": tuple(c + v for c in "కగటడతదనపబమయరలవసహ" for v in ("", "\u0c3e", "\u0c3f", "\u0c41", "\u0c46", "\u0c4b")),
    "ja": tuple("かきくけこさしすせそたてとなにぬねのはひふへほまみむめもやゆよらりるれろわ"
                "がぎぐげござずぜぞだでどばびぶべぼぱぴぷぺぽ"),
}
_MIN_SYLLABLES = 10  # fewer, and a voice's sentences repeat too much to be worth a speaker


class CorpusError(WorkbookError, ValueError):
    """The demo corpus cannot be made here (missing voices or tools, another corpus in the folder)."""


@dataclass(frozen=True)
class Voice:
    """One base voice: an MBROLA voice ``mb-de1`` or an espeak variant ``de+m3``."""

    name: str
    kind: str  # "mbrola" or "espeak"
    gender: str  # "m" or "f"
    family: str  # language, e.g. "de": Vox1-H non-target pairs keep it
    words_per_s: float = 3.0  # of our pseudo-words at espeak's default rate; probed
    database: str = ""  # MBROLA diphone database file (mbrola voices)
    volume: float = 1.0  # the volume ratio espeak-ng would give mbrola for this voice
    syllables: tuple[str, ...] = ()  # what its sentences are made of; empty: the Latin pseudo-syllables


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise CorpusError(f"espeak-ng not found on PATH; {INSTALL}")
    return exe


def _synth(voice: Voice, text: str, pitch: int = 50, rate: int = 175) -> tuple[np.ndarray, int, str]:
    """Speak ``text``; returns (waveform, its sample rate, espeak/mbrola stderr).

    MBROLA voices run as espeak-ng's phonemes piped into the mbrola program, read to the end.
    Letting espeak-ng drive mbrola itself is not deterministic: its wrapper polls the mbrola
    process with timeouts, and under load the audio now and then came out different.
    """
    speak = [_espeak(), "-v", voice.name, "-p", str(pitch), "-s", str(rate)]
    if voice.kind != "mbrola":
        proc = subprocess.run([*speak, "--stdout", text], capture_output=True)
        if proc.returncode or len(proc.stdout) < 100:
            raise CorpusError(f"espeak-ng -v {voice.name} produced no audio: {proc.stderr[-200:]!r}")
        audio, sr = sf.read(io.BytesIO(proc.stdout), dtype="float64")
        return audio, sr, proc.stderr.decode(errors="replace")
    pho = subprocess.run([*speak, "-q", "--pho", text], capture_output=True)
    proc = subprocess.run(["mbrola", "-e", "-v", f"{voice.volume:g}", voice.database, "-", "-.wav"],
                          input=pho.stdout, capture_output=True)
    wav = proc.stdout  # a streamed .wav: 44-byte header (sizes unset), then 16-bit samples
    if pho.returncode or proc.returncode or len(wav) < 144 or wav[36:40] != b"data":
        raise CorpusError(f"espeak-ng -v {voice.name} | mbrola produced no audio: "
                         f"{(pho.stderr + proc.stderr)[-200:]!r}")
    audio = np.frombuffer(wav[44:44 + (len(wav) - 44) // 2 * 2], dtype="<i2") / 32768.0
    return audio, int.from_bytes(wav[24:28], "little"), proc.stderr.decode(errors="replace")


def _trim(audio: np.ndarray) -> np.ndarray:
    voiced = np.flatnonzero(np.abs(audio) > 1e-3 * np.abs(audio).max())
    return audio[voiced[0]:voiced[-1] + 1]


def _probe(voice: Voice) -> Voice | str:
    """The voice with its speaking speed measured, or why it is unusable."""
    try:
        audio, sr, err = _synth(voice, _PROBE_TEXT)
        unknown = err.count("unknown")  # MBROLA replaces each missing diphone with silence
        if unknown > 15 and voice.kind == "mbrola":
            return _probe_own_syllables(voice, unknown)
    except ValueError as exc:
        return str(exc)
    if unknown > 15 or not np.abs(audio).max() > 0.01:
        return f"{unknown} missing diphones (its language does not read Latin text)"
    return replace(voice, words_per_s=round(10 * sr / _trim(audio).size, 3))


def _spoken(voice: Voice, text: str) -> tuple[np.ndarray, int] | None:
    """The voice's audio of `text` and its rate, or None unless it says it aloud with no diphone missing."""
    try:
        audio, sr, err = _synth(voice, text)
    except ValueError:
        return None
    return (audio, sr) if "unknown" not in err and np.abs(audio).max() > 0.01 else None


def _probe_own_syllables(voice: Voice, unknown: int) -> Voice | str:
    """A voice whose language does not read our Latin pseudo-words, kept with the syllables (in
    its own script where we have one, else the Latin ones) it speaks without a missing diphone:
    a real voice more, speaking a smaller inventory. A random sentence then tries their joins."""
    candidates = _NATIVE_SYLLABLES.get(voice.family, _SYLLABLES)
    spoken = tuple(s for s in candidates if _spoken(voice, f"{s}{s} {s}") is not None)
    if len(spoken) < _MIN_SYLLABLES:
        return (f"{unknown} missing diphones in Latin text and {len(spoken)} of its "
                f"{len(candidates)} syllables spoken (fewer than {_MIN_SYLLABLES})")
    said = _spoken(voice, _sentence(np.random.default_rng(0), 20, spoken))
    if said is None:
        return f"a sentence of its {len(spoken)} syllables loses diphones where they join"
    audio, sr = said
    return replace(voice, syllables=spoken, words_per_s=round(20 * sr / _trim(audio).size, 3))


def _mbrola_candidates() -> list[Voice]:
    if shutil.which("mbrola") is None:
        return []
    version = subprocess.run([_espeak(), "--version"], capture_output=True, text=True).stdout
    data = Path(version.split("Data at:")[-1].strip())
    roots = [Path("/usr/share/mbrola"), Path("/usr/share/mbrola/voices")]
    found = []
    for path in sorted((data / "voices" / "mb").glob("mb-*")):
        code = path.name[3:]  # "mb-de1-en" style files reuse a voice for another language
        if "-" in code or code in _BROKEN_MBROLA:
            continue
        text = path.read_text(errors="replace")
        gender = re.search(r"^gender\s+(male|female)", text, re.M)
        lang = re.search(r"^language\s+(\S+)", text, re.M)
        mbrola = re.search(r"^mbrola\s+(\S+)\s+(\S+)", text, re.M)
        database = next((f for r in roots for f in (r / code / code, r / code) if f.is_file()), None)
        phtrans = data / "mbrola_ph" / mbrola[2] if mbrola else None
        if gender and lang and database and phtrans and phtrans.is_file():
            volume = phtrans.read_bytes()[0] / 16  # espeak-ng's ratio: low byte of the table's first word
            found.append(Voice(path.name, "mbrola", gender[1][0], lang[1].split("-")[0],
                               database=str(database), volume=volume))
    return found


def _espeak_candidates() -> list[Voice]:
    out = subprocess.run([_espeak(), "--voices=variant"], capture_output=True, text=True).stdout
    rows = sorted({(m[2], m[1].lower()) for m in re.finditer(r"\S+/([MF])\s+.*?!v/(\S+)", out)
                   if m[2] not in _ESPEAK_SKIP})
    langs = [_ESPEAK_LANGS[i % len(_ESPEAK_LANGS)] for i in range(len(rows))]
    return [Voice(f"{lang}+{name}", "espeak", gender, lang.split("-")[0])
            for lang, (name, gender) in zip(langs, rows)]


@lru_cache(maxsize=4)
def find_voices(voices: str = "auto") -> tuple[tuple[Voice, ...], tuple[tuple[str, str], ...]]:
    """(usable voices, skipped (name, reason)); ``auto`` prefers MBROLA when installed."""
    if voices not in ("auto", "mbrola", "espeak"):
        raise CorpusError(f"voices={voices!r}; choose 'auto', 'mbrola' or 'espeak'")
    candidates = _mbrola_candidates() if voices != "espeak" else _espeak_candidates()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_probe, candidates))
        if voices == "auto" and not any(isinstance(r, Voice) and not r.syllables for r in results):
            candidates = _espeak_candidates()  # no MBROLA voice that reads Latin text
            results = list(pool.map(_probe, candidates))
    usable = tuple(r for r in results if isinstance(r, Voice))
    if not usable:
        raise CorpusError(f"no usable {voices} voice found; {INSTALL}")
    return usable, tuple((v.name, r) for v, r in zip(candidates, results) if isinstance(r, str))


def _sentence(rng: np.random.Generator, n_words: int, syllables: tuple[str, ...] = ()) -> str:
    """Pseudo-words of `syllables` (empty: the Latin ones)."""
    words = ["".join(rng.choice(syllables or _SYLLABLES, size=rng.integers(1, 4))) for _ in range(n_words)]
    for i in range(3, n_words - 2, 5):  # commas give natural pauses
        words[i] += ","
    return " ".join(words)


def _video_channel(rng: np.random.Generator) -> dict:
    """One recording set-up: microphone band, room, noise colour and level, speaking style."""
    low, high = rng.uniform(50, 250), rng.uniform(3400, 7600)
    rt60, drr_db = rng.uniform(0.15, 0.7), rng.uniform(0, 15)  # room size, mic distance
    t = np.arange(int(SAMPLE_RATE * min(rt60, 0.5))) / SAMPLE_RATE
    tail = rng.standard_normal(t.size) * np.exp(-6.9 * t / rt60)
    tail *= 10 ** (-drr_db / 20) / np.sqrt(np.sum(tail ** 2))
    ir = np.concatenate([[1.0], np.zeros(int(rng.integers(16, 160))), tail])
    return {"sos": butter(int(rng.integers(1, 4)), [low, high], "bandpass", fs=SAMPLE_RATE, output="sos"),
            "ir": ir / np.sqrt(np.sum(ir ** 2)), "noise_slope": rng.uniform(0, 1),
            "snr": rng.uniform(5, 20), "peak": 10 ** (rng.uniform(-12, -1) / 20),
            "pitch": int(rng.integers(-6, 7)), "rate": int(rng.integers(-15, 16))}


@lru_cache(maxsize=16)
def _lowpass(rate: int) -> np.ndarray:
    """resample_poly's own anti-alias filter, designed once per rate, not once per call."""
    return firwin(20 * rate + 1, 1.0 / rate, window=("kaiser", 5.0))


def _render(voice: Voice, factor: float, channel: dict, rng: np.random.Generator,
            seconds: tuple[float, float], short_fraction: float) -> np.ndarray:
    """One utterance as 16 kHz int16: speech, sox-like speed factor, the video's channel."""
    short = rng.random() < short_fraction
    length = rng.uniform(1.5, 3.6) if short else rng.uniform(*seconds)
    rate = int(np.clip(rng.integers(145, 196) + channel["rate"], 120, 220))
    pitch = int(np.clip(rng.integers(42, 59) + channel["pitch"], 10, 90))
    n_words = max(2, round(1.1 * length * factor * voice.words_per_s * rate / 175))
    audio, sr, _ = _synth(voice, _sentence(rng, n_words, voice.syllables), pitch, rate)
    ratio = Fraction(SAMPLE_RATE, sr) / Fraction(factor).limit_denominator(50)  # shifts formants too
    audio = _trim(audio)
    if ratio != 1:
        up, down = ratio.numerator, ratio.denominator
        audio = resample_poly(audio, up, down, window=_lowpass(max(up, down)))
    pad = rng.integers(800, 4800, size=2)
    audio = np.concatenate([np.zeros(pad[0]), audio[:int(length * SAMPLE_RATE)], np.zeros(pad[1])])
    wet = fftconvolve(audio, channel["ir"])[:audio.size]
    n_fft = next_fast_len(wet.size, real=True)
    spectrum = np.fft.rfft(rng.standard_normal(n_fft))
    spectrum /= np.maximum(np.arange(spectrum.size), 1) ** (channel["noise_slope"] / 2)
    noise = np.fft.irfft(spectrum, n=n_fft)[:wet.size]  # white to pink
    snr = channel["snr"] + rng.uniform(-2, 2)
    noise *= np.sqrt(np.mean(wet ** 2) / np.mean(noise ** 2) / 10 ** (snr / 10))
    out = sosfilt(channel["sos"], wet + noise)
    out *= channel["peak"] / np.abs(out).max()
    return np.round(np.clip(out, -1, 1) * 32767).astype(np.int16)


def render_speaker(job: dict) -> float:
    """Write one speaker's files; m4a go through one batched ffmpeg. Returns audio seconds."""
    total, to_encode = 0.0, []
    with tempfile.TemporaryDirectory(prefix="rawnet_corpus_") as tmp:
        for v, (video, n_utts) in enumerate(job["videos"]):
            channel = _video_channel(np.random.default_rng([job["seed"], 2, job["num"], v]))
            folder = Path(job["dir"]) / video
            folder.mkdir(parents=True, exist_ok=True)
            for u in range(n_utts):
                rng = np.random.default_rng([job["seed"], 3, job["num"], v, u])
                audio = _render(job["voice"], job["factor"], channel, rng, job["seconds"], job["short_fraction"])
                total += audio.size / SAMPLE_RATE
                if job["m4a"]:
                    wav = Path(tmp) / f"{v}_{u}.wav"
                    wav.write_bytes(wav_bytes(audio))
                    to_encode.append((wav, folder / f"{u + 1:05d}.m4a"))
                else:
                    atomic_write_bytes(folder / f"{u + 1:05d}.wav", wav_bytes(audio))
        if to_encode:
            encode_m4a(to_encode)
    return total
