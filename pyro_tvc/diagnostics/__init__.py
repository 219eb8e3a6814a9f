"""Posterior diagnostics of a trained VTVC run: ArviZ export, summaries, calibration, plots, and the report."""
from pyro_tvc.diagnostics.export import load_run, posterior_datatree, save_datatree, load_datatree
from pyro_tvc.diagnostics.summaries import (auroc, brier, calibration_table, coefficient_summary, expected_calibration_error,
                                            hdi_interval, input_summary)

__all__ = ["load_run", "posterior_datatree", "save_datatree", "load_datatree", "auroc", "brier", "calibration_table",
           "coefficient_summary", "expected_calibration_error", "hdi_interval", "input_summary"]
