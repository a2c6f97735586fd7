"""Convert a VoxCeleb2 ``spk/video/utt.m4a`` tree into 16 kHz mono PCM16 wav.

soundfile cannot read AAC, so every training file goes through ffmpeg once. One ffmpeg
process per file is start-up bound (about 0.09 s a file here), so files are decoded in
batches of up to ``BATCH`` inputs per ffmpeg call (about 10x faster) on a thread pool; a
failing batch is retried file by file so that one bad file only fails itself.

    python -m rawnet_lib.convert DB/VoxCeleb2/m4a DB/VoxCeleb2/wav --workers 2
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
from tqdm.auto import tqdm

from rawnet_lib.errors import run_cli

__all__ = ["ConvertReport", "convert_tree", "encode_m4a", "find_ffmpeg", "is_valid_wav"]

SAMPLE_RATE = 16000
BATCH = 32  # inputs per ffmpeg call; amortises its start-up
_OUT_ARGS = ["-ac", "1", "-ar", str(SAMPLE_RATE), "-c:a", "pcm_s16le", "-f", "wav"]


@dataclass
class ConvertReport:
    """What one :func:`convert_tree` call did; failures are listed, not raised."""

    converted: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line, plus the first few failures, for a notebook or a log."""
        line = (f"converted {self.converted}, skipped {self.skipped} (already valid), "
                f"failed {len(self.failed)} in {self.seconds:.1f} s")
        shown = [f"\n  {path}: {reason}" for path, reason in self.failed[:5]]
        more = len(self.failed) - len(shown)
        return line + "".join(shown) + (f"\n  ... and {more} more" if more > 0 else "")


def find_ffmpeg() -> str:
    """Path of ffmpeg, or a ValueError saying how to install it."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise ValueError("ffmpeg not found on PATH; install it: apt-get install ffmpeg "
                         "(or ./setup.sh install)")
    return exe


def is_valid_wav(path: Path) -> bool:
    """True when ``path`` is a readable 16 kHz mono wav with audio: a finished target."""
    try:
        info = sf.info(str(path))
    except (RuntimeError, OSError):  # soundfile raises LibsndfileError (a RuntimeError)
        return False
    return info.samplerate == SAMPLE_RATE and info.channels == 1 and info.frames > 0


def _tmp_path(target: Path) -> Path:
    # Same folder (so os.replace is atomic) and a name no "*.wav" glob picks up.
    return target.with_name(f".{target.name}.part")


def encode_m4a(pairs: list[tuple[Path, Path]]) -> None:
    """Encode ``(wav, m4a)`` pairs to AAC in one ffmpeg call, as VoxCeleb2 ships its audio.

    Bit-exact flags and no metadata keep reruns byte-identical; targets appear atomically.
    """
    cmd = [find_ffmpeg(), "-nostdin", "-loglevel", "error", "-y", "-fflags", "+bitexact"]
    for src, _ in pairs:
        cmd += ["-i", str(src)]
    for i, (_, target) in enumerate(pairs):
        cmd += ["-map", f"{i}:a:0", "-c:a", "aac", "-aac_coder", "fast", "-b:a", "48k",
                "-flags:a", "+bitexact", "-map_metadata", "-1", "-f", "ipod", str(_tmp_path(target))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        for _, target in pairs:
            _tmp_path(target).unlink(missing_ok=True)
        raise ValueError(f"ffmpeg could not encode m4a: {proc.stderr.strip()[-300:]}")
    for _, target in pairs:
        os.replace(_tmp_path(target), target)


def _run_ffmpeg(exe: str, pairs: list[tuple[Path, Path]]) -> tuple[list[tuple[Path, str]], int]:
    """Decode ``(m4a, target)`` pairs in one ffmpeg call; returns (failures, done)."""
    cmd = [exe, "-nostdin", "-loglevel", "error", "-y"]
    for src, _ in pairs:
        cmd += ["-i", str(src)]
    for i, (_, target) in enumerate(pairs):
        cmd += ["-map", f"{i}:a:0", *_OUT_ARGS, str(_tmp_path(target))]
    for _, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    failures, done = [], 0
    for src, target in pairs:
        tmp = _tmp_path(target)
        if proc.returncode == 0 and is_valid_wav(tmp):
            os.replace(tmp, target)
            done += 1
            continue
        tmp.unlink(missing_ok=True)
        reason = proc.stderr.strip().splitlines()[-1] if proc.returncode else "no audio in output"
        failures.append((src, reason or f"ffmpeg exit code {proc.returncode}"))
    return failures, done


def _convert_batch(exe: str, pairs: list[tuple[Path, Path]]) -> tuple[list[tuple[Path, str]], int]:
    failures, done = _run_ffmpeg(exe, pairs)
    if failures and len(pairs) > 1:  # one bad input fails the whole call: retry singly
        retry = {src for src, _ in failures}
        failures = []
        for pair in pairs:
            if pair[0] in retry:
                bad, ok = _run_ffmpeg(exe, [pair])
                failures += bad
                done += ok
    return failures, done


def convert_tree(src: Path, dst: Path, workers: int = 2, progress: bool = True) -> ConvertReport:
    """Decode every ``src/spk/video/utt.m4a`` to ``dst/spk/video/utt.wav`` (16 kHz mono PCM16).

    Resumable: valid targets are skipped and each wav appears only via ``os.replace`` of a
    finished temporary file, so an interrupted run leaves no half-written wav.
    """
    src, dst = Path(src), Path(dst)
    exe = find_ffmpeg()
    if not src.is_dir():
        raise ValueError(f"src={str(src)!r} is not a folder; pass the VoxCeleb2 m4a root "
                         "(the folder holding the id0xxxx speaker folders)")
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")
    start = time.perf_counter()
    report = ConvertReport()
    todo = []
    for m4a in sorted(src.glob("*/*/*.m4a")):
        target = dst / m4a.relative_to(src).with_suffix(".wav")
        if is_valid_wav(target):
            report.skipped += 1
        else:
            todo.append((m4a, target))
    batches = [todo[i:i + BATCH] for i in range(0, len(todo), BATCH)]
    with tqdm(total=len(todo), desc="m4a -> wav", unit="file", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        for failures, done in pool.map(lambda b: _convert_batch(exe, b), batches):
            report.converted += done
            report.failed += [(str(path), reason) for path, reason in failures]
            bar.update(done + len(failures))
    report.seconds = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="VoxCeleb2 m4a root (spk/video/utt.m4a)")
    parser.add_argument("dst", type=Path, help="wav root to write (spk/video/utt.wav)")
    parser.add_argument("--workers", type=int, default=2, help="parallel ffmpeg processes")
    args = parser.parse_args(argv)
    report = convert_tree(args.src, args.dst, workers=args.workers)
    print(report.summary())
    return 1 if report.failed else 0


if __name__ == "__main__":
    run_cli(main)
