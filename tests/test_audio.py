"""Tests for rawnet_lib.dataset.audio: the probe that decides whether a file is usable, tiling, the
reference's test-time crops, random training crops (partial reads), and the errors for files
the workbook cannot use."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import rawnet_lib.dataset.audio as audio
from rawnet_lib.dataset.audio import (SAMPLE_RATE, AudioError, AudioInfo, eval_crops, peak_normalise, probe,
                                      random_crop, read_audio, tile)


def _wav(path: Path, x: np.ndarray, sr: int = 16000, subtype: str = "FLOAT") -> Path:
    sf.write(str(path), x, sr, subtype=subtype)
    return path


def _reference_tile(x: np.ndarray, n: int) -> np.ndarray:
    """The reference: repeat int(n / len) + 1 times, then cut."""
    return np.tile(x, int(n / len(x)) + 1)[:n]


def _reference_crops(x: np.ndarray, n: int, hop: int) -> list[np.ndarray]:
    """The reference's test-time loop, transcribed from its description."""
    if len(x) < n:
        return [_reference_tile(x, n)]
    if len(x) == n:
        return [x]
    overlap = n - hop
    count = int((len(x) - overlap) / hop) + 1
    crops = []
    for i in range(count):
        if i == 0:
            crops.append(x[:n])
        elif i < count - 1:
            crops.append(x[i * hop:i * hop + n])
        else:
            crops.append(x[-n:])
    return crops


# --- tile -----------------------------------------------------------------------------------

def test_tile_exact_values():
    x = np.array([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(tile(x, 7), [1, 2, 3, 1, 2, 3, 1])
    np.testing.assert_array_equal(tile(x, 6), [1, 2, 3, 1, 2, 3])
    np.testing.assert_array_equal(tile(x, 2), [1, 2])          # longer input: cut
    np.testing.assert_array_equal(tile(x, 3), x)
    np.testing.assert_array_equal(tile(np.array([5.0]), 4), [5, 5, 5, 5])


@pytest.mark.parametrize("length, n", [(1, 10), (3, 10), (1000, 59049), (30000, 59049), (59048, 59049),
                                       (7, 49), (13, 6561)])
def test_tile_matches_reference(length, n):
    x = np.random.default_rng(length).normal(size=length).astype(np.float32)
    out = tile(x, n)
    assert out.shape == (n,) and out.dtype == np.float32
    np.testing.assert_array_equal(out, _reference_tile(x, n))


# --- eval_crops -----------------------------------------------------------------------------

def test_eval_crop_count_reference_numbers():
    n, hop = 59049, 47239
    assert n - hop == 11810
    for length, count in [(59050, 2), (106287, 2), (106288, 3), (153526, 3), (153527, 4),
                          (8 * 16000, 3), (20 * 16000, 7)]:
        x = np.arange(length, dtype=np.float32)
        crops = eval_crops(x, n, hop)
        assert len(crops) == count == int((length - 11810) / 47239) + 1, length
        assert crops.shape == (count, n)


def test_eval_crops_positions():
    """First at 0, middle ones at i * hop, the last aligned to the end (hand-computed)."""
    x = np.arange(25, dtype=np.float64)
    crops = eval_crops(x, 10, 7)     # overlap 3: int((25 - 3) / 7) + 1 = 4 crops
    assert crops.shape == (4, 10)
    starts = [int(c[0]) for c in crops]
    assert starts == [0, 7, 14, 15]
    for c in crops:
        np.testing.assert_array_equal(c, np.arange(c[0], c[0] + 10))


def test_eval_crops_reference_length_middle_positions():
    x = np.arange(200_000, dtype=np.float64)
    crops = eval_crops(x, 59049, 47239)
    assert len(crops) == int((200_000 - 11810) / 47239) + 1 == 4
    assert [int(c[0]) for c in crops] == [0, 47239, 94478, 200_000 - 59049]
    assert crops[-1][-1] == 199_999


@pytest.mark.parametrize("length", [1, 100, 5000, 5248, 5249, 6560, 6561, 6562, 11810, 11811, 12000, 40_000])
def test_eval_crops_match_reference_loop(length):
    x = np.random.default_rng(length).normal(size=length)
    want = _reference_crops(x, 6561, 5249)
    got = eval_crops(x, 6561, 5249)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_short_file_tiled_to_one_crop():
    x = np.array([1.0, -2.0, 3.0])
    crops = eval_crops(x, 8, 6)
    np.testing.assert_array_equal(crops, [[1, -2, 3, 1, -2, 3, 1, -2]])


def test_exactly_n_samples_is_one_crop():
    x = np.arange(59049, dtype=np.float32)
    crops = eval_crops(x, 59049, 47239)
    assert crops.shape == (1, 59049)
    np.testing.assert_array_equal(crops[0], x)


# --- peak_normalise -------------------------------------------------------------------------

def test_peak_normalise():
    np.testing.assert_allclose(peak_normalise(np.array([0.5, -2.0, 1.0])), [0.25, -1.0, 0.5])
    silent = peak_normalise(np.zeros(5, dtype=np.float32))
    np.testing.assert_array_equal(silent, np.zeros(5))
    assert not np.isnan(silent).any()


# --- read_audio and errors ------------------------------------------------------------------

def test_read_audio_full_and_partial(tmp_path):
    x = np.random.default_rng(0).uniform(-0.9, 0.9, 1000).astype(np.float32)
    path = _wav(tmp_path / "a.wav", x)
    full = read_audio(path)
    assert full.dtype == np.float32 and full.ndim == 1
    np.testing.assert_array_equal(full, x)
    np.testing.assert_array_equal(read_audio(path, start=100, frames=50), x[100:150])
    np.testing.assert_array_equal(read_audio(path, start=990), x[990:])
    assert probe(path).frames == 1000


def test_read_audio_pcm16(tmp_path):
    x = (np.arange(-100, 100) * 100).astype(np.int16)
    path = tmp_path / "pcm.wav"
    sf.write(str(path), x, 16000, subtype="PCM_16")
    np.testing.assert_allclose(read_audio(path), x / 32768.0, atol=1e-7)


@pytest.mark.parametrize("case, match", [
    ("rate", "sample rate 8000"),
    ("stereo", "2 channels"),
    ("text", "unreadable"),
    ("zero_bytes", "empty file"),
    ("folder", "a folder"),
    ("no_frames", "no samples"),
    ("missing", "unreadable"),
])
def test_read_audio_errors_name_the_file(tmp_path, case, match):
    path = tmp_path / f"bad_{case}.wav"
    if case == "rate":
        _wav(path, np.zeros(800, dtype=np.float32), sr=8000)
    elif case == "stereo":
        _wav(path, np.zeros((800, 2), dtype=np.float32))
    elif case == "text":
        path.write_text("this is not audio\n" * 20)
    elif case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "no_frames":
        _wav(path, np.zeros(0, dtype=np.float32))
    elif case == "folder":
        path.mkdir()
    with pytest.raises(AudioError, match=match) as info:
        read_audio(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("content", [b"", b"RIFF....WAVEjunk", b"hello"])
def test_probe_of_a_broken_header_names_the_problem(tmp_path, content):
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    info = probe(path)
    assert not info.ok and info.frames == 0
    assert [kind for kind, _ in info.problems] == ["empty" if not content else "unreadable"]
    with pytest.raises(AudioError) as err:
        info.raise_if_bad()
    assert str(path) in str(err.value) and "re-download or re-convert" in str(err.value)


# --- probe ----------------------------------------------------------------------------------

def test_probe_of_a_usable_file(tmp_path):
    path = _wav(tmp_path / "ok.wav", np.zeros(24_000, dtype=np.int16), subtype="PCM_16")
    info = probe(path, scan=True)
    assert info == AudioInfo(path, 24_000, SAMPLE_RATE, 1, "PCM_16")
    assert info.ok and info.problem == "" and info.seconds == 1.5
    info.raise_if_bad()  # no exception


def test_probe_lists_every_header_problem_and_keeps_the_header(tmp_path):
    path = _wav(tmp_path / "both.wav", np.zeros((4000, 2), dtype=np.float32), sr=8000)
    info = probe(path)
    assert [kind for kind, _ in info.problems] == ["sample_rate", "channels"]
    assert info.problem == "sample rate 8000 Hz, expected 16000; 2 channels, expected mono"
    assert (info.frames, info.sample_rate, info.channels, info.seconds) == (4000, 8000, 2, 0.5)
    assert probe(path, sample_rate=8000).problems == (("channels", "2 channels, expected mono"),)


@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_probe_scan_finds_nan_and_inf_in_float_files(tmp_path, subtype, bad):
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 40_000)
    x[[7, 39_999]] = bad  # one early, one in the very last frame
    path = _wav(tmp_path / "nan.wav", x, subtype=subtype)
    assert probe(path).ok  # the header cannot tell
    info = probe(path, scan=True)
    assert info.problems == (("nonfinite", "2 NaN or Inf sample(s)"),)
    with pytest.raises(AudioError, match="NaN or Inf") as err:
        info.raise_if_bad()
    assert str(path) in str(err.value) and "pcm_s16le" in str(err.value)


def test_probe_scan_reads_float_files_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(audio, "_SCAN_BLOCK", 1000)
    x = np.zeros(4500, dtype=np.float32)
    x[4321] = np.nan  # in the last, partial block
    assert probe(_wav(tmp_path / "nan.wav", x), scan=True).problems[0][0] == "nonfinite"
    assert probe(_wav(tmp_path / "ok.wav", np.zeros(4500, dtype=np.float32)), scan=True).ok


def test_read_and_crop_refuse_nan_samples_the_header_hides(tmp_path):
    x = np.full(20_000, 0.1, dtype=np.float32)
    x[50] = np.nan
    path = _wav(tmp_path / "nan.wav", x)
    with pytest.raises(AudioError, match="NaN or Inf"):
        read_audio(path)
    np.testing.assert_array_equal(read_audio(path, start=100, frames=10), x[100:110])  # a clean part reads
    with pytest.raises(AudioError, match="NaN or Inf"):
        random_crop(path, 30_000, np.random.default_rng(0))  # tiled: the whole file


# --- random_crop ----------------------------------------------------------------------------

class _ReadSpy:
    """Wraps soundfile.SoundFile in the audio module; records (position, frames asked, frames got)
    of every read."""

    def __init__(self, monkeypatch):
        self.reads: list[tuple[int, int, int]] = []
        real = sf.SoundFile
        spy = self

        class SpyFile(real):
            def read(self, frames=-1, *args, **kwargs):
                position = self.tell()
                out = super().read(frames, *args, **kwargs)
                spy.reads.append((position, frames, len(out)))
                return out

        monkeypatch.setattr(audio.sf, "SoundFile", SpyFile)


def test_random_crop_reads_only_its_frames(tmp_path, monkeypatch):
    x = np.random.default_rng(1).uniform(-0.5, 0.5, 50_000).astype(np.float32)
    path = _wav(tmp_path / "long.wav", x)
    spy = _ReadSpy(monkeypatch)
    crop = random_crop(path, 6561, np.random.default_rng(7))
    assert crop.shape == (6561,) and crop.dtype == np.float32
    (start, asked, got), = spy.reads
    assert asked == got == 6561
    assert 0 <= start <= 50_000 - 6561
    segment = x[start:start + 6561]
    np.testing.assert_allclose(crop, segment / np.abs(segment).max(), rtol=1e-6)


def test_random_crop_short_file_reads_once(tmp_path, monkeypatch):
    path = _wav(tmp_path / "short.wav", np.linspace(-1, 1, 300).astype(np.float32))
    spy = _ReadSpy(monkeypatch)
    random_crop(path, 1000, np.random.default_rng(0))
    assert spy.reads == [(0, -1, 300)]


def test_random_crop_deterministic_per_seed(tmp_path):
    x = np.random.default_rng(2).uniform(-1, 1, 30_000).astype(np.float32)
    path = _wav(tmp_path / "a.wav", x)
    a = random_crop(path, 1000, np.random.default_rng(123))
    b = random_crop(path, 1000, np.random.default_rng(123))
    np.testing.assert_array_equal(a, b)
    others = [random_crop(path, 1000, np.random.default_rng(s)) for s in range(5)]
    assert sum(np.array_equal(a, o) for o in others) <= 1


def test_random_crop_covers_the_whole_range(tmp_path):
    """Every start in [0, len - n] is possible: with len = n + 2 all three occur."""
    x = np.array([1, 2, 3, 4, 5, 6], dtype=np.float32)
    path = _wav(tmp_path / "six.wav", x)
    rng = np.random.default_rng(0)
    crops = {tuple(np.round(random_crop(path, 4, rng), 4)) for _ in range(60)}
    want = {tuple(np.round(x[s:s + 4] / x[s:s + 4].max(), 4)) for s in range(3)}
    assert crops == want


def test_random_crop_is_peak_normalised(tmp_path):
    x = (0.01 * np.random.default_rng(3).normal(size=20_000)).astype(np.float32)
    path = _wav(tmp_path / "quiet.wav", x)
    crop = random_crop(path, 5000, np.random.default_rng(0))
    assert np.abs(crop).max() == pytest.approx(1.0)


def test_random_crop_of_silence_is_zeros(tmp_path):
    path = _wav(tmp_path / "silent.wav", np.zeros(20_000, dtype=np.float32))
    for n in (5000, 30_000):       # cropped and tiled
        crop = random_crop(path, n, np.random.default_rng(0))
        assert crop.shape == (n,)
        assert not np.isnan(crop).any()
        np.testing.assert_array_equal(crop, np.zeros(n))


@pytest.mark.parametrize("length", [100, 6561])
def test_random_crop_short_file_tiled(tmp_path, length):
    x = np.random.default_rng(4).uniform(-0.5, 0.5, length).astype(np.float32)
    path = _wav(tmp_path / "short.wav", x)
    crop = random_crop(path, 6561, np.random.default_rng(0))
    want = _reference_tile(x, 6561)
    np.testing.assert_allclose(crop, want / np.abs(want).max(), rtol=1e-6)


def test_random_crop_wrong_rate_is_audio_error(tmp_path):
    path = _wav(tmp_path / "r.wav", np.ones(10_000, dtype=np.float32), sr=22050)
    with pytest.raises(AudioError, match="22050"):
        random_crop(path, 1000, np.random.default_rng(0))
