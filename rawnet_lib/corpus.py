"""The built-in demo corpus: synthetic speakers laid out exactly like VoxCeleb1/2.

VoxCeleb cannot be downloaded here, so every notebook falls back to this corpus. A speaker
is a real MBROLA diphone voice (or an espeak-ng variant) at one speed factor; each video has
its own channel (band-pass, reverb, noise at 5-20 dB SNR, gain) so that training matters;
all identities of one base voice stay in one split, so test speakers are truly unseen.
Training speakers ship as AAC ``.m4a`` like VoxCeleb2 and go through :mod:`rawnet_lib.convert`.
The same seed gives byte-identical files on the same machine, whatever ``workers`` is. This
module plans the corpus (speakers, splits, videos, trial lists); :mod:`rawnet_lib.dataset.synth`
speaks it.

    python -m rawnet_lib.corpus --size demo     # about a minute on 2 cores, then m4a -> wav
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from rawnet_lib.config import REPO_DIR
from rawnet_lib.convert import convert_tree
from rawnet_lib.dataset.ffmpeg import find_ffmpeg
from rawnet_lib.dataset.synth import INSTALL, CorpusError, Voice, find_voices, render_speaker
from rawnet_lib.errors import run_cli
from rawnet_lib.io import atomic_write_text

__all__ = ["CorpusError", "CorpusSize", "SIZES", "Voice", "base_voices", "find_voices", "generate_corpus",
           "ensure_demo_corpus"]


VERSION = 3  # 2: the test voices also at their extra speeds; 3: the voices that do not read Latin text,
# on syllables they speak, test too (more independent Vox1-O voices). Each version adds test speakers.
SPLITS = {"vox2_train": "VoxCeleb2/m4a", "vox1_dev": "VoxCeleb1/dev_wav",
          "vox1_eval": "VoxCeleb1/eval_wav"}  # split -> folder under DB
_VIDEO_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@dataclass(frozen=True)
class CorpusSize:
    """How big a corpus is; voice counts shrink in proportion when fewer are installed."""

    voices: tuple[int, int, int]  # base voices for vox2_train, vox1_dev, vox1_eval
    factors: tuple[tuple[float, ...], ...]  # speed factors per split: one speaker each
    videos: tuple[int, int]  # videos per speaker, inclusive range
    utts: tuple[int, int]  # utterances per video, inclusive range
    seconds: tuple[float, float]  # utterance length range
    short_fraction: float  # share of 1.5-3.6 s utterances, shorter than a training crop
    targets: tuple[int, int, int]  # target trials at most in the O, E and H lists
    eval_extra: tuple[float, ...] = ()  # further speeds of the test voices, one speaker each (version 2)
    eval_native: int = 0  # voices that speak only their own syllables: at most this many test voices (version 3)


SIZES = {
    "demo": CorpusSize(voices=(33, 7, 20), factors=((0.9, 1.0, 1.1), (0.9, 1.0, 1.1), (1.0,)),
                       videos=(3, 4), utts=(3, 4), seconds=(3.7, 7.0), short_fraction=0.15,
                       targets=(5000, 5000, 5000), eval_extra=(0.9, 1.1), eval_native=20),
    "tiny": CorpusSize(voices=(3, 2, 4), factors=((0.9, 1.1), (0.9, 1.1), (1.0,)),
                       videos=(2, 2), utts=(2, 3), seconds=(1.5, 4.0), short_fraction=0.0,
                       targets=(20, 40, 40), eval_extra=(1.1,), eval_native=1),
}


# --- layout and trial lists ------------------------------------------------------------------

def _assign(voices: tuple[Voice, ...], size: CorpusSize, rng: np.random.Generator) -> dict:
    """Base voices per split; the test splits alternate genders while both remain.

    Voices that read our Latin pseudo-words fill the splits as in version 1; those that speak
    only syllables of their own (the Arabic, Hebrew, Hindi, Telugu and Japanese MBROLA voices in
    their scripts, Maori's in Latin) are further test voices (key ``vox1_eval_native``):
    independent test voices limited the comparison of recipes, and the training and validation
    data stay those of version 1."""
    native = [v for v in voices if v.syllables]
    voices = tuple(v for v in voices if not v.syllables)
    scale = min(1.0, len(voices) / sum(size.voices))
    counts = [max(low, int(n * scale)) for n, low in zip(size.voices, (2, 1, 2))]
    if sum(counts) > len(voices):
        raise CorpusError(f"only {len(voices)} usable voices, need {sum(counts)}; install the "
                         f"MBROLA voices ({INSTALL}) or use voices='espeak'")
    order = [voices[i] for i in rng.permutation(len(voices))]
    pools = {g: [v for v in order if v.gender == g] for g in "fm"}
    splits = {}
    for split, n in (("vox1_eval", counts[2]), ("vox1_dev", counts[1])):
        splits[split] = []
        while len(splits[split]) < n:
            turn = "fm"[len(splits[split]) % 2]
            splits[split].append(pools[turn if pools[turn] else "fm".replace(turn, "")].pop(0))
    splits["vox2_train"] = [v for v in order if v in pools["f"] + pools["m"]][:counts[0]]
    picked = rng.permutation(len(native))  # drawn last: the draws above are version 1's
    splits["vox1_eval_native"] = [native[i] for i in picked[:size.eval_native]]
    return splits


def _video_id(rng: np.random.Generator) -> str:
    """An 11-character YouTube-like id, never starting with "-" (it trips command lines)."""
    return _VIDEO_CHARS[rng.integers(62)] + "".join(
        _VIDEO_CHARS[i] for i in rng.integers(len(_VIDEO_CHARS), size=10))


def _plan(splits: dict, size: CorpusSize, seed: int) -> list[dict]:
    """Every speaker: id, split, voice, speed factor and videos [(video id, utterances)].

    The test voices' extra speeds (version 2) and the native-script test voices (version 3)
    draw their ids from streams of their own, after the rest, so every speaker of an older
    version keeps its id, videos and bytes: an older corpus upgrades by adding speakers, and
    models trained on it saw exactly the same training data."""
    rng = np.random.default_rng([seed, 1])
    who = {s: [(v, f) for v in splits[s] for f in size.factors[i]] for i, s in enumerate(SPLITS)}
    n_dev, n_vox1 = len(who["vox1_dev"]), len(who["vox1_dev"]) + len(who["vox1_eval"])
    vox1 = [f"id{n}" for n in rng.choice(np.arange(10001, 11252), n_vox1, replace=False)]
    ids = {"vox2_train": [f"id{n:05d}" for n in rng.choice(np.arange(1, 10000),
                                                           len(who["vox2_train"]), replace=False)],
           "vox1_dev": vox1[:n_dev], "vox1_eval": vox1[n_dev:]}
    native_factors = (*size.factors[2], *size.eval_extra)
    for stream, extra in ((6, [(v, f) for v in splits["vox1_eval"] for f in size.eval_extra]),
                          (7, [(v, f) for v in splits["vox1_eval_native"] for f in native_factors])):
        free = np.setdiff1d(np.arange(10001, 11252), [int(i[2:]) for i in vox1 + ids["vox1_eval"]])
        drawn = np.random.default_rng([seed, stream]).choice(free, len(extra), replace=False)
        ids["vox1_eval"] += [f"id{n}" for n in drawn]
        who["vox1_eval"] += extra
    speakers = []
    for split in SPLITS:
        for spk, (voice, factor) in zip(ids[split], who[split]):
            r = np.random.default_rng([seed, 1, int(spk[2:])])
            videos = [(_video_id(r), int(r.integers(*size.utts, endpoint=True)))
                      for _ in range(int(r.integers(*size.videos, endpoint=True)))]
            speakers.append({"id": spk, "split": split, "voice": voice, "factor": factor,
                             "videos": videos})
    return sorted(speakers, key=lambda s: s["id"])


def _trials(speakers: list[dict], n_targets: int, hard: bool, rng: np.random.Generator) -> list[str]:
    """Balanced trials: each target (a, b) is paired with a non-target (a, c).

    Targets take different videos of one speaker where it has several; hard non-targets
    take a speaker of the same gender and family where one exists (Vox1-H keeps gender and
    nationality), else the same gender, else anyone.
    """
    files = {s["id"]: [f"{s['id']}/{vid}/{u + 1:05d}.wav" for vid, n in s["videos"]
                       for u in range(n)] for s in speakers}
    pairs = []
    for utts in files.values():
        all_pairs = [(a, b) for i, a in enumerate(utts) for b in utts[i + 1:]]
        pairs += [(a, b) for a, b in all_pairs if a.split("/")[1] != b.split("/")[1]] or all_pairs
    chosen = [pairs[i] for i in sorted(rng.choice(len(pairs), min(n_targets, len(pairs)),
                                                  replace=False))]
    impostors = {}
    for s in speakers:
        rest = [o for o in speakers if o["id"] != s["id"]]
        same_g = [o for o in rest if o["voice"].gender == s["voice"].gender]
        same_gf = [o for o in same_g if o["voice"].family == s["voice"].family]
        impostors[s["id"]] = [o["id"] for o in ((same_gf or same_g or rest) if hard else rest)]
    lines, used = [], set()
    for a, b in chosen:
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        lines.append(f"1 {a} {b}")
        others = impostors[a.split("/")[0]]
        for _ in range(20):  # a non-target pair not used yet, in either order
            other = files[others[rng.integers(len(others))]]
            c = other[rng.integers(len(other))]
            if frozenset((a, c)) not in used:
                used.add(frozenset((a, c)))
                lines.append(f"0 {a} {c}")
                break
    return sorted(lines, key=lambda line: line.split()[1:])


def _write_trials(db: Path, speakers: list[dict], size: CorpusSize, seed: int) -> dict[str, int]:
    """Vox1-O (eval speakers), -E and -H (dev and eval speakers) and their "2" twins.

    A "2" (cleaned) list is its original minus about 0.3 % of the trials, picked by a seeded
    RNG: the real cleaned lists drop mislabelled trials; here they exist for format parity.
    """
    vox1 = [s for s in speakers if s["split"] != "vox2_train"]
    lists = {"veri_test": ([s for s in vox1 if s["split"] == "vox1_eval"], size.targets[0], False),
             "list_test_all": (vox1, size.targets[1], False),
             "list_test_hard": (vox1, size.targets[2], True)}
    counts = {}
    for k, (name, (pool, n_targets, hard)) in enumerate(lists.items()):
        lines = _trials(pool, n_targets, hard, np.random.default_rng([seed, 4, k]))
        drop = np.random.default_rng([seed, 5, k]).choice(len(lines), max(1, len(lines) // 300),
                                                           replace=False)
        cleaned = [line for i, line in enumerate(lines) if i not in set(drop)]
        for fname, body in ((f"{name}.txt", lines), (f"{name}2.txt", cleaned)):
            atomic_write_text(db / "VoxCeleb1" / fname, "\n".join(body) + "\n")
            counts[fname] = len(body)
    return counts


# --- entry points ----------------------------------------------------------------------------

def _existing(db: Path, size: str, seed: int, voices: str) -> tuple[bool, dict]:
    """(done, the finished manifest there): done when ``db`` holds this very corpus at this
    VERSION; an older version's manifest means upgrade (its speakers are kept); raises when
    the folder holds another corpus."""
    for name in ("corpus.json", ".corpus_pending.json"):  # pending: an interrupted run
        if (db / name).is_file():
            old = json.loads((db / name).read_text())
            if old["size"] != size or old["seed"] != seed or voices not in ("auto", old["voice_kind"]):
                raise CorpusError(f"{db} holds a corpus with size={old['size']!r}, seed={old['seed']}, "
                                 f"voices={old['voice_kind']!r}, not size={size!r}, seed={seed}, "
                                 f"voices={voices!r}; pick another root or delete that folder")
            done = name == "corpus.json" and old.get("version", 1) == VERSION
            return done, old if name == "corpus.json" else {}
    if db.is_dir() and any(db.iterdir()):
        raise CorpusError(f"{db} exists but was not made by generate_corpus (no corpus.json); "
                         "pick another root or delete that folder")
    return False, {}


def _manifest(state: dict, speakers: list[dict], seconds: list[float], trials: dict,
              skipped: tuple) -> dict:
    rows = [{"id": s["id"], "split": s["split"], "voice": s["voice"].name, "factor": s["factor"],
             "gender": s["voice"].gender, "family": s["voice"].family, "videos": len(s["videos"]),
             "utterances": sum(n for _, n in s["videos"]), "seconds": round(sec, 2)}
            for s, sec in zip(speakers, seconds)]
    voices = {(r["voice"], state["voice_kind"], r["gender"], r["family"], r["split"],
               f"own syllables, {len(s['voice'].syllables)}" if s["voice"].syllables else "latin")
              for r, s in zip(rows, speakers)}
    counts = {split: {key: sum(r[key] for r in rows if r["split"] == split)
                      for key in ("videos", "utterances")} for split in SPLITS}
    for split in SPLITS:
        counts[split]["speakers"] = sum(r["split"] == split for r in rows)
    return {**state, "voices": [dict(zip(("name", "kind", "gender", "family", "split", "text"), v))
                                for v in sorted(voices)],
            "skipped_voices": [list(s) for s in skipped], "speakers": rows,
            "counts": counts | {"trials": trials},
            "seconds_of_audio": {split: round(sum(r["seconds"] for r in rows if r["split"] == split), 1)
                                 for split in SPLITS}}


def generate_corpus(root: Path, size: str = "demo", seed: int = 0, voices: str = "auto",
                    workers: int = 2, progress: bool = True) -> Path:
    """Write the VoxCeleb-style tree, trial lists and ``DB/corpus.json``; returns ``root/DB``.

    Every utterance has its own RNG seeded from (seed, speaker, video, utterance), so the
    bytes do not depend on ``workers``. A finished corpus of the same size and seed returns
    at once; another size or seed in the same root raises.
    """
    if size not in SIZES:
        raise CorpusError(f"size={size!r}; choose one of {sorted(SIZES)}")
    if workers < 1:
        raise CorpusError(f"workers={workers} must be at least 1")
    db = Path(root) / "DB"
    done, older = _existing(db, size, seed, voices)
    if done:
        return db
    start, preset = time.perf_counter(), SIZES[size]
    usable, skipped = find_voices(voices)
    find_ffmpeg()
    speakers = _plan(_assign(usable, preset, np.random.default_rng([seed, 0])), preset, seed)
    state = {"size": size, "seed": seed, "version": VERSION, "voice_kind": usable[0].kind,
             "voices_requested": voices}
    kept = {row["id"]: row["seconds"] for row in older.get("speakers", [])}  # an older version's speakers
    planned = {s["id"]: s["voice"].name for s in speakers}
    if any(planned.get(row["id"]) != row["voice"] for row in older.get("speakers", [])):
        raise CorpusError(f"{db} holds a version-{older.get('version', 1)} corpus made with other voices than "
                         "this machine has now, so it cannot be upgraded; delete that folder and run again")
    db.mkdir(parents=True, exist_ok=True)
    atomic_write_text(db / ".corpus_pending.json", json.dumps(state))
    if kept:
        print(f"{db}: upgrading a version-{older.get('version', 1)} corpus to version {VERSION} "
              f"(its {len(kept)} speakers are kept; new test speakers and trial lists are added)")
    todo = [s for s in speakers if s["id"] not in kept]
    jobs = [{"seed": seed, "num": int(s["id"][2:]), "voice": s["voice"], "factor": s["factor"],
             "videos": s["videos"], "seconds": preset.seconds, "short_fraction": preset.short_fraction,
             "dir": str(db / SPLITS[s["split"]] / s["id"]), "m4a": s["split"] == "vox2_train"} for s in todo]
    # spawn, not fork: the caller may be a notebook kernel with torch threads running
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        rendered = dict(zip((s["id"] for s in todo), tqdm(pool.map(render_speaker, jobs), total=len(jobs),
                                                          desc="speakers", unit="spk", disable=not progress)))
    seconds_of = kept | rendered
    seconds = [seconds_of[s["id"]] for s in speakers]
    trials = _write_trials(db, speakers, preset, seed)
    manifest = _manifest(state, speakers, seconds, trials, skipped)
    manifest["generation_seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(db / "corpus.json", json.dumps(manifest, indent=1))
    (db / ".corpus_pending.json").unlink()
    c, hours = manifest["counts"], sum(manifest["seconds_of_audio"].values()) / 3600
    print(f"{size} corpus: " + ", ".join(f"{c[s]['speakers']} {s}" for s in SPLITS)
          + f" speakers, {hours:.2f} h of audio, {len(manifest['voices'])} {state['voice_kind']} voices "
          + f"({', '.join(sorted({v['name'] for v in manifest['voices']}))}), "
          + f"{manifest['generation_seconds']} s -> {db}")
    return db


def base_voices(db: Path) -> dict[str, str]:
    """Speaker id -> its base voice on a demo corpus (empty for other data). Speakers made from
    one voice at several speeds are separate identities but not independent test speakers, so
    a bootstrap over test speakers resamples voices."""
    manifest = Path(db) / "corpus.json"
    if not str(db) or not manifest.is_file():
        return {}
    return {row["id"]: row["voice"] for row in json.loads(manifest.read_text())["speakers"]}


def _default_root(size: str) -> Path:
    parent = os.environ.get("RAWNET_DEMO_ROOT")
    return Path(parent or REPO_DIR / "outputs" / "demo_corpus") / size


def ensure_demo_corpus(size: str = "demo", root: Path | None = None, seed: int = 0) -> Path:
    """The corpus every notebook uses when given no data path: generate, convert, return DB.

    Default root ``<repo>/outputs/demo_corpus/<size>``; ``RAWNET_DEMO_ROOT`` replaces the
    ``<repo>/outputs/demo_corpus`` part. Both steps skip work already done.
    """
    db = generate_corpus(Path(root) if root is not None else _default_root(size), size, seed)
    report = convert_tree(db / "VoxCeleb2" / "m4a", db / "VoxCeleb2" / "wav")
    if report.failed:
        raise CorpusError(f"converting the demo corpus failed ({report.summary()}); "
                         f"delete {db} and rerun")
    return db


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="demo", choices=sorted(SIZES), help="corpus preset")
    parser.add_argument("--root", type=Path, default=None,
                        help="output root; DB/ goes inside (default outputs/demo_corpus/<size>)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--voices", default="auto", choices=["auto", "mbrola", "espeak"],
                        help="auto prefers MBROLA voices when installed")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes")
    args = parser.parse_args(argv)
    db = generate_corpus(args.root or _default_root(args.size), args.size, args.seed,
                         args.voices, args.workers)
    report = convert_tree(db / "VoxCeleb2" / "m4a", db / "VoxCeleb2" / "wav", workers=args.workers)
    print(report.summary())
    print(db)
    return 1 if report.failed else 0


if __name__ == "__main__":
    run_cli(main)
