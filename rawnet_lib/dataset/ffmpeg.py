"""ffmpeg, the one tool that reads and writes AAC here: finding it, one call over many files
(outputs appear atomically, all or none), and the m4a encoding VoxCeleb2 ships.

One ffmpeg process per file is start-up bound (about 0.09 s a file), so callers pass many
files to one call."""
from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

from rawnet_lib.dataset.audio import SAMPLE_RATE, probe
from rawnet_lib.errors import WorkbookError
from rawnet_lib.io import atomic_path

__all__ = ["ConvertError", "wav_args", "find_ffmpeg", "run_ffmpeg", "encode_m4a"]


def wav_args(sample_rate: int = SAMPLE_RATE) -> list[str]:
    """ffmpeg's output flags for a mono PCM16 wav at `sample_rate` (16 kHz: VoxCeleb's)."""
    return ["-ac", "1", "-ar", str(sample_rate), "-c:a", "pcm_s16le", "-f", "wav"]


class ConvertError(WorkbookError, ValueError):
    """ffmpeg missing or failing, or a bad argument; the message says what to do."""


def find_ffmpeg() -> str:
    """Path of ffmpeg, or a ConvertError saying how to install it."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise ConvertError("ffmpeg not found on PATH; install it: apt-get install ffmpeg "
                           "(or ./setup.sh install)")
    return exe


def run_ffmpeg(pairs: list[tuple[Path, Path]], out_args: list[str], check: bool = False,
               sample_rate: int = SAMPLE_RATE) -> None:
    """One ffmpeg call writing input i of `pairs` to its target with `out_args`; every target appears
    (atomically) when the call succeeds and, with `check`, every output is a usable `sample_rate` wav;
    none otherwise."""
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(target)) for _, target in pairs]
        cmd = [find_ffmpeg(), "-nostdin", "-loglevel", "error", "-y"]
        for src, _ in pairs:
            cmd += ["-i", str(src)]
        for i, tmp in enumerate(tmps):
            cmd += ["-map", f"{i}:a:0", *out_args, str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            lines = proc.stderr.strip().splitlines()
            raise ConvertError(lines[-1] if lines else f"ffmpeg exit code {proc.returncode}")
        bad = [info.problem for info in (probe(tmp, sample_rate) for tmp in tmps) if not info.ok] if check else []
        if bad:
            raise ConvertError(f"no usable audio in ffmpeg's output ({bad[0]})")


def encode_m4a(pairs: list[tuple[Path, Path]]) -> None:
    """Encode ``(wav, m4a)`` pairs to AAC in one ffmpeg call, as VoxCeleb2 ships its audio.

    Bit-exact flags and no metadata keep reruns byte-identical; targets appear atomically.
    """
    try:
        run_ffmpeg(pairs, ["-fflags", "+bitexact", "-c:a", "aac", "-aac_coder", "fast", "-b:a", "48k",
                        "-flags:a", "+bitexact", "-map_metadata", "-1", "-f", "ipod"])
    except ConvertError as err:
        raise ConvertError(f"ffmpeg could not encode m4a: {str(err)[-300:]}") from None
