"""The whole workbook, end to end, headless: what `./setup.sh demo` runs.

Generates the demo corpus, then executes the notebooks in reading order with papermill
(data prep, model, training, evaluation, analysis, verification, benchmark), each into
`outputs/demo_runs/<time>/` with its outputs, so the run can be opened in JupyterLab.
Training resumes the demo run when one exists, so repeating the command loses nothing.

    python -m rawnet_lib.demo                 # the demo corpus and preset
    python -m rawnet_lib.demo --config smoke  # a one-minute look (the smoke preset's tiny corpus)

The benchmark times the demo preset's model at its real size (the smoke preset's is so small
that fixed overheads hide what the fast path gains); with the smoke preset it runs its quick check.
`notebooks/sweep.ipynb` is not part of the demo: comparing recipes over seeds trains a dozen
demo models (`python -m rawnet_lib.sweep params/sweeps/demo_recipes.yaml --out DIR`).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from rawnet_lib.config import REPO_DIR, cli_config, cli_parser
from rawnet_lib.errors import run_cli

__all__ = ["NOTEBOOKS", "notebook_parameters", "run_demo"]

NOTEBOOKS = ("data_prep", "model", "train", "evaluate", "analysis", "verify", "benchmark")


def notebook_parameters(name: str, size: str, preset: str, devices: int, db: str = "") -> dict:
    """The papermill parameters each notebook gets in the demo (`db`: the demo corpus' DB folder)."""
    common = {"data_path": "", "demo_size": size}
    return {
        "data_prep": {**common, "preset": preset},
        "model": {**common, "preset": preset, "n_classes": 0},
        "train": {"preset": preset, "devices": devices, "resume": True, "data": {"demo_size": size}},
        "evaluate": {**common, "preset": preset},
        "analysis": {},
        "verify": {},   # the demo run's best model on two demo speakers, calibrated on its validation list
        "benchmark": {"quick": True} if preset == "smoke" else {"preset": preset, "scale": False, "data_path": db},
    }[name]


def run_demo(size: str = "demo", preset: str = "demo", devices: int = 1, only: list[str] | None = None) -> Path:
    """Run each notebook that exists; stop at the first that fails (papermill keeps its output)."""
    import papermill as pm

    from rawnet_lib.corpus import ensure_demo_corpus

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("papermill").setLevel(logging.INFO)  # stream each cell's printed output
    db = ensure_demo_corpus(size)
    out = REPO_DIR / "outputs" / "demo_runs" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in only or NOTEBOOKS:
        source = REPO_DIR / "notebooks" / f"{name}.ipynb"
        if not source.exists():
            continue
        start = time.time()
        print(f"== {name}.ipynb", flush=True)
        pm.execute_notebook(str(source), str(out / source.name), cwd=str(source.parent),
                            parameters=notebook_parameters(name, size, preset, devices, str(db)), log_output=True,
                            progress_bar=False)
        print(f"== {name}.ipynb done in {time.time() - start:.0f} s -> {out / source.name}", flush=True)
    print(f"executed notebooks: {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = cli_parser("python -m rawnet_lib.demo", __doc__, fields=("demo_size", "devices"),
                        config_help="parameter set for model and training, a preset name")
    parser.add_argument("--only", nargs="*", help=f"run only these notebooks ({', '.join(NOTEBOOKS)})")
    args = parser.parse_args(argv)
    cfg = cli_config(args)
    run_demo(cfg.data.demo_size, args.config, cfg.train.devices, args.only)


if __name__ == "__main__":
    run_cli(main)
