"""Shared set-up for the benchmarks that need prepared artefacts (run `pyro-tvc prepare` first)."""
from __future__ import annotations

import argparse
from pathlib import Path


def artefact_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/pyro-tvc-tiny"))
    parser.add_argument("--target", default="mnist")
    parser.add_argument("--threads", type=int, default=2)
