"""convert.py: m4a -> 16 kHz mono wav, resumable, failures collected (needs ffmpeg only)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rawnet_lib import convert
from rawnet_lib.convert import ConvertReport, convert_tree
from rawnet_lib.dataset import ffmpeg
from rawnet_lib.dataset.audio import probe
from rawnet_lib.dataset.ffmpeg import ConvertError, encode_m4a
from rawnet_lib.io import atomic_path

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")

# (relative path, sample rate, channels, seconds): the 44.1 kHz stereo file checks -ac/-ar
FILES = [(f"id0000{s}/vid{s}{v}xxxxxxx/0000{u}", 16000, 1, 0.5 + 0.25 * u)
         for s in (1, 2) for v in (1, 2) for u in (1, 2)] + [("id00003/stereo44kHz/00001", 44100, 2, 1.0)]


@pytest.fixture(scope="module")
def m4a_tree(tmp_path_factory) -> Path:
    """A small VoxCeleb2-like m4a tree made from noise bursts, encoded in one ffmpeg call."""
    root = tmp_path_factory.mktemp("conv")
    pairs = []
    for i, (rel, rate, channels, seconds) in enumerate(FILES):
        audio = np.random.default_rng(i).uniform(-0.3, 0.3, (int(rate * seconds), channels))
        wav = root / "src_wav" / f"{i}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        sf.write(wav, audio, rate, subtype="PCM_16")
        target = root / "m4a" / f"{rel}.m4a"
        target.parent.mkdir(parents=True, exist_ok=True)
        pairs.append((wav, target))
    encode_m4a(pairs)
    return root / "m4a"


def _copy(tree: Path, dst: Path) -> Path:
    shutil.copytree(tree, dst)
    return dst


def test_converts_every_file_to_16k_mono(m4a_tree: Path, tmp_path: Path) -> None:
    report = convert_tree(m4a_tree, tmp_path / "wav", workers=2, progress=False)
    assert (report.converted, report.skipped, report.failed) == (len(FILES), 0, [])
    for rel, _, _, seconds in FILES:
        info = sf.info(str(tmp_path / "wav" / f"{rel}.wav"))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert abs(info.duration - seconds) < 0.05  # AAC priming is trimmed by ffmpeg
    assert not list((tmp_path / "wav").rglob(".*.tmp"))


def test_second_run_skips_existing_wavs_unread_and_converts_missing_ones(m4a_tree: Path, tmp_path: Path) -> None:
    dst = tmp_path / "wav"
    convert_tree(m4a_tree, dst, progress=False)
    again = convert_tree(m4a_tree, dst, progress=False)
    assert (again.converted, again.skipped) == (0, len(FILES))
    (dst / f"{FILES[0][0]}.wav").unlink()
    damaged = dst / f"{FILES[1][0]}.wav"
    damaged.write_bytes(b"RIFF\0\0")  # put there by other means: the dataset check reports it
    resumed = convert_tree(m4a_tree, dst, progress=False)
    assert (resumed.converted, resumed.skipped) == (1, len(FILES) - 1)
    assert probe(dst / f"{FILES[0][0]}.wav").ok and damaged.read_bytes() == b"RIFF\0\0"  # skipped, not rewritten
    damaged.unlink()  # the check's fix: delete it and convert again
    assert convert_tree(m4a_tree, dst, progress=False).converted == 1 and probe(damaged).ok


def test_corrupt_m4a_is_reported_and_the_rest_converts(m4a_tree: Path, tmp_path: Path) -> None:
    src = _copy(m4a_tree, tmp_path / "m4a")
    bad = src / "id00001" / "vid11xxxxxxx" / "00009.m4a"
    bad.write_bytes(b"not an m4a file at all")
    report = convert_tree(src, tmp_path / "wav", workers=1, progress=False)
    assert report.converted == len(FILES)
    assert [path for path, _ in report.failed] == [str(bad)]
    assert report.failed[0][1]  # ffmpeg's message, not an empty reason
    assert not (tmp_path / "wav" / "id00001" / "vid11xxxxxxx" / "00009.wav").exists()
    assert not list((tmp_path / "wav").rglob(".*.tmp"))
    assert "failed 1" in report.summary() and str(bad) in report.summary()


def test_an_m4a_whose_name_is_not_utf8_is_reported_and_the_rest_converts(m4a_tree: Path, tmp_path: Path) -> None:
    src = _copy(m4a_tree, tmp_path / "m4a")
    good = src / f"{FILES[0][0]}.m4a"
    bad = good.with_name(os.fsdecode(b"caf\xe9.m4a"))  # a latin1 name
    shutil.copy(good, bad)
    report = convert_tree(src, tmp_path / "wav", workers=1, progress=False)
    assert report.converted == len(FILES)
    assert report.failed == [(str(good.parent / "caf\\xe9.m4a"),
                              f"file name not UTF-8; rename the folder's files to UTF-8: convmv -f latin1 -t utf8 -r "
                              f"--notest {good.parent} (without --notest it only shows the renames; latin1 is the "
                              "usual other encoding)")]
    print(report.summary())  # printable


def test_encoding_is_byte_identical(m4a_tree: Path, tmp_path: Path) -> None:
    wav = m4a_tree.parent / "src_wav" / "0.wav"
    encode_m4a([(wav, tmp_path / "a.m4a"), (wav, tmp_path / "b.m4a")])
    first = (tmp_path / "a.m4a").read_bytes()
    assert first == (tmp_path / "b.m4a").read_bytes()
    assert first == (m4a_tree / f"{FILES[0][0]}.m4a").read_bytes()


def test_errors_name_the_problem(m4a_tree: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ConvertError, match="not a folder"):
        convert_tree(tmp_path / "missing", tmp_path / "wav", progress=False)
    with pytest.raises(ConvertError, match="workers=0"):
        convert_tree(m4a_tree, tmp_path / "wav", workers=0, progress=False)
    monkeypatch.setattr(ffmpeg.shutil, "which", lambda name: None)
    with pytest.raises(ConvertError, match="apt-get install ffmpeg"):
        convert_tree(m4a_tree, tmp_path / "wav", progress=False)


def test_failed_encoding_leaves_no_target_and_no_temporary_file(tmp_path: Path) -> None:
    src = tmp_path / "not audio.wav"
    src.write_text("not audio")
    with pytest.raises(ConvertError, match="could not encode m4a"):
        encode_m4a([(src, tmp_path / "out" / "a.m4a")])
    assert list((tmp_path / "out").iterdir()) == []


def test_atomic_path_replaces_the_target_only_when_the_block_succeeds(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "t.wav"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".t.wav.") and tmp.suffix == ".tmp"
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the program failed")
    assert target.read_text() == "new" and [p.name for p in target.parent.iterdir()] == ["t.wav"]


def test_cli_converts_and_returns_zero(m4a_tree: Path, tmp_path: Path, capsys) -> None:
    assert convert.main([str(m4a_tree), str(tmp_path / "wav"), "--workers", "1"]) == 0
    assert f"converted {len(FILES)}" in capsys.readouterr().out


def test_summary_lists_the_first_failures() -> None:
    report = ConvertReport(converted=3, failed=[(f"f{i}.m4a", "bad") for i in range(7)], seconds=1.5)
    text = report.summary()
    assert text.startswith("converted 3, skipped 0 (wav already there), failed 7 in 1.5 s")
    assert "f4.m4a: bad" in text and "f5.m4a" not in text and "and 2 more" in text
