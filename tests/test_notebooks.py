"""Notebooks: committed clean, parameters papermill can read, data prep and model run headless."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
from papermill.inspection import inspect_notebook

from rawnet_lib.demo import NOTEBOOKS, notebook_parameters
from rawnet_lib.prep import prepare, sample_utterances, utterance_table
from rawnet_lib.config import DataConfig

REPO = Path(__file__).resolve().parents[1]
ALL = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_notebook_is_committed_clean_with_a_parameters_cell(path: Path) -> None:
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), "strip outputs before committing"
    assert nb["cells"][0]["cell_type"] == "markdown" and "".join(nb["cells"][0]["source"]).startswith("# ")
    tagged = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged parameters"
    source = "".join(tagged[0]["source"])
    for node in ast.parse(source).body:  # literal assignments only: no imports, no derived values
        assert isinstance(node, ast.AnnAssign) and node.simple, ast.unparse(node)
        ast.literal_eval(node.value)
    declared = {line.split(":")[0] for line in source.splitlines() if line.strip()}
    inferred = {p["name"] for p in inspect_notebook(str(path)).values()}
    assert declared == inferred, "papermill cannot parse some parameter lines (an '=' in a help comment?)"


@pytest.mark.parametrize("name", [n for n in NOTEBOOKS if (REPO / "notebooks" / f"{n}.ipynb").exists()])
def test_demo_passes_only_parameters_the_notebooks_declare(name: str) -> None:
    declared = set(inspect_notebook(str(REPO / "notebooks" / f"{name}.ipynb")))
    assert set(notebook_parameters(name, "tiny", "smoke", 1)) <= declared


def test_prepare_converts_lists_and_checks(tiny_db: Path, tmp_path: Path) -> None:
    db = tmp_path / "DB"
    shutil.copytree(tiny_db, db, ignore=shutil.ignore_patterns("wav", "lists"))
    result = prepare(DataConfig(data_path=str(db)), trial_lists=["O", "E", "H"], progress=False)
    assert result.conversion.converted == len(list((db / "VoxCeleb2" / "m4a").rglob("*.m4a")))
    assert result.check.ok, str(result.check)
    table = utterance_table(result.lists).set_index("folder")
    assert table.loc["VoxCeleb2/wav", "utterances"] == result.conversion.converted
    assert (db / "lists" / "VoxCeleb2_wav.tsv").is_file()
    again = prepare(DataConfig(data_path=str(db)), check=False, progress=False)
    assert again.conversion.converted == 0 and again.conversion.skipped == result.conversion.converted
    picked = sample_utterances(result.lists, 3, seed=1)
    assert len(picked) == 3 and len({p.parts[-3] for p in picked}) == 3 and all(p.exists() for p in picked)


def test_data_prep_notebook_runs_headless(run_notebook, tiny_db: Path) -> None:
    out = run_notebook("data_prep", data_path=str(tiny_db), listen=2)
    text = out.read_text()
    assert "VoxCeleb2/wav" in text and "<audio" in text and "image/png" in text


def test_model_notebook_runs_headless(run_notebook, tiny_db: Path, tmp_path: Path) -> None:
    run_notebook("model", preset="smoke", n_classes=6, data_path=str(tiny_db), figures_dir=str(tmp_path))
    for name in ("sinc_bands", "sinc_responses", "fms_scales"):
        assert (tmp_path / "smoke" / f"{name}.png").stat().st_size > 0


def test_model_notebook_reads_a_checkpoint(run_notebook, smoke_run: Path, tiny_db: Path, tmp_path: Path) -> None:
    checkpoint = smoke_run / "models" / "best_opt_eval.pt"
    run_notebook("model", checkpoint=str(checkpoint), data_path=str(tiny_db), figures_dir=str(tmp_path))
    assert (tmp_path / "best_opt_eval" / "sinc_bands.npz").is_file()
