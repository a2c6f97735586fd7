"""Your own audio: embed, score and verify any files with a trained RawNet2 (or its ONNX export).

    python -m rawnet_lib.verify embed --checkpoint C FILES_OR_FOLDERS --out emb.npz
    python -m rawnet_lib.verify score --checkpoint C a.wav b.m4a          # one JSON line
    python -m rawnet_lib.verify score --checkpoint C --trials pairs.txt    # scores, EER and minDCF with labels
    python -m rawnet_lib.verify calibrate --checkpoint C --trials dev.txt  # score -> LLR, saved beside C

    from rawnet_lib.verify import Verifier
    v = Verifier.from_checkpoint("best_opt_eval.pt")      # or "rawnet2.onnx" (onnxruntime)
    v.verify("a.wav", "b.flac")   # {'score': 0.71, 'llr': 3.2, 'decision': True, 'operating_point': 'eer', ...}

Files of any container, rate and channel count are read by `anyaudio.load_any`. The crop
protocol is explicit and goes with every result: `reference` (the reference's test crops of
n_samples, averaged; what the model was evaluated with) or `full` (the whole utterance in one
pass; only for models without the fixed-length layer norm). A pair list has one pair per line,
`[label] a b`, label 1 = same speaker, paths absolute or relative to the list's folder (or --root).
"""
from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rawnet_lib.config import Config, cli_config, cli_overrides, cli_parser, with_overrides
from rawnet_lib.dataset.anyaudio import describe, find_audio, load_any, to_model_rate
from rawnet_lib.dataset.audio import AudioError
from rawnet_lib.dataset.trials import TrialListError, find_file
from rawnet_lib.dist import check_fast_path, resolve_device_kind
from rawnet_lib.errors import WorkbookError, run_cli
from rawnet_lib.eval.calibrate import (Calibration, calibration_path, check_calibration, cllr, fit_calibration,
                                       load_calibration)
from rawnet_lib.eval.embed import autocast, check_crops, cpu_amp, mean_crop_embeddings, utterance_crops
from rawnet_lib.eval.metrics import summarize
from rawnet_lib.eval.scoring import unit
from rawnet_lib.io import atomic_open, check_output, file_sha1
from rawnet_lib.models.checkpoint import load_checkpoint_model

__all__ = ["VerifyError", "EmbeddingSet", "Pairs", "read_pairs", "Verifier", "main"]

Item = str | Path | np.ndarray
OVERRIDES = ("crop_mode", "eval_hop", "eval_batch_size", "fast", "amp")  # test-time settings; the rest is the model's
CLI_FIELDS = (*OVERRIDES, "device")


class VerifyError(WorkbookError, ValueError):
    """Nothing usable to embed or score; the message lists what failed and why."""


@dataclass
class EmbeddingSet:
    """Embeddings of many files, the ones that failed (path, why) and the protocol that made them."""
    embeddings: dict[str, np.ndarray]
    failed: list[tuple[str, str]]
    protocol: dict[str, Any]

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """An npz: `keys`, `emb` (n, dim) and `meta` (JSON: protocol and failures), written
        atomically; over an existing file only with `overwrite`."""
        check_output(path, overwrite, flag="overwrite=True")
        keys = list(self.embeddings)
        dim = len(next(iter(self.embeddings.values()))) if keys else 0
        meta = json.dumps({"protocol": self.protocol, "failed": self.failed})
        with atomic_open(path, "wb") as f:
            np.savez(f, keys=np.array(keys, dtype=str),
                     emb=np.stack(list(self.embeddings.values())) if keys else np.zeros((0, dim), np.float32),
                     meta=np.array(meta))


@dataclass
class Pairs:
    """A list of pairs to score: paths, and labels (1 = same speaker) when the list has them."""
    a: list[Path]
    b: list[Path]
    labels: np.ndarray | None = None
    source: str = ""


def read_pairs(path: str | Path, roots: Sequence[str | Path] = ()) -> Pairs:
    """Lines `label a b` or `a b` (blank lines and `#` comments skipped); relative paths are looked
    up under `roots`, then the list's folder. Every bad line is reported at once: the format, a
    file compared with itself, a pair given twice. A file that cannot be read is found when
    scoring, which lists its pairs and goes on."""
    path = Path(path)
    if not path.is_file():
        raise TrialListError(f"{path}: no such pair list; give a text file of lines 'label a b' or 'a b'")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise TrialListError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    search = [Path(r) for r in roots] + [path.parent]
    rows, bad, seen = [], [], {}
    for number, line in enumerate(text.splitlines(), 1):
        tokens = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].split()  # a # inside a file name is the name's
        if not tokens:
            continue
        if len(tokens) not in (2, 3) or (len(tokens) == 3 and tokens[0] not in ("0", "1")):
            bad.append(f"line {number}: {line.strip()[:80]!r} is not 'label a b' (label 0 or 1) or 'a b'")
            continue
        a, b = (_locate(t, search) for t in tokens[-2:])
        pair = frozenset((a, b))
        if a == b:
            bad.append(f"line {number}: compares {tokens[-1]} with itself")
        elif pair in seen:
            bad.append(f"line {number}: the pair of line {seen[pair]} again (either order counts twice)")
        seen.setdefault(pair, number)
        rows.append((tokens[0] if len(tokens) == 3 else None, a, b))
    kinds = {label is None for label, _, _ in rows}
    if len(kinds) > 1:
        bad.append("some lines have a label and some do not; label every line or none")
    if bad or not rows:
        raise TrialListError(f"{path}: " + ("; ".join(bad[:10]) if bad else "no pairs") +
                             (f" (and {len(bad) - 10} more)" if len(bad) > 10 else "") +
                             "; fix these lines (format: '1 a.wav b.wav', 1 = same speaker)")
    labels = None if rows[0][0] is None else np.array([int(label) for label, _, _ in rows])
    return Pairs([a for _, a, _ in rows], [b for _, _, b in rows], labels, str(path))


def _locate(token: str, roots: Sequence[Path]) -> Path:
    """A pair's path: itself when absolute, else under the first root that holds it (the last root
    otherwise, so that a missing file is reported with a path)."""
    p = Path(token).expanduser()
    return find_file(p, roots) or (p if p.is_absolute() else roots[-1] / p)


class Verifier:
    """Embeddings and verification scores of any audio with one model and one crop protocol."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], cfg: Config, source: str,
                 calibration: Calibration | None = None, backend: str = "torch", model_sha1: str = ""):
        check_crops(cfg.model, cfg.evaluation)
        if backend == "onnxruntime" and cfg.evaluation.crop_mode == "full":
            raise VerifyError(f"{source}: an exported model takes crops of exactly {cfg.model.n_samples} samples; "
                              "use crop_mode reference, or the checkpoint for crop_mode full")
        self.forward, self.cfg, self.source, self.backend = forward, cfg, source, backend
        self.model_sha1 = model_sha1  # of the checkpoint the weights come from: what a calibration is fitted for
        self.calibration = calibration
        self.speakers: dict[str, np.ndarray] = {}

    @classmethod
    def from_checkpoint(cls, path: str | Path, preset: str | None = None, device: str = "auto",
                        calibration: str | Path | None = None, **overrides: Any) -> "Verifier":
        """From our checkpoint, a bare reference state_dict (`preset` gives what the weights do not
        say, default paper) or an exported `.onnx` file (run by onnxruntime on the CPU).

        `overrides` are test-time settings (OVERRIDES: `crop_mode="full"`, `eval_hop=...`,
        `amp="bf16"`, `fast=False`); the model's own are refused, as changing them would feed the
        weights what they were not trained on. On the CPU a checkpoint runs the fast path, in
        bf16 only where the CPU has bf16 instructions (`embed.cpu_amp`): the exact path's results
        up to float32 rounding, about 2x faster (`python -m rawnet_lib.bench embed`); an
        accelerator runs the exact path.
        The calibration beside the file (`<stem>.calibration.json`) is used when there is one, or
        the one `calibration` names; one fitted for other weights or crops is refused.
        """
        path = Path(path)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        fixed = sorted(set(overrides) - set(OVERRIDES))
        if fixed:
            raise VerifyError(f"{', '.join(fixed)}: not a test-time setting; override only {', '.join(OVERRIDES)} "
                              "(the model's own, such as sample_rate or n_samples, are fixed by its weights; audio "
                              "at another rate: a file carries its rate, an array takes sr=)")
        if path.suffix.lower() == ".onnx":
            from rawnet_lib.export import exported_from, onnx_embedder
            forward, cfg = onnx_embedder(path)
            cfg, backend, sha1 = with_overrides(cfg, **overrides), "onnxruntime", exported_from(path)
        else:
            model, cfg = load_checkpoint_model(path, base=preset or "paper")
            kind = resolve_device_kind(device)
            defaults = {"fast": True, "amp": cpu_amp()} if kind == "cpu" else {"fast": False}
            cfg = with_overrides(cfg, **{**defaults, **overrides})
            check_fast_path(cfg.model.fast, kind, f"{path}: fast=True")
            model.cfg.fast = cfg.model.fast
            forward, backend = _torch_forward(model.to(kind), torch.device(kind), cfg.train.amp), kind
            sha1 = file_sha1(path)
        verifier = cls(forward, cfg, str(path), None, backend, sha1)
        found = Path(calibration) if calibration else calibration_path(path)
        if found.is_file() or calibration:
            verifier.calibration = load_calibration(found)
            check_calibration(verifier.calibration, {"model_sha1": sha1, **verifier.protocol}, found)
        return verifier

    # -- embedding ---------------------------------------------------------------------------
    @property
    def protocol(self) -> dict[str, Any]:
        """How every embedding of this verifier is made: stored with every result."""
        ev, m = self.cfg.evaluation, self.cfg.model
        path = "onnx" if self.backend == "onnxruntime" else "fast" if m.fast else "exact"
        return {"model": self.source, "backend": self.backend, "path": path,
                "amp": "off" if path == "onnx" else self.cfg.train.amp,
                "crop_mode": ev.crop_mode, "n_samples": m.n_samples,
                "eval_hop": ev.eval_hop if ev.crop_mode == "reference" else None, "sample_rate": m.sample_rate}

    def samples(self, item: Item, sr: int | None = None) -> np.ndarray:
        """Mono float32 samples at the model's rate: a file of any format, or an array at `sr` Hz
        (default: the model's rate)."""
        rate = self.cfg.model.sample_rate
        if isinstance(item, np.ndarray):
            return to_model_rate(item, sr or rate, rate)
        return load_any(item, rate)

    def embed(self, item: Item, sr: int | None = None) -> np.ndarray:
        """The embedding (embedding_dim,) of one file or array, or of an enrolled speaker's name."""
        if isinstance(item, str) and item in self.speakers:
            return self.speakers[item]
        crops = utterance_crops(self.samples(item, sr), self.cfg.model, self.cfg.evaluation)
        return self._embed_crops([crops])[0]

    def _embed_crops(self, crops: Iterable[np.ndarray]) -> list[np.ndarray]:
        return mean_crop_embeddings(lambda x: self.forward(x.numpy()), crops, self.cfg.evaluation)

    def embed_many(self, items: Iterable[str | Path], progress: bool = True) -> EmbeddingSet:
        """Embeddings of files and folders (their audio, recursively), batched across files; a file
        that cannot be read is listed in `failed` with the reason, and the rest goes on."""
        files, failed = find_audio(items)
        done: list[str] = []

        def crops() -> Iterator[np.ndarray]:
            for path in tqdm(files, desc="embed", disable=not progress, leave=False):
                try:
                    x = self.samples(path)
                except AudioError as err:
                    failed.append((str(path), str(err).removeprefix(f"{path}: ")))
                    continue
                done.append(str(path))
                yield utterance_crops(x, self.cfg.model, self.cfg.evaluation)
        vectors = self._embed_crops(crops())
        return EmbeddingSet(dict(zip(done, vectors)), failed, self.protocol)

    def enroll(self, name: str, files: Iterable[str | Path]) -> np.ndarray:
        """A speaker's embedding: the mean of the unit embeddings of their files; `name` then works
        wherever a file does (`score(name, "test.wav")`)."""
        found = self.embed_many(files, progress=False)
        if not found.embeddings:
            raise VerifyError(f"enroll {name!r}: none of the files could be used:\n{describe(found.failed)}")
        if found.failed:
            warnings.warn(f"enroll {name!r}: left out\n{describe(found.failed)}", stacklevel=2)
        self.speakers[name] = unit(np.stack(list(found.embeddings.values()))).mean(0).astype(np.float32)
        return self.speakers[name]

    # -- scoring -----------------------------------------------------------------------------
    def score(self, a: Item, b: Item, sr: int | None = None) -> dict[str, Any]:
        """{'score': cosine, 'llr': calibrated log-likelihood ratio (when calibrated), protocol...}."""
        value = float(np.dot(unit(self.embed(a, sr)), unit(self.embed(b, sr))))
        result: dict[str, Any] = {"score": value}
        if self.calibration is not None:
            result["llr"] = float(self.calibration.llr(value))
        return {**result, **self.protocol}

    def verify(self, a: Item, b: Item, operating_point: str = "eer", threshold: float | None = None,
               sr: int | None = None) -> dict[str, Any]:
        """score, llr, decision (True = same speaker) and the operating point used: one of the
        calibration's (eer, min_dcf_0.01, far_<rate>) or an explicit score `threshold`."""
        result = self.score(a, b, sr)
        if threshold is None:
            if self.calibration is None:
                raise VerifyError(f"{self.source} has no calibration, so there is no operating point: calibrate "
                                  "on a development list (Verifier.calibrate or python -m rawnet_lib.verify "
                                  "calibrate) or pass threshold=")
            threshold = self.calibration.threshold(operating_point)
        else:
            operating_point = "threshold"
        return {**result, "decision": bool(result["score"] >= threshold), "operating_point": operating_point,
                "threshold": float(threshold)}

    def score_pairs(self, pairs: Pairs, progress: bool = True) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """Cosine per pair (NaN where a file failed) and the failed files; each file embedded once."""
        found = self.embed_many(dict.fromkeys(map(str, pairs.a + pairs.b)), progress)
        emb = {k: unit(v) for k, v in found.embeddings.items()}
        scores = np.array([float(np.dot(emb[str(a)], emb[str(b)])) if str(a) in emb and str(b) in emb else np.nan
                           for a, b in zip(pairs.a, pairs.b)])
        return scores, found.failed

    def calibrate(self, pairs: Pairs, far: float = 0.01, save_to: str | Path | None = None,
                  progress: bool = True, overwrite: bool = False) -> Calibration:
        """Fit score -> LLR on a labelled development list and use it from now on; saved as JSON
        (beside the checkpoint when `save_to` is None), over an existing one only with `overwrite`."""
        target = check_output(save_to or calibration_path(self.source), overwrite, [self.source])
        if pairs.labels is None or len(set(pairs.labels.tolist())) < 2:
            raise TrialListError(f"{pairs.source}: calibration needs labelled pairs of both kinds (lines '1 a b', "
                                 "same speaker, and '0 a b', different speakers)")
        scores, failed = self.score_pairs(pairs, progress)
        ok = np.isfinite(scores)
        if failed:
            warnings.warn(f"calibration: {int((~ok).sum())} pairs left out, their files failed:\n"
                          f"{describe(failed)}", stacklevel=2)
        self.calibration = fit_calibration(scores[ok], pairs.labels[ok], far,
                                           {"trials": pairs.source, "model_sha1": self.model_sha1, **self.protocol})
        self.calibration.save(target)
        return self.calibration


def _torch_forward(model: torch.nn.Module, device: torch.device, amp: str) -> Callable[[np.ndarray], np.ndarray]:
    @torch.no_grad()
    def run(crops: np.ndarray) -> np.ndarray:
        with autocast(device, amp):
            return model.embed(torch.from_numpy(crops).to(device)).float().cpu().numpy()
    return run


# -- command line ---------------------------------------------------------------------------------
def _parser(command: str):
    parser = cli_parser(f"python -m rawnet_lib.verify {command}", __doc__, preset="paper", fields=CLI_FIELDS,
                        config_help="settings for a bare reference state_dict: preset name or YAML")
    parser.add_argument("--checkpoint", required=True, help="a .pt file (ours or a reference state_dict) or an .onnx")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output (--out, or calibrate's .calibration.json)")
    if command == "embed":
        parser.add_argument("inputs", nargs="+", help="audio files and folders")
        parser.add_argument("--out", required=True, help="the .npz to write (keys, emb, meta)")
    else:
        parser.add_argument("files", nargs="*", help="two audio files (or leave out and give --trials)")
        parser.add_argument("--trials", default="", help="a pair list: lines 'label a b' or 'a b'")
        parser.add_argument("--root", nargs="*", default=[], help="folders relative paths in the list are under")
        parser.add_argument("--out", default="", help="score file to write for --trials: 'score [label] a b'")
        parser.add_argument("--operating_point", default=None,
                            help="the decision of two files, from the calibration: eer (default) | min_dcf_0.01 | "
                                 "far_<rate>")
        parser.add_argument("--far", type=float, default=0.01, help="calibrate: the false-acceptance rate to keep")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("embed", "score", "calibrate")
    if not argv or argv[0] not in commands:
        raise VerifyError(f"give a command first: {' | '.join(commands)} (python -m rawnet_lib.verify score -h)")
    command = argv.pop(0)
    args = _parser(command).parse_args(argv)
    if command == "calibrate":  # before any embedding: never a file replaced without asking
        check_output(calibration_path(args.checkpoint), args.overwrite, [args.checkpoint])
    elif args.out:
        check_output(args.out, args.overwrite, [args.checkpoint, *getattr(args, "inputs", []),
                                                *([args.trials] if getattr(args, "trials", "") else [])])
    flags = cli_overrides(args)  # over the model's own settings
    flags.pop("device", None)
    verifier = Verifier.from_checkpoint(args.checkpoint, preset=args.config, device=cli_config(args).train.device,
                                        **flags)
    if command == "embed":
        found = verifier.embed_many(args.inputs)
        if not found.embeddings:
            raise VerifyError(f"nothing could be embedded:\n{describe(found.failed)}")
        found.save(args.out, overwrite=args.overwrite)
        result = {"out": args.out, "embedded": len(found.embeddings), "failed": found.failed, **found.protocol}
    elif command == "score" and args.operating_point and (args.trials or verifier.calibration is None):
        raise VerifyError(f"--operating_point {args.operating_point}: a decision is made for two files from a "
                          "calibration; " + ("--trials writes scores only" if args.trials else
                                             f"{args.checkpoint} has none: run `python -m rawnet_lib.verify "
                                             f"calibrate --checkpoint {args.checkpoint} --trials <dev list>` first"))
    elif command == "score" and not args.trials:
        if len(args.files) != 2:
            raise VerifyError(f"score takes two files (got {len(args.files)}) or --trials pairs.txt")
        a, b = args.files
        result = (verifier.verify(a, b, args.operating_point or "eer") if verifier.calibration
                  else verifier.score(a, b))
        result = {"a": a, "b": b, **result}
    elif command == "score":
        result = _score_list(verifier, read_pairs(args.trials, args.root), args.out)
    else:
        cal = verifier.calibrate(read_pairs(args.trials, args.root), args.far, overwrite=args.overwrite)
        result = {"calibration": str(calibration_path(args.checkpoint)), "slope": cal.slope, "offset": cal.offset,
                  **cal.metrics, "thresholds": cal.thresholds}
    print(json.dumps(result))
    return result


def _score_list(verifier: Verifier, pairs: Pairs, out: str) -> dict[str, Any]:
    scores, failed = verifier.score_pairs(pairs)
    ok = np.isfinite(scores)
    if out:
        with atomic_open(out, "w") as f:
            for i in np.flatnonzero(ok):
                label = "" if pairs.labels is None else f" {pairs.labels[i]}"
                f.write(f"{scores[i]:.6f}{label} {pairs.a[i]} {pairs.b[i]}\n")
    result: dict[str, Any] = {"trials": len(scores), "scored": int(ok.sum()), "failed": failed,
                              "out": out or None, **verifier.protocol}
    if pairs.labels is not None and len(set(pairs.labels[ok].tolist())) < 2:
        result["note"] = "EER and minDCF need scored pairs of both labels (1 and 0); the scores are written"
    elif pairs.labels is not None:
        summary = summarize(scores[ok], pairs.labels[ok])
        result.update(eer_percent=summary["eer_percent"], min_dcf_001=summary["min_dcf_0.01"],
                      min_dcf_005=summary["min_dcf_0.05"])
        if verifier.calibration is not None:
            result["cllr"] = cllr(verifier.calibration.llr(scores[ok]), pairs.labels[ok])
    return result


if __name__ == "__main__":
    run_cli(main)
