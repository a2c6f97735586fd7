"""Shared fixtures: the tiny generated corpus, one finished smoke training run, and a
headless papermill runner for the notebooks.

`pytest -m "not slow"` is the quick loop: a test is slow when it trains (the `smoke_run`
fixture), runs a notebook (`run_notebook`) or is marked `slow` itself (several processes,
compiling kernels). The marking is done here, in one place, from the fixtures a test uses.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]


SLOW_FIXTURES = {"smoke_run", "run_notebook"}
CORPUS_TOOLS = ("espeak-ng", "ffmpeg")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("notebook"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def child_env():
    """env(*folders): the environment of a Python child process that imports these folders, then
    this checkout, then what PYTHONPATH already held (packages installed there stay importable)."""
    def env(*folders: Path) -> dict[str, str]:
        paths = [*map(str, folders), str(REPO), os.environ.get("PYTHONPATH", "")]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    return env


@pytest.fixture(scope="session")
def tiny_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo corpus (VoxCeleb layout, m4a converted), generated once per test session;
    the tests that need it are skipped, not failed, on a machine without the speech tools."""
    missing = [tool for tool in CORPUS_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the demo corpus needs {', '.join(missing)}: run ./setup.sh install")
    from rawnet_lib.corpus import ensure_demo_corpus
    return ensure_demo_corpus("tiny", root=tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def smoke_run(tiny_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch smoke-preset run on the tiny corpus; returns its run folder."""
    from rawnet_lib.config import load_config
    from rawnet_lib.train import train
    from rawnet_lib.training.run import run_path
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
