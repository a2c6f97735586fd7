"""Shared fixtures: the tiny generated corpus, one finished smoke training run, and a
headless papermill runner for the notebooks."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo corpus (VoxCeleb layout, m4a converted), generated once per test session."""
    from rawnet_lib.corpus import ensure_demo_corpus
    return ensure_demo_corpus("tiny", root=tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def smoke_run(tiny_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch smoke-preset run on the tiny corpus; returns its run folder."""
    from rawnet_lib.config import load_config
    from rawnet_lib.run import run_path
    from rawnet_lib.train import train
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path_factory.mktemp("runs")),
                      name="fixture")
    train(cfg)
    return run_path(cfg)


@pytest.fixture(scope="session")
def run_notebook(tmp_path_factory: pytest.TempPathFactory):
    """Execute notebooks/<name>.ipynb headlessly with papermill; returns the executed notebook."""
    import papermill as pm
    out_dir = tmp_path_factory.mktemp("notebooks")

    def run(name: str, **parameters) -> Path:
        out = out_dir / f"{name}.ipynb"
        env_backend = os.environ.get("MPLBACKEND")
        os.environ["MPLBACKEND"] = "Agg"
        try:
            pm.execute_notebook(str(REPO / "notebooks" / f"{name}.ipynb"), str(out), parameters=parameters,
                                cwd=str(REPO / "notebooks"), kernel_name="python3", progress_bar=False)
        finally:
            if env_backend is None:
                os.environ.pop("MPLBACKEND", None)
            else:
                os.environ["MPLBACKEND"] = env_backend
        return out

    return run
