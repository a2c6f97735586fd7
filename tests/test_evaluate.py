"""The embedding cache, the evaluation table, run discovery and the evaluate notebook."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from rawnet_lib import dist
from rawnet_lib import evaluate as ev
from rawnet_lib.config import ConfigError, load_config, with_overrides
from rawnet_lib.dataset.trials import read_trials, resolve
from rawnet_lib.errors import WorkbookError
from rawnet_lib.eval import embed
from rawnet_lib.eval.embed import cached_embeddings
from rawnet_lib.eval.metrics import eer
from rawnet_lib.io import file_sha1
from rawnet_lib.models.checkpoint import load_checkpoint_model, read_checkpoint
from rawnet_lib.models.rawnet2 import build_model
from rawnet_lib.training.run import default_out_dir, epoch_models, newest_run

CPU = dist.single("cpu")


@pytest.fixture
def count_embeds(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the keys of every embed_files call the cache makes."""
    calls: list[list[str]] = []
    real = embed.embed_files

    def counting(model, keys, *args, **kwargs):
        calls.append(list(keys))
        return real(model, keys, *args, **kwargs)

    monkeypatch.setattr(embed, "embed_files", counting)
    return calls


@pytest.fixture
def checkpoint(smoke_run: Path, tmp_path: Path) -> Path:
    """A private copy of the smoke run's best model, free to rewrite."""
    path = tmp_path / "models" / "best_opt_eval.pt"
    path.parent.mkdir()
    shutil.copy(smoke_run / "models" / "best_opt_eval.pt", path)
    return path


# -- embedding cache -----------------------------------------------------------------------------
def _eval_setup(tiny_db: Path, checkpoint: Path):
    """Model, config, roots and two overlapping key sets (a few O files; some of them plus H-only files)."""
    model, cfg = load_checkpoint_model(checkpoint)
    cfg = with_overrides(cfg, eval_hop=cfg.model.n_samples)  # fewer crops per file: a quicker test
    roots = [tiny_db / d for d in cfg.data.eval_dirs]
    o_keys = read_trials(tiny_db / "VoxCeleb1" / "veri_test.txt").files()[:6]
    h_only = sorted(set(read_trials(tiny_db / "VoxCeleb1" / "list_test_hard.txt").files()) - set(o_keys))
    return model, cfg, roots, o_keys, o_keys[3:] + h_only[:3]


def test_cache_embeds_each_file_once_and_a_new_checkpoint_invalidates(
        tiny_db: Path, checkpoint: Path, tmp_path: Path, count_embeds: list[list[str]]) -> None:
    model, cfg, roots, o_keys, h_keys = _eval_setup(tiny_db, checkpoint)
    cache = tmp_path / "cache"
    first = cached_embeddings(model, checkpoint, o_keys, roots, cfg, CPU, cache_dir=cache, progress=False)
    both = cached_embeddings(model, checkpoint, o_keys + h_keys, roots, cfg, CPU, cache_dir=cache, progress=False)
    again = cached_embeddings(model, checkpoint, h_keys, roots, cfg, CPU, cache_dir=cache, progress=False)

    assert count_embeds == [sorted(o_keys), sorted(set(h_keys) - set(o_keys))]  # the H call reuses O's files
    assert all(np.array_equal(first[k], both[k]) for k in o_keys)
    assert all(np.array_equal(both[k], again[k]) for k in h_keys)
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob(".*tmp"))

    # Other embedding settings use their own cache file.
    hop = with_overrides(cfg, eval_hop=cfg.evaluation.eval_hop // 2)
    cached_embeddings(model, checkpoint, o_keys, roots, hop, CPU, cache_dir=cache, progress=False)
    assert count_embeds[-1] == sorted(o_keys) and len(list(cache.glob("*.npz"))) == 2

    # Rewriting the checkpoint with other weights embeds everything again, with the new weights.
    state = read_checkpoint(checkpoint)
    state["model"]["fc1_gru.bias"] += 1.0
    torch.save(state, checkpoint)
    model2, _ = load_checkpoint_model(checkpoint)
    calls = len(count_embeds)
    fresh = cached_embeddings(model2, checkpoint, o_keys, roots, cfg, CPU, cache_dir=cache, progress=False)
    assert count_embeds[calls:] == [sorted(o_keys)]
    assert np.allclose(fresh[o_keys[0]], first[o_keys[0]] + 1.0, atol=1e-4)


def test_cache_embeds_a_file_written_again_since_once_more(tiny_db: Path, checkpoint: Path, tmp_path: Path,
                                                           count_embeds: list[list[str]]) -> None:
    """Keyed by name alone, a file converted again (other audio, same name) kept its old embedding."""
    model, cfg, roots, o_keys, _ = _eval_setup(tiny_db, checkpoint)
    keys = o_keys[:3]
    root = tmp_path / "wav"
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(resolve(key, roots), root / key)
    first = cached_embeddings(model, checkpoint, keys, [root], cfg, CPU, cache_dir=tmp_path, progress=False)
    audio, rate = sf.read(root / keys[1], dtype="float32")
    sf.write(root / keys[1], audio[::-1].copy(), rate, subtype="PCM_16")  # same name and size, other audio
    later = (root / keys[0]).stat().st_mtime_ns + 2 * 10**9  # a new mtime even where timestamps are coarse
    os.utime(root / keys[1], ns=(later, later))
    again = cached_embeddings(model, checkpoint, keys, [root], cfg, CPU, cache_dir=tmp_path, progress=False)
    assert count_embeds == [sorted(keys), [keys[1]]]
    assert not np.allclose(first[keys[1]], again[keys[1]], atol=1e-3)
    assert all(np.array_equal(first[k], again[k]) for k in (keys[0], keys[2]))
    (root / keys[2]).unlink()
    with pytest.raises(FileNotFoundError, match=f"trial file {keys[2]} is in none of the roots"):
        cached_embeddings(model, checkpoint, keys, [root], cfg, CPU, cache_dir=tmp_path, progress=False)


def test_full_utterance_mode_needs_a_model_without_layer_norm(
        tiny_db: Path, checkpoint: Path, tmp_path: Path) -> None:
    model, cfg, roots, o_keys, _ = _eval_setup(tiny_db, checkpoint)
    full = with_overrides(cfg, crop_mode="full")
    with pytest.raises(ConfigError, match="crop_mode='full' needs a model without the fixed-length layer norm"):
        cached_embeddings(model, checkpoint, o_keys, roots, full, CPU, cache_dir=tmp_path, progress=False)

    free = with_overrides(full, layer_norm=False)
    path = tmp_path / "no_ln.pt"
    torch.save(build_model(free).state_dict(), path)
    model, _ = load_checkpoint_model(path, base=free)
    emb = cached_embeddings(model, path, o_keys[:3], roots, free, CPU, cache_dir=tmp_path, progress=False)
    assert all(v.shape == (free.model.embedding_dim,) and np.isfinite(v).all() for v in emb.values())


def test_a_bare_state_dicts_model_settings_join_its_fingerprint(tiny_db: Path, checkpoint: Path, tmp_path: Path,
                                                                 count_embeds: list[list[str]]) -> None:
    """A bare state_dict's sinc_kernel or block_pool come from --config, not from the file: a
    corrected config must not reuse the embeddings or results of the wrong one."""
    from rawnet_lib.models.checkpoint import carries_config
    model, cfg, roots, o_keys, _ = _eval_setup(tiny_db, checkpoint)
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    assert carries_config(read_checkpoint(checkpoint)) and not carries_config(read_checkpoint(bare))
    other = with_overrides(cfg, sinc_kernel=cfg.model.sinc_kernel + 2)
    ident = ev.evaluation_identity
    assert ident(bare, cfg, roots)["fingerprint"] == file_sha1(bare)  # ours: the file's bytes cover the model
    assert ident(bare, cfg, roots, bare=True) != ident(bare, other, roots, bare=True)
    assert ident(bare, cfg, roots, bare=True) == ident(bare, with_overrides(cfg, fast=not cfg.model.fast), roots,
                                                        bare=True)  # the same function, another kernel
    for settings in (cfg, other, cfg):
        fingerprint = ident(bare, settings, roots, bare=True)["fingerprint"]
        cached_embeddings(model, bare, o_keys[:2], roots, cfg, CPU, cache_dir=tmp_path, progress=False,
                          fingerprint=fingerprint)
    assert [len(c) for c in count_embeds] == [2, 2, 2]  # each change of settings embeds afresh


# -- evaluation ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(smoke_run: Path, tiny_db: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """The smoke run evaluated on O and its cleaned twin (the same files), with AS-norm."""
    ckpt = smoke_run / "models" / "best_opt_eval.pt"
    _, cfg = load_checkpoint_model(ckpt)
    cfg = with_overrides(cfg, data_path=str(tiny_db), asnorm=True, asnorm_cohort=12, asnorm_top_k=5)
    out = tmp_path_factory.mktemp("eval")
    return ev.evaluate(ckpt, cfg, ["O", "O2"], out_dir=out, progress=False), out


def test_evaluate_writes_scores_and_a_consistent_table(evaluated, smoke_run: Path, tiny_db: Path) -> None:
    table, out = evaluated
    assert list(zip(table["list"], table["scoring"])) == [("O", "cosine"), ("O", "asnorm"), ("O2", "cosine"),
                                                           ("O2", "asnorm")]
    assert table["eer"].between(0, 1).all()
    assert np.allclose(table["eer_percent"], 100 * table["eer"])
    assert table[["min_dcf_0.01", "min_dcf_0.05"]].stack().between(0, 1).all()
    for row in table.itertuples():
        trials = read_trials(tiny_db / "VoxCeleb1" / ("veri_test.txt" if row.list == "O" else "veri_test2.txt"))
        assert (row.trials, row.n_target) == (len(trials), int(trials.labels.sum()))
        plain = np.loadtxt(out / row.scores_file.replace("_names", ""))
        named = pd.read_csv(out / row.scores_file, sep=" ", header=None)
        assert plain.shape == (len(trials), 2) and named.shape == (len(trials), 4)
        assert list(named[2]) == trials.enroll and np.array_equal(plain[:, 1], trials.labels)
        assert eer(plain[:, 0], plain[:, 1]) == pytest.approx(row.eer, abs=1e-4)  # scores kept to 6 decimals

    csv = pd.read_csv(out / "metrics.csv")
    info = json.loads((out / "metrics.json").read_text())
    pd.testing.assert_frame_equal(csv, pd.DataFrame(info["metrics"]), check_dtype=False)
    assert info["checkpoint"] == str(smoke_run / "models" / "best_opt_eval.pt") and info["data_path"] == str(tiny_db)
    assert info["fingerprint"] == file_sha1(smoke_run / "models" / "best_opt_eval.pt")
    assert info["config"]["evaluation"]["asnorm"] is True


def test_results_of_other_settings_are_never_replaced_silently(checkpoint: Path, tiny_db: Path,
                                                                tmp_path: Path) -> None:
    _, cfg = load_checkpoint_model(checkpoint)
    cfg = with_overrides(cfg, data_path=str(tiny_db))
    out = tmp_path / "eval"
    ev.evaluate(checkpoint, cfg, ["O"], out_dir=out, progress=False)
    ev.evaluate(checkpoint, cfg, ["O2"], out_dir=out, progress=False)  # same settings: the table gathers both
    assert list(pd.read_csv(out / "metrics.csv")["list"]) == ["O", "O2"]
    before = (out / "scores_O.txt").read_bytes()

    other = with_overrides(cfg, eval_hop=cfg.evaluation.eval_hop // 2)
    with pytest.raises(FileExistsError, match=r"differing: eval_hop.*--out_dir.*overwrite"):
        ev.evaluate(checkpoint, other, ["O"], out_dir=out, progress=False)
    assert (out / "scores_O.txt").read_bytes() == before
    ev.evaluate(checkpoint, other, ["O"], out_dir=out, progress=False, overwrite=True)
    assert list(pd.read_csv(out / "metrics.csv")["list"]) == ["O"]  # the old settings' rows are gone with them


def test_results_of_a_list_file_changed_since_are_dropped_not_kept(checkpoint: Path, tiny_db: Path,
                                                                    tmp_path: Path) -> None:
    _, cfg = load_checkpoint_model(checkpoint)
    cfg = with_overrides(cfg, data_path=str(tiny_db))
    mine, out = tmp_path / "mine.txt", tmp_path / "eval"
    lines = (tiny_db / "VoxCeleb1" / "veri_test.txt").read_text().splitlines(keepends=True)
    mine.write_text("".join(lines))
    ev.evaluate(checkpoint, cfg, [str(mine), "O2"], out_dir=out, progress=False)
    mine.write_text("".join(lines[:-1]))  # a new version of the list: its old results no longer describe it
    with pytest.warns(UserWarning, match=r"dropped the results of list\(s\) mine: their files changed.*--lists mine"):
        ev.evaluate(checkpoint, cfg, ["O2"], out_dir=out, progress=False)
    assert list(pd.read_csv(out / "metrics.csv")["list"]) == ["O2"]
    ev.evaluate(checkpoint, cfg, [str(mine)], out_dir=out, progress=False)
    table = pd.read_csv(out / "metrics.csv")
    assert list(table["list"]) == ["O2", "mine"] and table["trials"].iloc[1] == len(lines) - 1
    assert table["list_file"].iloc[1] == str(mine.resolve()) and table["list_sha1"].iloc[1] == file_sha1(mine)

    (tmp_path / "O.txt").write_text("".join(lines))
    clash = r"trial lists .*veri_test.txt and .*O.txt would both be reported as 'O' in one metrics table; rename"
    with pytest.raises(ConfigError, match=clash):
        ev.evaluate(checkpoint, cfg, ["O", str(tmp_path / "O.txt")], out_dir=tmp_path / "two", progress=False)
    ev.evaluate(checkpoint, cfg, ["O", str(mine), str(tmp_path / "." / "mine.txt")], out_dir=out, progress=False)
    with pytest.raises(ConfigError, match=clash):  # a later call into the same table, too
        ev.evaluate(checkpoint, cfg, [str(tmp_path / "O.txt")], out_dir=out, progress=False)


def test_a_row_is_checked_against_its_list_file_when_it_names_one(tmp_path: Path) -> None:
    """Rows written before rows named their file (NaN beside newer rows in metrics.json) cannot be
    checked and are kept; a named file that changed is not; one since removed is kept."""
    listed = tmp_path / "mine.txt"
    listed.write_text("1 a/x/1.wav a/y/2.wav\n")
    row = {"list": "mine", "list_file": str(listed), "list_sha1": file_sha1(listed)}
    assert ev._list_unchanged(row) and ev._list_unchanged({**row, "list_file": float("nan")})
    listed.write_text("0 a/x/1.wav b/y/2.wav\n")
    assert not ev._list_unchanged(row)
    listed.unlink()
    assert ev._list_unchanged(row)


def test_the_command_takes_the_lists_by_the_notebooks_name(tmp_path: Path, monkeypatch) -> None:
    """`--trial_lists`, as the evaluate notebook's parameter, train's and prep's flags; `--lists` too."""
    given = []
    monkeypatch.setattr(ev, "resolve_checkpoint", lambda checkpoint, pick, make=True: tmp_path / "best.pt")
    monkeypatch.setattr(ev, "load_checkpoint_model", lambda path, base: (None, load_config("smoke")))
    monkeypatch.setattr(ev, "evaluate", lambda checkpoint, cfg, lists, *args, **kwargs: given.append(lists)
                        or pd.DataFrame())
    ev.main(["--trial_lists", "O", "E"])
    ev.main(["--lists", "H"])
    assert given == [["O", "E"], ["H"]]

def test_two_gloo_ranks_share_embedding_and_score_once(evaluated, smoke_run: Path, tiny_db: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "rawnet_lib.evaluate", "--checkpoint", str(smoke_run / "models" / "best_opt_eval.pt"),
           "--data_path", str(tiny_db), "--lists", "O", "--device", "cpu", "--out_dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" cosine ") == 1  # only rank 0 reports
    single = np.loadtxt(evaluated[1] / "scores_O.txt")
    np.testing.assert_allclose(np.loadtxt(out / "scores_O.txt"), single, atol=2e-5)


def test_two_gloo_ranks_score_a_run_average_as_one_process(smoke_run: Path, tiny_db: Path, tmp_path: Path) -> None:
    """`--checkpoint <run> --pick avg_last2` under torchrun: the CLI reads the settings before the
    average exists, the average is made (by rank 0, the others then read it) and scored once."""
    run = tmp_path / "run"  # a copy: the average is written into the run's models/
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("eval"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "rawnet_lib.evaluate", "--checkpoint", str(run), "--pick", "avg_last2", "--data_path", str(tiny_db),
           "--lists", "O", "--device", "cpu", "--out_dir", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    average = run / "models" / "avg_last2.pt"
    assert f"{average}\n" in done.stdout and done.stdout.count(" cosine ") == 1
    assert read_checkpoint(average)["averaged"] == [p.name for p in epoch_models(run)]
    _, cfg = load_checkpoint_model(average)
    single = ev.evaluate(average, with_overrides(cfg, data_path=str(tiny_db)), ["O"], out_dir=tmp_path / "one",
                         progress=False)
    assert abs(pd.read_csv(tmp_path / "ddp" / "metrics.csv")["eer"][0] - single["eer"][0]) <= 1 / single["trials"][0]


def test_a_list_naming_audio_that_is_gone_is_refused_with_its_lines(smoke_run: Path, tiny_db: Path,
                                                                     tmp_path: Path) -> None:
    lines = (tiny_db / "VoxCeleb1" / "veri_test.txt").read_text().splitlines()[:3]
    label, enroll, _ = lines[1].split()
    mine = tmp_path / "mine.txt"
    mine.write_text("\n".join([lines[0], f"{label} {enroll} id99999/gone/00001.wav", lines[2]]) + "\n")
    ckpt = smoke_run / "models" / "best_opt_eval.pt"
    _, cfg = load_checkpoint_model(ckpt)
    with pytest.raises(WorkbookError, match=r"(?s)mine\.txt is not usable .*file not on disk: 1 line\(s\).*line 2: "
                                            r".*\(id99999/gone/00001\.wav not found\)"):
        ev.evaluate(ckpt, with_overrides(cfg, data_path=str(tiny_db)), [str(mine)], out_dir=tmp_path / "out",
                    progress=False)
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_newest_run_picks_the_latest_best_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no finished run"):
        newest_run(tmp_path)
    for i, name in enumerate(("old", "new")):
        path = tmp_path / "train_1P" / "DNNS" / name / "models" / "best_opt_eval.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / "train_1P" / "DNNS" / "unfinished" / "models").mkdir(parents=True)
    assert newest_run(tmp_path) == tmp_path / "train_1P" / "DNNS" / "new"
    assert default_out_dir(newest_run(tmp_path) / "models" / "best_opt_eval.pt") == \
        tmp_path / "train_1P" / "DNNS" / "new" / "eval" / "best_opt_eval"


@pytest.mark.notebook
def test_evaluate_notebook_saves_table_and_scores(evaluated, smoke_run: Path, tiny_db: Path, tmp_path: Path,
                                                  run_notebook) -> None:
    out = tmp_path / "nb_eval"
    shutil.copytree(evaluated[1] / "cache", out / "cache")  # the fixture's embeddings: the notebook embeds nothing
    notebook = run_notebook("evaluate", checkpoint=str(smoke_run / "models" / "best_opt_eval.pt"),
                            data_path=str(tiny_db), trial_lists=["O", "O2"], out_dir=str(out))
    assert "embedding 0" in notebook.read_text()
    table = pd.read_csv(out / "metrics.csv")
    assert list(table["list"]) == ["O", "O2"] and table["eer"].between(0, 1).all()
    assert json.loads((out / "metrics.json").read_text())["metrics"][0]["list"] == "O"
    for name in ("scores_O.txt", "scores_O_names.txt", "scores_O2.txt", "scores_O2_names.txt"):
        assert (out / name).stat().st_size > 0
