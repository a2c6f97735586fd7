"""Convert a VoxCeleb2 ``spk/video/utt.m4a`` tree into 16 kHz (or the model's rate) mono PCM16 wav.

soundfile cannot read AAC, so every training file goes through ffmpeg
(:mod:`rawnet_lib.dataset.ffmpeg`) once. One ffmpeg process per file is start-up bound, so files are decoded in
batches of up to ``BATCH`` inputs per ffmpeg call (about 10x faster) on a thread pool; a
failing batch is retried file by file so that one bad file only fails itself. ffmpeg writes
each output to a temporary sibling (:func:`rawnet_lib.io.atomic_path`) that takes the wav's
name only when the whole call succeeded and :func:`rawnet_lib.dataset.audio.probe` finds it usable.

    python -m rawnet_lib.convert DB/VoxCeleb2/m4a DB/VoxCeleb2/wav --workers 2   # --sample_rate 8000
"""
from __future__ import annotations

import argparse
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from rawnet_lib.dataset.audio import AUDIO_PROBLEMS, SAMPLE_RATE, shown_name, utf8_name
from rawnet_lib.dataset.ffmpeg import ConvertError, find_ffmpeg, run_ffmpeg, wav_args
from rawnet_lib.errors import run_cli

__all__ = ["ConvertReport", "convert_tree"]

BATCH = 32  # inputs per ffmpeg call; amortises its start-up


@dataclass
class ConvertReport:
    """What one :func:`convert_tree` call did; failures are listed, not raised."""

    converted: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line, plus the first few failures, for a notebook or a log."""
        line = (f"converted {self.converted}, skipped {self.skipped} (wav already there), "
                f"failed {len(self.failed)} in {self.seconds:.1f} s")
        shown = [f"\n  {path}: {reason}" for path, reason in self.failed[:5]]
        more = len(self.failed) - len(shown)
        return line + "".join(shown) + (f"\n  ... and {more} more" if more > 0 else "")


def _convert_batch(pairs: list[tuple[Path, Path]], sample_rate: int) -> tuple[list[tuple[Path, str]], int]:
    """Decode ``(m4a, target)`` pairs in one ffmpeg call, or one by one when it fails (one bad
    input fails the whole call); returns (failures, done)."""
    try:
        run_ffmpeg(pairs, wav_args(sample_rate), check=True, sample_rate=sample_rate)
        return [], len(pairs)
    except ConvertError as err:
        if len(pairs) == 1:  # ffmpeg names the input; the report names it already
            return [(pairs[0][0], str(err).removeprefix(f"{pairs[0][0]}: "))], 0
    failures, done = [], 0
    for pair in pairs:
        bad, ok = _convert_batch([pair], sample_rate)
        failures += bad
        done += ok
    return failures, done


def convert_tree(src: Path, dst: Path, workers: int = 2, progress: bool = True,
                 sample_rate: int = SAMPLE_RATE) -> ConvertReport:
    """Decode every ``src/spk/video/utt.m4a`` to ``dst/spk/video/utt.wav`` (`sample_rate` mono PCM16).

    Resumable: a wav appears only via ``os.replace`` of a finished temporary file that
    :func:`rawnet_lib.dataset.audio.probe` found usable (and fsync'd), so an interrupted run leaves
    no half-written wav and one that exists is skipped without reading its header (a million
    reads on VoxCeleb2). A bad wav put there by other means is the dataset check's to report.
    """
    src, dst = Path(src), Path(dst)
    find_ffmpeg()
    if not src.is_dir():
        raise ConvertError(f"src={str(src)!r} is not a folder; pass the VoxCeleb2 m4a root "
                           "(the folder holding the id0xxxx speaker folders)")
    if workers < 1:
        raise ConvertError(f"workers={workers} must be at least 1")
    start = time.perf_counter()
    report = ConvertReport()
    todo = []
    for m4a in sorted(src.glob("*/*/*.m4a")):
        target = dst / m4a.relative_to(src).with_suffix(".wav")
        if not utf8_name(m4a):  # its wav could not be read by name: the rest converts, this one is reported
            fix = AUDIO_PROBLEMS["bad_name"][1].replace("<folder>", shown_name(m4a.parent))
            report.failed.append((shown_name(m4a), f"file name not UTF-8; {fix}"))
        elif target.exists():
            report.skipped += 1
        else:
            todo.append((m4a, target))
    batches = [todo[i:i + BATCH] for i in range(0, len(todo), BATCH)]
    with tqdm(total=len(todo), desc="m4a -> wav", unit="file", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        for failures, done in pool.map(functools.partial(_convert_batch, sample_rate=sample_rate), batches):
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
    parser.add_argument("--sample_rate", type=int, default=SAMPLE_RATE, help="Hz of the wav files (the model's)")
    args = parser.parse_args(argv)
    report = convert_tree(args.src, args.dst, workers=args.workers, sample_rate=args.sample_rate)
    print(report.summary())
    return 1 if report.failed else 0


if __name__ == "__main__":
    run_cli(main)
