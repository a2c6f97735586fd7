"""io.py: atomic writes reach the disk before they take the target's name."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rawnet_lib import io


@pytest.mark.parametrize("writer", ["program", "handle"])
def test_the_finished_temporary_file_is_flushed_to_disk_before_it_replaces_the_target(tmp_path: Path, monkeypatch,
                                                                                      writer: str) -> None:
    events = []  # (what, inode of the file)
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)
    monkeypatch.setattr(io.os, "fsync", fsync)
    monkeypatch.setattr(io.os, "replace", replace)
    target = tmp_path / "out.wav"
    if writer == "program":  # what ffmpeg does: writes the path it is given
        with io.atomic_path(target) as tmp:
            tmp.write_bytes(b"data")
    else:
        io.atomic_write_bytes(target, b"data")
    assert target.read_bytes() == b"data"
    (replaced,) = [inode for what, inode in events if what == "replace"]
    assert replaced == target.stat().st_ino
    assert ("fsync", replaced) in events[:events.index(("replace", replaced))]


def test_an_output_that_is_a_folder_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    """A file cannot replace a folder: refused before the work, not a traceback after it."""
    folder = tmp_path / "results"
    (folder / "kept.txt").parent.mkdir()
    (folder / "kept.txt").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(io.OutputExistsError, match=r"results is a folder; give the output a file name"):
            io.check_output(folder, overwrite)
    assert (folder / "kept.txt").read_text() == "x"
    assert io.check_output(tmp_path / "new.npz", False) == tmp_path / "new.npz"
