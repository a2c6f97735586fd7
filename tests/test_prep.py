"""prep.py: conversion, lists and the check in one call; what it reports and its exit status."""
from __future__ import annotations

import collections
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rawnet_lib import prep
from rawnet_lib.config import DataConfig
from rawnet_lib.dataset.ffmpeg import encode_m4a

SR = 16000


def _wav(path: Path, seconds: float = 1.0, sr: int = SR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.random.default_rng(len(str(path))).uniform(-0.3, 0.3, int(seconds * sr)), sr,
             subtype="PCM_16")
    return path


def _db(root: Path, sr: int = SR) -> Path:
    """A clean tiny tree: two VoxCeleb1 folders, two trials of list O, a VoxCeleb2 wav tree."""
    _wav(root / "VoxCeleb1/dev_wav/id001/v/00001.wav", sr=sr)
    _wav(root / "VoxCeleb1/eval_wav/id002/v/00001.wav", sr=sr)
    _wav(root / "VoxCeleb1/eval_wav/id002/w/00001.wav", sr=sr)
    (root / "VoxCeleb1/veri_test.txt").write_text("0 id001/v/00001.wav id002/v/00001.wav\n"
                                                  "1 id002/v/00001.wav id002/w/00001.wav\n")
    _wav(root / "VoxCeleb2/wav/id100/v/00001.wav", sr=sr)
    return root


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_a_failed_conversion_is_a_check_error_and_exit_status_1(tmp_path: Path, capsys) -> None:
    db = _db(tmp_path / "db")
    encode_m4a([(_wav(tmp_path / "src.wav"), db / "VoxCeleb2/m4a/id100/v/00002.m4a")])
    bad = db / "VoxCeleb2/m4a/id101/v/00001.m4a"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an m4a file at all")
    assert prep.main(["--data_path", str(db), "--trial_lists", "O", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "failed 1" in out and "no problems found" not in out
    assert ".m4a file that did not convert (no wav made): 1" in out
    line = next(line for line in out.splitlines() if "00001.m4a" in line and "did not" not in line)
    assert line.count("00001.m4a") == 1 and "Invalid data" in line  # the path once, then ffmpeg's reason
    assert "re-download it, or delete the .m4a" in out
    assert (db / "VoxCeleb2/wav/id100/v/00002.wav").is_file()  # the good one converted


def test_a_clean_tree_prepares_with_exit_status_0(tmp_path: Path, capsys) -> None:
    db = _db(tmp_path / "db")
    assert prep.main(["--data_path", str(db), "--trial_lists", "O", "--workers", "1"]) == 0
    assert "no problems found" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_an_8khz_model_converts_lists_and_checks_at_8khz(tmp_path: Path, capsys) -> None:
    db = _db(tmp_path / "db", sr=8000)
    encode_m4a([(_wav(tmp_path / "src.wav"), db / "VoxCeleb2/m4a/id100/v/00002.m4a")])
    assert prep.main(["--data_path", str(db), "--trial_lists", "O", "--sample_rate", "8000", "--workers", "1"]) == 0
    assert "no problems found" in capsys.readouterr().out
    assert sf.info(str(db / "VoxCeleb2/wav/id100/v/00002.wav")).samplerate == 8000
    assert (db / "lists/VoxCeleb2_wav.tsv").read_text().splitlines()[1] == "#rate\t8000"


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_a_prep_run_reads_each_wav_once_plus_the_silence_probe(tmp_path: Path, monkeypatch) -> None:
    """Conversion skips an existing wav unread, the check reuses the list scan's probe and opens a
    file again only for its silence probe; a rerun finds the list files current and scans nothing.
    A VoxCeleb2 tree holds a million files: each further read per file costs minutes."""
    db = _db(tmp_path / "db")
    m4a = db / "VoxCeleb2/m4a/id100/v/00001.m4a"  # its wav exists, so it is never decoded
    m4a.parent.mkdir(parents=True)
    m4a.touch()
    opens: collections.Counter = collections.Counter()
    init = sf.SoundFile.__init__

    def counted(self, file, *args, **kwargs) -> None:  # sf.info, sf.read and sf.blocks all open one
        opens[Path(file)] += 1
        init(self, file, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "__init__", counted)
    wavs = sorted(db.rglob("*.wav"))
    for most in (2, 1):  # a first run scans each tree; the second reads its list files
        opens.clear()
        assert prep.prepare(DataConfig(data_path=str(db)), workers=1, progress=False).ok
        assert sorted(opens) == wavs and max(opens.values()) <= most, opens
