"""``pyro-tvc benchmark``: protocols x methods x targets x seeds, one cached cell each, then tables and plots.

Each finished cell (one protocol, method, target and seed) is written to ``OUT/cells/<key>.json``, keyed by a hash
of everything that determines it, so an interrupted benchmark resumes where it stopped and a changed setting
re-runs only the cells it affects.
"""
from pyro_tvc.experiments.config import BenchmarkConfig, DEMO_METHODS, DEMO_TARGETS  # noqa: F401
from pyro_tvc.experiments.runner import run_benchmark  # noqa: F401
