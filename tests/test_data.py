"""Tests for rawnet_lib.dataset.utterances: scanning a VoxCeleb-layout tree, the cached list file, where list
files go when the data folder is read-only, and the random-crop training dataset."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import rawnet_lib.dataset.utterances as data
from rawnet_lib.dataset.audio import AudioError
from rawnet_lib.dataset.utterances import CropDataset, UtteranceList, list_dir, load_utterances, scan_utterances

GOOD = {  # key -> frames; created in a shuffled order so sorting is tested
    "id10002/vidB/00002.wav": 3000,
    "id10001/vidA/00001.wav": 9000,
    "id10002/vidA/00001.wav": 500,
    "id10001/vidA/00002.wav": 12000,
    "id10003/vid9/00001.wav": 7000,
}


def _write(path: Path, frames: int, sr: int = 16000, channels: int = 1, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, (frames, channels) if channels > 1 else frames)
    sf.write(str(path), x.astype(np.float32), sr, subtype="FLOAT")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """`db/wav/<spk>/<video>/<utt>.wav` with five good files and four bad ones."""
    root = tmp_path / "db" / "wav"
    for i, (key, frames) in enumerate(GOOD.items()):
        _write(root / key, frames, seed=i)
    _write(root / "id10001/vidZ/rate.wav", 4000, sr=8000)
    _write(root / "id10002/vidZ/stereo.wav", 4000, channels=2)
    _write(root / "id10003/vidZ/empty.wav", 0)
    (root / "id10003/vidZ/text.wav").write_text("not audio\n")
    (root / "id10001/notes.txt").write_text("ignored\n")           # not spk/video/utt.wav
    _write(root / "id10001/loose.wav", 100)                         # wrong depth: ignored
    return root


# --- scan_utterances ------------------------------------------------------------------------

def test_scan_sorted_keys_and_frames(tree):
    utts = scan_utterances(tree, workers=2, progress=False)
    assert utts.root == tree
    assert utts.keys == sorted(GOOD)
    assert utts.frames.tolist() == [GOOD[k] for k in sorted(GOOD)]
    assert utts.frames.dtype == np.int64
    assert len(utts) == 5
    assert utts.seconds() == pytest.approx(sum(GOOD.values()) / 16000)


def test_scan_reports_bad_files_with_reasons(tree):
    bad = dict(scan_utterances(tree, workers=2, progress=False).bad)
    assert set(bad) == {"id10001/vidZ/rate.wav", "id10002/vidZ/stereo.wav", "id10003/vidZ/empty.wav",
                        "id10003/vidZ/text.wav"}
    assert "sample rate 8000" in bad["id10001/vidZ/rate.wav"]
    assert "2 channels" in bad["id10002/vidZ/stereo.wav"]
    assert bad["id10003/vidZ/empty.wav"] == "no samples"
    assert bad["id10003/vidZ/text.wav"].startswith("unreadable")


def test_scan_leaves_out_nan_files_and_folders_named_like_files(tree):
    nan = np.random.default_rng(0).uniform(-0.5, 0.5, 3000).astype(np.float32)
    nan[1234] = np.nan
    sf.write(str(tree / "id10001/vidZ/nan.wav"), nan, 16000, subtype="FLOAT")
    (tree / "id10002/vidZ/00004.wav").mkdir()
    utts = scan_utterances(tree, workers=2, progress=False)
    bad = dict(utts.bad)
    assert bad["id10001/vidZ/nan.wav"] == "1 NaN or Inf sample(s)"
    assert bad["id10002/vidZ/00004.wav"] == "a folder, not a file"
    assert utts.keys == sorted(GOOD) and len(utts.bad) == 6
    text = utts.bad_summary(limit=10)
    assert "nan.wav: 1 NaN or Inf sample(s)" in text and "00004.wav: a folder, not a file" in text


def test_crop_dataset_skips_nan_in_a_file_listed_before_the_scan_knew(utts):
    """A list file written by an older version holds a NaN file as usable; the crop refuses it."""
    x = np.full(9000, 0.1, dtype=np.float32)
    x[::100] = np.nan
    sf.write(str(utts.root / utts.keys[1]), x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or Inf"):
        CropDataset(utts, n_samples=400, seed=0)[1]
    skipping = CropDataset(utts, n_samples=400, seed=0, skip_bad=True)
    torch.testing.assert_close(skipping[1][0], skipping[2][0], rtol=0, atol=0)


def test_bad_summary_lists_files_and_the_fix(tree):
    utts = scan_utterances(tree, workers=2, progress=False)
    text = utts.bad_summary(limit=2)
    assert text.startswith(f"4 unusable file(s) under {tree}")
    assert "... and 2 more" in text
    assert "on_bad_audio: skip" in text


def test_speakers_and_labels_in_sorted_order(tree):
    utts = scan_utterances(tree, workers=2, progress=False)
    assert utts.speakers() == ["id10001", "id10002", "id10003"]
    assert utts.labels().tolist() == [0, 0, 1, 1, 2]
    assert utts.labels().dtype == np.int64


def test_scan_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_utterances(tmp_path / "nowhere", progress=False)
    (tmp_path / "flat").mkdir()
    _write(tmp_path / "flat" / "a.wav", 100)
    with pytest.raises(FileNotFoundError, match="spk/video/utt.wav"):
        scan_utterances(tmp_path / "flat", progress=False)


# --- load_utterances and the list file ------------------------------------------------------

def test_load_utterances_caches_and_reads_back(tree, capsys):
    data_path = tree.parent
    first = load_utterances(data_path, "wav", progress=False)
    list_file = data_path / "lists" / "wav.tsv"
    assert list_file.is_file()
    lines = list_file.read_text().splitlines()
    assert lines[0] == data.SIGNATURE_TAG + data.tree_signature(tree)
    assert lines[1] == data.RATE_TAG + "16000"
    assert lines[2:7] == [f"{k}\t{GOOD[k]}" for k in sorted(GOOD)]
    assert len(lines) == 11

    list_file.write_text(list_file.read_text().replace("\t9000", "\t9001"))  # the list, not the tree, answers
    again = load_utterances(data_path, "wav", progress=False)
    assert again.root == first.root == tree
    assert again.keys == first.keys
    assert again.frames.tolist() == [9001 if n == 9000 else n for n in first.frames]
    assert again.frames.dtype == np.int64
    assert again.bad == first.bad
    assert capsys.readouterr().err == ""             # reused without a word

    fresh = load_utterances(data_path, "wav", refresh=True, progress=False)
    np.testing.assert_array_equal(fresh.frames, first.frames)


def _bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("change, expect", [
    ("remove", "had 9 wav files when it was written and has 8 now"),
    ("add", "had 9 wav files when it was written and has 10 now"),
    ("touch", "added, removed, renamed or rewritten"),
    ("rewrite", "added, removed, renamed or rewritten"),
    ("rename", "added, removed, renamed or rewritten"),
])
def test_load_utterances_rescans_a_changed_tree_with_a_message(tree, capsys, monkeypatch, change, expect):
    data_path = tree.parent
    load_utterances(data_path, "wav", progress=False)
    capsys.readouterr()
    target = tree / "id10001/vidA/00001.wav"
    if change == "remove":
        target.unlink()
    elif change == "add":
        _write(tree / "id10004/vidA/00001.wav", 2000)
    elif change == "touch":
        _bump_mtime(target)
    elif change == "rewrite":  # same name, new length, same mtime: the size still tells
        st = target.stat()
        _write(target, 4000)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        target.rename(target.with_name("00009.wav"))
    listings = []
    real_listing = data._wav_files
    monkeypatch.setattr(data, "_wav_files",
                        lambda root, workers=8: listings.append(root) or real_listing(root, workers))
    utts = load_utterances(data_path, "wav", progress=False)
    assert listings == [tree]  # one listing of the tree serves the signature and the rescan
    err = capsys.readouterr().err
    assert "wav.tsv is stale" in err and expect in err and "rescanning" in err
    assert utts.keys == scan_utterances(tree, progress=False).keys
    assert load_utterances(data_path, "wav", progress=False).keys == utts.keys  # the new list is reused
    assert capsys.readouterr().err == ""


def test_load_utterances_rescans_a_list_without_signature(tree, capsys):
    data_path = tree.parent
    load_utterances(data_path, "wav", progress=False)
    list_file = data_path / "lists" / "wav.tsv"
    list_file.write_text("\n".join(list_file.read_text().splitlines()[1:]) + "\n")  # as before the signature
    utts = load_utterances(data_path, "wav", progress=False)
    assert "no tree signature" in capsys.readouterr().err
    assert utts.keys == sorted(GOOD)
    assert list_file.read_text().startswith(data.SIGNATURE_TAG)


def test_a_list_file_is_made_for_one_sample_rate(tmp_path, capsys):
    """An 8 kHz tree listed for an 8 kHz model; asking for 16 kHz rescans (every file is then at the
    wrong rate), and a list written before lists named their rate counts as 16 kHz."""
    root = tmp_path / "db" / "wav"
    for i, key in enumerate(GOOD):
        _write(root / key, GOOD[key] // 2, sr=8000, seed=i)
    utts = load_utterances(root.parent, "wav", sample_rate=8000, progress=False)
    assert utts.keys == sorted(GOOD) and not utts.bad
    list_file = root.parent / "lists" / "wav.tsv"
    assert list_file.read_text().splitlines()[1] == data.RATE_TAG + "8000"
    assert load_utterances(root.parent, "wav", sample_rate=8000, progress=False).keys == utts.keys
    assert load_utterances(root.parent, "wav", sample_rate=8000, check_tree=False, progress=False).keys == utts.keys
    assert capsys.readouterr().err == ""
    at16 = load_utterances(root.parent, "wav", progress=False)
    assert "made for 8000 Hz audio, and 16000 Hz is asked for" in capsys.readouterr().err
    assert at16.keys == [] and [why for _, why in at16.bad] == ["sample rate 8000 Hz, expected 16000"] * len(GOOD)
    lines = list_file.read_text().splitlines()
    list_file.write_text("\n".join([lines[0], *lines[2:]]) + "\n")  # as before lists named their rate
    assert load_utterances(root.parent, "wav", progress=False).bad == at16.bad
    assert capsys.readouterr().err == ""  # read as 16 kHz, reused
    assert load_utterances(root.parent, "wav", sample_rate=8000, check_tree=False, progress=False).keys == utts.keys
    assert "made for 16000 Hz" in capsys.readouterr().err


def test_tree_signature_counts_wav_entries_at_utterance_depth(tree):
    count, digest = data.tree_signature(tree).split()[::2]
    assert int(count) == 9 and len(digest) == 40    # 5 good + 4 bad; notes.txt and loose.wav are not in
    (tree / "id10001/notes2.txt").write_text("x")
    _write(tree / "id10001/loose2.wav", 100)
    assert data.tree_signature(tree).split()[::2] == [count, digest]


def test_list_file_name_for_nested_subdir(tree):
    data_path = tree.parent
    (data_path / "VoxCeleb2").mkdir()
    tree.rename(data_path / "VoxCeleb2" / "wav")
    load_utterances(data_path, "VoxCeleb2/wav", progress=False)
    assert (data_path / "lists" / "VoxCeleb2_wav.tsv").is_file()


def test_list_dir_is_inside_a_writable_data_path(tmp_path):
    assert list_dir(tmp_path) == tmp_path / "lists"


def _read_only(monkeypatch, *paths: Path) -> None:
    """Simulate read-only folders: tests run as root, where chmod does not stop writes."""
    real = os.access
    blocked = {p.resolve() for p in paths}

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve() in blocked:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(data.os, "access", access)


def test_list_dir_falls_back_under_outputs_when_read_only(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "REPO_DIR", tmp_path / "repo")
    db = tmp_path / "db"
    db.mkdir()
    _read_only(monkeypatch, db)
    tag = hashlib.sha1(str(db.resolve()).encode()).hexdigest()[:10]
    assert list_dir(db) == tmp_path / "repo" / "outputs" / "lists" / tag
    other = tmp_path / "db2"
    other.mkdir()
    _read_only(monkeypatch, db, other)
    assert list_dir(other) != list_dir(db)          # one folder per data path


def test_list_dir_falls_back_when_lists_folder_is_read_only(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "REPO_DIR", tmp_path / "repo")
    db = tmp_path / "db"
    (db / "lists").mkdir(parents=True)
    _read_only(monkeypatch, db / "lists")
    assert list_dir(db).parent == tmp_path / "repo" / "outputs" / "lists"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_list_dir_with_real_permissions(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "REPO_DIR", tmp_path / "repo")
    db = tmp_path / "db"
    db.mkdir()
    db.chmod(0o555)
    try:
        assert list_dir(db).parent == tmp_path / "repo" / "outputs" / "lists"
    finally:
        db.chmod(0o755)


def test_load_utterances_on_read_only_data(tree, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "REPO_DIR", tmp_path / "repo")
    data_path = tree.parent
    _read_only(monkeypatch, data_path)
    first = load_utterances(data_path, "wav", progress=False)
    assert not (data_path / "lists").exists()
    (cached,) = (tmp_path / "repo" / "outputs" / "lists").glob("*/wav.tsv")
    assert cached.read_text().splitlines()[2] == f"{sorted(GOOD)[0]}\t{GOOD[sorted(GOOD)[0]]}"
    again = load_utterances(data_path, "wav", progress=False)
    assert again.keys == first.keys and again.bad == first.bad


# --- CropDataset ----------------------------------------------------------------------------

@pytest.fixture
def utts(tree) -> UtteranceList:
    return scan_utterances(tree, workers=2, progress=False)


def test_crop_dataset_items(utts):
    ds = CropDataset(utts, n_samples=1000, seed=0)
    assert len(ds) == 5
    for i in range(len(ds)):
        x, label = ds[i]
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (1000,)
        assert x.abs().max().item() == pytest.approx(1.0)
        assert label == utts.labels()[i] and isinstance(label, int)
    assert [ds[i][1] for i in range(5)] == [0, 0, 1, 1, 2]


def test_crop_dataset_is_deterministic_per_seed_epoch_index(utts):
    a = CropDataset(utts, n_samples=400, seed=5)
    b = CropDataset(utts, n_samples=400, seed=5)
    for i in (4, 0, 3):                   # order of access does not matter
        torch.testing.assert_close(a[i][0], b[i][0], rtol=0, atol=0)
    torch.testing.assert_close(a[1][0], a[1][0], rtol=0, atol=0)
    # The crop equals random_crop with the documented generator.
    from rawnet_lib.dataset.audio import random_crop
    want = random_crop(utts.root / utts.keys[3], 400, np.random.default_rng([5, 0, 3]))
    np.testing.assert_array_equal(a[3][0].numpy(), want)


def test_crop_dataset_differs_across_epochs_and_seeds(utts):
    ds = CropDataset(utts, n_samples=400, seed=5)
    long = [i for i, n in enumerate(utts.frames) if n > 5000]
    epoch0 = [ds[i][0] for i in long]
    ds.set_epoch(1)
    epoch1 = [ds[i][0] for i in long]
    assert all(not torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    ds.set_epoch(0)
    assert all(torch.equal(a, ds[i][0]) for a, i in zip(epoch0, long))     # back to epoch 0
    other = CropDataset(utts, n_samples=400, seed=6)
    assert all(not torch.equal(a, other[i][0]) for a, i in zip(epoch0, long))


def test_crop_dataset_tiles_short_utterances(utts):
    ds = CropDataset(utts, n_samples=2000, seed=0)
    i = utts.keys.index("id10002/vidA/00001.wav")       # 500 frames
    x, _ = ds[i]
    np.testing.assert_array_equal(x[:500].numpy(), x[500:1000].numpy())
    np.testing.assert_array_equal(x[:500].numpy(), x[1500:].numpy())


def _break(utts: UtteranceList, key: str) -> None:
    """A file whose header passed the scan but that is unreadable now."""
    (utts.root / key).write_text("corrupted after the scan\n")


def test_crop_dataset_bad_file_raises_without_skip(utts):
    _break(utts, utts.keys[1])
    ds = CropDataset(utts, n_samples=400, seed=0)
    with pytest.raises(AudioError, match=utts.keys[1]):
        ds[1]
    assert ds[0][0].shape == (400,)                  # the others still work


def test_crop_dataset_skip_bad_uses_the_neighbour(utts):
    _break(utts, utts.keys[1])
    _break(utts, utts.keys[2])
    ds = CropDataset(utts, n_samples=400, seed=0, skip_bad=True)
    x, label = ds[1]
    x3, label3 = ds[3]
    torch.testing.assert_close(x, x3, rtol=0, atol=0)
    assert label == label3 == utts.labels()[3]
    _break(utts, utts.keys[4])
    torch.testing.assert_close(ds[4][0], ds[0][0], rtol=0, atol=0)      # wraps around


def test_crop_dataset_skip_bad_with_no_readable_file_raises(utts):
    for key in utts.keys:
        _break(utts, key)
    ds = CropDataset(utts, n_samples=400, seed=0, skip_bad=True)
    with pytest.raises(AudioError):
        ds[2]


def test_crop_dataset_index_out_of_range(utts):
    ds = CropDataset(utts, n_samples=400, seed=0, skip_bad=True)
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert len(list(iter(ds))) == len(ds)          # plain iteration stops at the end


def test_crop_dataset_skip_bad_long_run_of_bad_files(tmp_path):
    """More consecutive bad files than Python's recursion limit still reach a good one."""
    import sys
    root = tmp_path / "wav"
    _write(root / "spk1/v/good.wav", 800)
    n_bad = sys.getrecursionlimit() + 10
    keys = [f"spk0/v/{i:05d}.wav" for i in range(n_bad)] + ["spk1/v/good.wav"]
    utts = UtteranceList(root, keys, np.full(len(keys), 800, dtype=np.int64))
    ds = CropDataset(utts, n_samples=400, seed=0, skip_bad=True)
    x, label = ds[0]                               # every spk0 file is missing
    assert x.shape == (400,) and label == 1


def test_a_rank_after_rank_0_trusts_the_list_without_statting_the_tree(tiny_db: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    db = tmp_path / "DB"
    shutil.copytree(tiny_db, db, ignore=shutil.ignore_patterns("lists", "m4a"))
    first = load_utterances(db, "VoxCeleb2/wav", progress=False)

    def no_listing(root, workers=8):
        raise AssertionError("the tree was statted again")
    monkeypatch.setattr(data, "_wav_files", no_listing)
    again = load_utterances(db, "VoxCeleb2/wav", progress=False, check_tree=False)
    assert again.keys == first.keys and list(again.frames) == list(first.frames)
