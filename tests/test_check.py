"""Tests for rawnet_lib.dataset.check: one run over a small broken tree finds every problem with its count."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rawnet_lib.dataset.audio import AUDIO_PROBLEMS
from rawnet_lib.dataset.check import CheckReport, DatasetError, check_dataset
from rawnet_lib.dataset.utterances import load_utterances, scan_utterances

SR = 16000


def _wav(path: Path, seconds: float = 1.0, sr: int = SR, channels: int = 1, silent: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    shape = (int(seconds * sr), channels) if channels > 1 else (int(seconds * sr),)
    x = np.zeros(shape) if silent else 0.1 * rng.standard_normal(shape)
    sf.write(str(path), x, sr, subtype="PCM_16")
    return path


def _raw(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _wav_bytes(seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.full(int(seconds * SR), 0.1), SR, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture
def broken_db(tmp_path: Path) -> Path:
    """A VoxCeleb-like tree under a path with a space and non-ASCII, holding one or two of every problem."""
    db = tmp_path / "my dätäbase"
    dev, ev, vox2 = db / "VoxCeleb1/dev_wav", db / "VoxCeleb1/eval_wav", db / "VoxCeleb2/wav"
    # usable: 6 files of 5 speakers, 1 + 1 + 2 + 1.5 + 1 + 2 = 8.5 s (and short.wav, 0.2 s, below)
    _wav(dev / "id001/vidA/00001.wav")
    _wav(dev / "id001/vidB/00001.wav")
    _wav(dev / "id002/vïd C/ütt 1.wav", seconds=2.0)  # non-ASCII and spaces are fine
    _wav(ev / "id003/v/00001.wav", seconds=1.5)
    _wav(vox2 / "id100/v/00001.wav")
    x = np.zeros(2 * SR)
    x[SR + 777] = 0.5  # one sample between the silence probes: not silent
    (vox2 / "id101/v").mkdir(parents=True)
    sf.write(str(vox2 / "id101/v/00001.wav"), x, SR, subtype="PCM_16")
    # problems: 14 files and a folder with audio problems, 3 that are not usable wavs at all
    _raw(dev / "id001/vidA/empty.wav", b"")
    _raw(dev / "id001/vidA/truncated.wav", _wav_bytes()[:20])
    _raw(dev / "id001/vidA/text.wav", "not audio, just text\n".encode())
    _wav(dev / "id002/v/8k.wav", sr=8000)
    _wav(ev / "id003/v/8k.wav", sr=8000)
    _wav(dev / "id002/v/stereo.wav", channels=2)
    _wav(dev / "id002/v/silent.wav", seconds=2.0, silent=True)
    _wav(dev / "id002/v/tiny silent.wav", seconds=0.3, silent=True)  # also short
    _wav(dev / "id002/v/short.wav", seconds=0.2)
    _wav(dev / "id002/v/nothing.wav", seconds=0.0)
    nan = np.full(SR, 0.1)
    nan[SR // 2] = np.nan  # a float wav's header cannot show it
    sf.write(str(dev / "id002/v/nan.wav"), nan, SR, subtype="FLOAT")
    (vox2 / "id100/v/00004.wav").mkdir()  # a folder where an utterance file belongs
    _raw(vox2 / "id100/v/00002.m4a", b"\x00\x00\x00 ftypM4A ")
    _raw(vox2 / "id100/v/notes.txt", b"hello")
    _wav(dev / "id001/loose.wav")
    # trial list O: one pair fine (across dev and eval), two keys on no disk and a bad label; a .txt list
    # that does not parse; a list that starts with a byte order mark and is otherwise fine
    (db / "VoxCeleb1/veri_test.txt").write_text(
        "1 id001/vidA/00001.wav id001/vidB/00001.wav\n"
        "0 id001/vidA/00001.wav id003/v/00001.wav\n"
        "0 id001/x/gone.wav id009/v/00001.wav\n"
        "same id001/vidA/00001.wav id001/vidB/00001.wav\n")
    (db / "broken list.txt").write_text("1 id001/vidA/00001.wav\n")
    (db / "bom list.txt").write_bytes(b"\xef\xbb\xbf1 id001/vidA/00001.wav id001/vidB/00001.wav\n"
                                      b"0 id001/vidA/00001.wav id003/v/00001.wav\n")
    return db


def test_every_problem_in_one_run(broken_db: Path):
    dirs = ["VoxCeleb2/wav", "VoxCeleb1/dev_wav", "VoxCeleb1/eval_wav", "VoxCeleb1/test"]
    lists = ["O", "E", str(broken_db / "broken list.txt"), str(broken_db / "bom list.txt")]
    report = check_dataset(broken_db, dirs=dirs, trial_lists=lists, min_seconds=0.5, progress=False)
    counts = {kind: p.count for kind, p in report.problems.items()}
    assert counts == {
        "missing_dir": 1, "m4a": 1, "other_file": 1, "bad_layout": 1, "not_a_file": 1, "empty": 1, "unreadable": 2,
        "sample_rate": 2, "channels": 1, "no_frames": 1, "nonfinite": 1, "silent": 2, "short": 2,
        "list_missing": 1, "list_invalid": 2, "list_warning": 1,
    }
    ex = {kind: " | ".join(p.examples) for kind, p in report.problems.items()}
    assert "VoxCeleb1/test" in ex["missing_dir"]
    assert "VoxCeleb2/wav/id100/v/00002.m4a" in ex["m4a"] and "convert" in report.problems["m4a"].fix
    assert "notes.txt" in ex["other_file"] and "id001/loose.wav" in ex["bad_layout"]
    assert ex["not_a_file"] == "VoxCeleb2/wav/id100/v/00004.wav: a folder, not a file"
    assert "vidA/empty.wav" in ex["empty"] and "nothing.wav" in ex["no_frames"]
    assert "truncated.wav" in ex["unreadable"] and "text.wav" in ex["unreadable"]
    assert "VoxCeleb1/dev_wav/id002/v/8k.wav: sample rate 8000 Hz" in ex["sample_rate"]
    assert "id003/v/8k.wav" in ex["sample_rate"]
    assert "ffmpeg" in report.problems["sample_rate"].fix and "16000" in report.problems["sample_rate"].fix
    assert "stereo.wav: 2 channels" in ex["channels"]
    assert ex["nonfinite"] == "VoxCeleb1/dev_wav/id002/v/nan.wav: 1 NaN or Inf sample(s)"
    assert report.problems["silent"].examples == ["VoxCeleb1/dev_wav/id002/v/silent.wav",
                                                  "VoxCeleb1/dev_wav/id002/v/tiny silent.wav"]
    assert "id101" not in ex["silent"]  # a single non-zero sample off the probes is found
    assert "short.wav: 0.20 s" in ex["short"] and "tiny silent.wav: 0.30 s" in ex["short"]
    assert report.problems["short"].warning and report.problems["short"].title == "shorter than 0.5 s"
    assert "list_test_all.txt" in ex["list_missing"]
    # every problem of list O at once: the bad label and the two files on no disk, by line
    o_list = next(e for e in report.problems["list_invalid"].examples if "veri_test.txt" in e)
    assert "label not 0/1: 1 line(s)" in o_list and "line 4: 'same " in o_list
    assert "file not on disk: 1 line(s)" in o_list
    assert "line 3: '0 id001/x/gone.wav id009/v/00001.wav' (id001/x/gone.wav and id009/v/00001.wav not found)" in o_list
    assert "broken list.txt" in ex["list_invalid"] and "line 1" in ex["list_invalid"]
    assert "bom list.txt" in ex["list_warning"] and "byte order mark" in ex["list_warning"]
    assert "label" not in ex["list_warning"] and report.problems["list_warning"].warning
    assert report.files == 21  # 6 usable + 11 broken wavs at the right depth + m4a, txt, loose.wav, a folder
    assert (report.utterances, report.speakers) == (7, 5)  # a short file is usable: a warning, not an error
    assert report.hours == pytest.approx(8.7 / 3600)
    assert not report.ok


def test_training_leaves_out_exactly_the_files_the_check_finds_unusable(broken_db: Path):
    """Both ask audio.probe: the same files, folders and NaN files, for the same reasons."""
    for d in ("VoxCeleb2/wav", "VoxCeleb1/dev_wav", "VoxCeleb1/eval_wav"):
        report = check_dataset(broken_db, dirs=[d], trial_lists=[], progress=False)
        in_check = {e for kind, p in report.problems.items() if kind in AUDIO_PROBLEMS for e in p.examples}
        utts = scan_utterances(broken_db / d, workers=1, progress=False)
        assert {f"{d}/{key}: {why}" for key, why in utts.bad} == in_check
        silent = report.problems["silent"].count if "silent" in report.problems else 0
        assert len(utts) == report.utterances + silent  # silence trains (peak 0); the check calls it an error


def test_report_text_dict_and_raise(broken_db: Path):
    report = check_dataset(broken_db, trial_lists=[str(broken_db / "broken list.txt")], progress=False)
    text = str(report)
    assert str(broken_db) in text and "usable utterances" in text
    assert "empty file (0 bytes): 1" in text and "fix:" in text
    assert "\n      " in text  # the multi-line list error is indented under its kind
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["ok"] is False and as_dict["problems"]["empty"]["count"] == 1
    assert as_dict["problems"]["sample_rate"]["examples"][0].endswith("sample rate 8000 Hz, expected 16000")
    with pytest.raises(DatasetError) as info:
        report.raise_if_bad()
    assert isinstance(info.value, ValueError) and "unreadable audio: 2" in str(info.value)


def test_clean_tree_is_ok(tmp_path: Path):
    db = tmp_path / "clean db ü"
    _wav(db / "VoxCeleb1/dev_wav/id001/v1/00001.wav")
    _wav(db / "VoxCeleb1/dev_wav/id001/v2/00001.wav")
    _wav(db / "VoxCeleb1/eval_wav/id002/v1/00001.wav", seconds=1.5)
    (db / "VoxCeleb1/veri_test.txt").write_text("0 id001/v1/00001.wav id002/v1/00001.wav\n"
                                                "1 id001/v1/00001.wav id001/v2/00001.wav\n")
    report = check_dataset(db, dirs=["VoxCeleb1/dev_wav", "VoxCeleb1/eval_wav"], workers=1, progress=False)
    assert report.ok and not report.problems, str(report)
    assert (report.files, report.utterances, report.speakers) == (3, 3, 2)
    assert report.hours == pytest.approx(3.5 / 3600)
    assert str(report).endswith("no problems found")
    report.raise_if_bad()  # no exception
    assert CheckReport(db).ok


def test_short_files_and_a_bom_are_warnings_with_their_count(tmp_path: Path):
    db = tmp_path / "db"
    _wav(db / "VoxCeleb1/dev_wav/id001/v1/00001.wav", seconds=2.0)
    for i, seconds in enumerate((0.05, 0.3, 0.5, 0.7, 0.9, 0.99, 0.2)):
        _wav(db / f"VoxCeleb1/dev_wav/id002/v{i}/00001.wav", seconds=seconds)
    (db / "VoxCeleb1/veri_test.txt").write_bytes(b"\xef\xbb\xbf0 id001/v1/00001.wav id002/v0/00001.wav\n"
                                                 b"1 id002/v1/00001.wav id002/v2/00001.wav\n")
    report = check_dataset(db, dirs=["VoxCeleb1/dev_wav"], progress=False)  # min_seconds defaults to 1 s
    assert report.ok, str(report)
    report.raise_if_bad()  # warnings alone never raise
    assert report.utterances == 8  # short files are usable: training tiles them
    short = report.problems["short"]
    assert (short.count, len(short.examples), short.warning) == (7, 5, True)
    assert short.examples[0] == "VoxCeleb1/dev_wav/id002/v0/00001.wav: 0.05 s"
    text = str(report)
    assert "no problems found, 2 kind(s) of warning:" in text
    assert "  warning: shorter than 1 s: 7" in text and "... and 2 more" in text
    assert "  warning: trial list read after a fix: 1" in text and "veri_test.txt starts with a UTF-8 byte" in text
    assert report.to_dict()["problems"]["short"]["warning"] is True
    quieter = check_dataset(db, dirs=["VoxCeleb1/dev_wav"], min_seconds=0.25, progress=False)
    assert quieter.problems["short"].count == 2 and quieter.min_seconds == 0.25


def test_warnings_come_after_errors_and_do_not_hide_them(tmp_path: Path):
    db = tmp_path / "db"
    _wav(db / "VoxCeleb1/dev_wav/id001/v1/00001.wav", seconds=0.5)
    _wav(db / "VoxCeleb1/dev_wav/id001/v1/00002.wav", sr=8000)
    report = check_dataset(db, dirs=["VoxCeleb1/dev_wav"], trial_lists=[], progress=False)
    assert not report.ok
    text = str(report)
    assert "1 kind(s) of problem, 1 kind(s) of warning:" in text
    assert text.index("wrong sample rate: 1") < text.index("warning: shorter than 1 s: 1")
    with pytest.raises(DatasetError, match="wrong sample rate"):
        report.raise_if_bad()


def test_bad_trial_list_name_raises_before_walking(tmp_path: Path):
    with pytest.raises(ValueError, match="O, O2, E"):
        check_dataset(tmp_path, trial_lists=["vox1-o"], progress=False)


def test_a_training_speaker_in_an_evaluation_folder_and_a_key_in_two_folders_are_errors(tmp_path: Path):
    db = tmp_path / "db"
    _wav(db / "VoxCeleb2/wav/id100/v/00001.wav")
    _wav(db / "VoxCeleb2/wav/id001/x/00001.wav")  # a VoxCeleb1 speaker in training
    _wav(db / "VoxCeleb1/dev_wav/id001/v1/00001.wav")
    _wav(db / "VoxCeleb1/eval_wav/id001/v1/00001.wav")  # the same key in both VoxCeleb1 folders
    _wav(db / "VoxCeleb1/eval_wav/id002/v1/00001.wav")
    dirs = ["VoxCeleb2/wav", "VoxCeleb1/eval_wav", "VoxCeleb1/dev_wav"]
    report = check_dataset(db, dirs=dirs, trial_lists=[], progress=False)
    assert {kind: p.count for kind, p in report.problems.items()} == {"speaker_leak": 2, "duplicate_key": 1}
    assert report.problems["speaker_leak"].examples == ["id001: in VoxCeleb2/wav and VoxCeleb1/eval_wav",
                                                        "id001: in VoxCeleb2/wav and VoxCeleb1/dev_wav"]
    assert report.problems["duplicate_key"].examples == ["id001/v1/00001.wav: in VoxCeleb1/eval_wav and "
                                                         "VoxCeleb1/dev_wav"]
    text = str(report)
    assert "leaks into the results" in text and "remove one copy" in text and not report.ok
    # training on VoxCeleb1 dev: its speakers must not be in eval_wav either
    vox1 = check_dataset(db, dirs=dirs[1:], trial_lists=[], train_dir="VoxCeleb1/dev_wav", progress=False)
    assert vox1.problems["speaker_leak"].examples == ["id001: in VoxCeleb1/dev_wav and VoxCeleb1/eval_wav"]


def test_a_silent_file_a_leftover_temporary_file_and_a_broken_link_say_what_to_do(tmp_path: Path):
    db = tmp_path / "db"
    folder = _wav(db / "VoxCeleb2/wav/id100/v/00001.wav").parent
    _wav(folder / "00002.wav", silent=True)
    _raw(folder / ".00003.wav.k2j4h1.tmp", b"RIFF")  # what an interrupted io.atomic_path leaves
    (folder / "00004.wav").symlink_to(tmp_path / "moved away.wav")
    report = check_dataset(db, dirs=["VoxCeleb2/wav"], trial_lists=[], progress=False)
    assert {kind: p.count for kind, p in report.problems.items()} == {"silent": 1, "leftover_tmp": 1,
                                                                      "broken_link": 1}
    assert "delete it, then run python -m rawnet_lib.convert" in report.problems["silent"].fix
    assert report.problems["leftover_tmp"].title.startswith("leftover of an interrupted conversion")
    assert report.problems["leftover_tmp"].fix.startswith("delete it")
    assert report.problems["broken_link"].examples == [f"VoxCeleb2/wav/id100/v/00004.wav: broken link (to "
                                                       f"{tmp_path / 'moved away.wav'})"]
    assert scan_utterances(db / "VoxCeleb2/wav", progress=False).bad[-1][1].startswith("broken link")


def test_a_file_name_that_is_not_utf8_is_a_problem_not_a_crash(tmp_path: Path, capsys):
    db = tmp_path / "db"
    folder = _wav(db / "VoxCeleb1/dev_wav/id001/v/00001.wav").parent
    (folder / os.fsdecode(b"caf\xe9.wav")).write_bytes((folder / "00001.wav").read_bytes())  # a latin1 name
    report = check_dataset(db, dirs=["VoxCeleb1/dev_wav"], trial_lists=[], progress=False)
    assert list(report.problems) == ["bad_name"] and report.utterances == 1
    assert report.problems["bad_name"].examples == [f"VoxCeleb1/dev_wav/id001/v/caf\\xe9.wav: file name not UTF-8 "
                                                    f"(folder {folder})"]
    assert "convmv -f latin1 -t utf8 -r --notest <folder>" in report.problems["bad_name"].fix
    print(report)  # printable
    utts = load_utterances(db, "VoxCeleb1/dev_wav", progress=False)
    assert utts.keys == ["id001/v/00001.wav"] and utts.bad[0][0] == "id001/v/caf\\xe9.wav"
    assert load_utterances(db, "VoxCeleb1/dev_wav", progress=False).bad == utts.bad  # the list file reads back
    assert "caf" in capsys.readouterr().out
