"""Posterior diagnostics of a trained VTVC run: ArviZ export, summaries, calibration, plots, and the report.

Imports are lazy so that :mod:`pyro_tvc.diagnostics.summaries` (plain numpy) can be used by :mod:`pyro_tvc.infer`
without importing the export code, which itself imports ``infer``.
"""
from importlib import import_module

_WHERE = {
    "load_run": "run_files", "resolve_run": "run_files", "load_problem": "run_files", "RunSource": "run_files",
    "posterior_datatree": "export", "prior_draws": "export", "save_datatree": "export", "load_datatree": "export",
    "auroc": "summaries", "brier": "summaries", "calibration_table": "summaries", "coefficient_summary": "summaries",
    "expected_calibration_error": "summaries", "hdi_interval": "summaries", "input_summary": "summaries",
    "mc_accuracy": "summaries", "DiagnoseConfig": "report", "diagnose": "report",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"pyro_tvc.diagnostics.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'pyro_tvc.diagnostics' has no attribute {name!r}")
