"""Notebooks: committed clean, parameters papermill can read, data prep and model run headless."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest
import yaml
from papermill.inspection import inspect_notebook

from rawnet_lib.config import BLOCK_NAMES, Config, DataConfig
from rawnet_lib.demo import NOTEBOOKS, notebook_parameters
from rawnet_lib.prep import prepare, sample_utterances, utterance_table
from rawnet_lib.views import summary, verify_notebook

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
    """What the notebook accepts: its declared parameters, and the YAML blocks where it builds a Config."""
    path = REPO / "notebooks" / f"{name}.ipynb"
    accepted = set(inspect_notebook(str(path)))
    if _loader_call(_code_cells(path)[1]).func.id in CONFIG_LOADERS:
        accepted |= {"preset", *BLOCK_NAMES}
    for preset in ("smoke", "demo"):
        assert set(notebook_parameters(name, "tiny", preset, 1)) <= accepted


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
    out = run_notebook("model", preset="smoke", n_classes=6, data_path=str(tiny_db), out_dir=str(tmp_path))
    for name in ("sinc_bands", "sinc_responses", "fms_scales"):
        assert (tmp_path / "smoke" / f"{name}.png").stat().st_size > 0
    with np.load(tmp_path / "smoke" / "fms_scales.npz") as gates:  # the gates behind the figure, per block
        assert gates.files == [f"block{i}" for i in range(6)]
    sinc = next(c for c in json.loads(out.read_text())["cells"] if "".join(c["source"]).startswith("display(*sinc"))
    assert sum("image/png" in o.get("data", {}) for o in sinc["outputs"]) == 2  # passbands and responses


def test_model_notebook_reads_a_checkpoint(run_notebook, smoke_run: Path, tiny_db: Path, tmp_path: Path) -> None:
    checkpoint = smoke_run / "models" / "best_opt_eval.pt"
    run_notebook("model", checkpoint=str(checkpoint), data_path=str(tiny_db), out_dir=str(tmp_path))
    assert (tmp_path / f"{smoke_run.name}-best_opt_eval" / "sinc_bands.npz").is_file()  # the run's, not any best's


# --- parameters never override silently -----------------------------------------------------

def _code_cells(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


# Library calls that build a notebook's Config with notebook_config (the checkpoint's config as
# base), and the parameters each says are the notebook's own.
CONFIG_LOADERS = {"notebook_config": (), "verify_session": verify_notebook.OWN, "notebook_model": summary.OWN}


def _loader_call(source: str) -> ast.Call:
    """The notebook_config / declared_parameters call of a notebook's config cell, or the library
    call that makes it (verify_session, notebook_model)."""
    loaders = (*CONFIG_LOADERS, "declared_parameters")
    calls = [n for n in ast.walk(ast.parse(source.replace("%matplotlib inline", "")))
             if isinstance(n, ast.Call) and getattr(n.func, "id", "") in loaders]
    assert calls, "the config cell must check the parameters with notebook_config(globals()) or declared_parameters"
    assert all(isinstance(c.args[0], ast.Call) and c.args[0].func.id == "globals" for c in calls)
    return calls[-1]


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_config_field_parameters_default_to_the_preset(path: Path) -> None:
    """A declared parameter that is a Config field defaults to None (keep the preset or YAML),
    unless the notebook says it is its own (evaluate's out_dir)."""
    params, config = _code_cells(path)[:2]
    call = _loader_call(config)
    own = next((ast.literal_eval(k.value) for k in call.keywords if k.arg == "own"), CONFIG_LOADERS.get(call.func.id))
    fields = set(Config().flat())
    for node in ast.parse(params).body:
        name = node.target.id
        if call.func.id in CONFIG_LOADERS and name in fields and name not in own:
            assert ast.literal_eval(node.value) is None, f"{name} would override the preset; default it to None"


def test_demo_benchmarks_its_preset_at_real_size() -> None:
    """The smoke preset's model is so small that fixed overheads make the fast path look slower."""
    assert notebook_parameters("benchmark", "demo", "demo", 1, "/db") == {"preset": "demo", "scale": False,
                                                                        "data_path": "/db"}
    assert notebook_parameters("benchmark", "tiny", "smoke", 1)["quick"] is True


@pytest.fixture(scope="module")
def train_config_cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.ipynb cut after its config cell, plus a cell printing the resolved config."""
    nb = json.loads((REPO / "notebooks" / "train.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"][:2]
    show = {**code[1], "source": ['import json\n', 'print("CONFIG=" + json.dumps(cfg.to_dict()))'], "metadata": {}}
    nb["cells"] = [*code, show]
    path = tmp_path_factory.mktemp("nb") / "train_config.ipynb"
    path.write_text(json.dumps(nb))
    return path


def _execute(path: Path, **parameters) -> dict:
    import papermill as pm
    out = path.with_name("out_" + path.name)
    pm.execute_notebook(str(path), str(out), parameters=parameters, cwd=str(REPO / "notebooks"),
                        kernel_name="python3", progress_bar=False)
    text = "".join(o.get("text", "") for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", []))
    return json.loads(text.split("CONFIG=", 1)[1].splitlines()[0])


@pytest.mark.slow
def test_train_notebook_keeps_what_f_yaml_sets_and_fast_switches_off(train_config_cells: Path, tmp_path: Path) -> None:
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("preset: smoke\nmodel: {fast: true}\ntrain: {devices: 2, mode: performance, device: cpu,\n"
                         "  resume: true, out_dir: /runs, nnodes: 2, master_port: 29999}\n")
    injected = yaml.safe_load(yaml_file.read_text())             # what papermill -f mine.yaml injects
    cfg = _execute(train_config_cells, **injected)
    assert cfg["preset"] == "smoke" and cfg["model"]["fast"] is True
    assert {k: cfg["train"][k] for k in injected["train"]} == injected["train"]
    assert _execute(train_config_cells, **injected, fast=False)["model"]["fast"] is False


@pytest.mark.slow
def test_misspelt_parameter_fails_naming_the_declared_one() -> None:
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError
    with pytest.raises(PapermillExecutionError, match=r"epcohs.*did you mean epochs"):
        pm.execute_notebook(str(REPO / "notebooks" / "train.ipynb"), None, parameters={"epcohs": 3},
                            cwd=str(REPO / "notebooks"), kernel_name="python3", progress_bar=False)
