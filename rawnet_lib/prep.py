"""Data preparation in one call: m4a conversion, list files, the dataset check, and a summary.

    python -m rawnet_lib.prep --data_path /data/DB      # or no path: the demo corpus
    python -m rawnet_lib.prep --config smoke --trial_lists O E   # the preset's data block, two lists
    python -m rawnet_lib.prep --data_path /data/DB8k --sample_rate 8000   # audio at the model's rate
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rawnet_lib.config import DataConfig, cli_config, cli_parser
from rawnet_lib.convert import ConvertReport, convert_tree
from rawnet_lib.dataset.audio import SAMPLE_RATE
from rawnet_lib.dataset.check import CheckReport, check_dataset, data_dirs
from rawnet_lib.dataset.utterances import UtteranceList, load_utterances, resolve_data_path
from rawnet_lib.errors import run_cli

__all__ = ["M4A_DIRS", "PrepResult", "find_m4a_dir", "prepare", "utterance_table", "sample_utterances"]

# Where VoxCeleb2's AAC files are found: the demo corpus, and the official archive's layouts.
M4A_DIRS = ("VoxCeleb2/m4a", "VoxCeleb2/aac", "VoxCeleb2/dev/aac")


@dataclass
class PrepResult:
    data_path: Path
    conversion: ConvertReport | None
    lists: dict[str, UtteranceList]
    check: CheckReport | None

    @property
    def ok(self) -> bool:
        """False when a conversion failed (reported by the check too, when it ran) or the check found errors."""
        return not (self.conversion and self.conversion.failed) and (self.check is None or self.check.ok)


def find_m4a_dir(data_path: Path) -> Path | None:
    return next((data_path / d for d in M4A_DIRS if (data_path / d).is_dir()), None)


def prepare(cfg: DataConfig, convert: bool = True, check: bool = True, trial_lists: list[str] | None = None,
            workers: int = 2, progress: bool = True, sample_rate: int = SAMPLE_RATE) -> PrepResult:
    """Convert VoxCeleb2 m4a (resumable), write the list files, and check the whole data set
    (files shorter than `cfg.min_seconds` are a warning of the check), all for audio at
    `sample_rate` (the model's)."""
    data_path = resolve_data_path(cfg)
    conversion = None
    m4a = find_m4a_dir(data_path)
    if convert and m4a is not None:
        conversion = convert_tree(m4a, data_path / cfg.train_dir, workers=workers, progress=progress,
                                  sample_rate=sample_rate)
        print(conversion.summary())
    dirs = data_dirs(cfg)
    # A list file is reused while its tree keeps its signature (names, sizes, modification times):
    # a conversion that wrote a wav changes it, so the tree is rescanned then and only then.
    lists = {d: load_utterances(data_path, d, sample_rate=sample_rate, progress=progress)
             for d in dirs if (data_path / d).is_dir()}
    failed = conversion.failed if conversion else []
    report = check_dataset(data_path, dirs=dirs, trial_lists=trial_lists or ["O"], min_seconds=cfg.min_seconds,
                           sample_rate=sample_rate, workers=workers, progress=progress,
                           failed_conversions=failed, train_dir=cfg.train_dir, lists=lists) if check else None
    return PrepResult(data_path, conversion, lists, report)


def utterance_table(lists: dict[str, UtteranceList], sample_rate: int = SAMPLE_RATE) -> pd.DataFrame:
    """Speakers, utterances and hours per folder."""
    rows = [{"folder": d, "speakers": len(u.speakers()), "utterances": len(u),
             "hours": round(u.seconds(sample_rate) / 3600, 2),
             "mean seconds": round(u.seconds(sample_rate) / max(len(u), 1), 2), "unusable files": len(u.bad)}
            for d, u in lists.items()]
    return pd.DataFrame(rows)


def sample_utterances(lists: dict[str, UtteranceList], n: int, seed: int = 0) -> list[Path]:
    """n utterances drawn from all folders (different speakers where possible), to listen to."""
    pool = [(u.root, k) for u in lists.values() for k in u.keys]
    if not pool or n <= 0:
        return []
    rng = np.random.default_rng(seed)
    picked: dict[str, Path] = {}
    for i in rng.permutation(len(pool)):
        root, key = pool[i]
        picked.setdefault(key.split("/", 1)[0], root / key)
        if len(picked) == n:
            break
    return list(picked.values())


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser("python -m rawnet_lib.prep", __doc__,
                        fields=[f.name for f in dataclasses.fields(DataConfig)] + ["trial_lists", "sample_rate"])
    parser.add_argument("--workers", type=int, default=2, help="parallel conversion / check workers")
    args = parser.parse_args(argv)
    cfg = cli_config(args)
    result = prepare(cfg.data, trial_lists=cfg.evaluation.trial_lists, workers=args.workers,
                     sample_rate=cfg.model.sample_rate)
    print(utterance_table(result.lists, cfg.model.sample_rate).to_string(index=False))
    print(result.check)
    return 0 if result.ok else 1


if __name__ == "__main__":
    run_cli(main)
