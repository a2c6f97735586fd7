"""`python -m rawnet_lib.bench`: see rawnet_lib/bench/__init__.py."""
from rawnet_lib.bench.cli import main
from rawnet_lib.errors import run_cli

run_cli(main)
