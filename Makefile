# The two entry points of the README. Both set up .venv first (idempotent).
.PHONY: demo test venv results clean

venv:
	@bash scripts/setup.sh

demo: venv
	.venv/bin/pyro-tvc demo

test: venv
	.venv/bin/python -m pytest -q -p no:cacheprovider

# `make results` (after `make demo`): benchmarks, copies of the demo's result files, and the README's results section.
results: venv
	.venv/bin/python benchmarks/compose.py --quick --out benchmarks/results/compose_quick.json
	.venv/bin/python benchmarks/svi_step.py --out benchmarks/results/svi_step.json
	.venv/bin/python benchmarks/gradient_variance.py --out benchmarks/results/gradient_variance.json
	.venv/bin/python benchmarks/lowrank_accuracy.py --out benchmarks/results/lowrank_accuracy.json
	.venv/bin/python benchmarks/variants.py --out benchmarks/results/variants.json
	cp artifacts/pyro-tvc-tiny/table.json benchmarks/results/prepare_table.json
	cp runs/demo/results.json benchmarks/results/demo_results.json
	cp runs/demo/diagnostics/summary.json benchmarks/results/demo_diagnostics_summary.json
	.venv/bin/python scripts/update_readme.py

clean:
	rm -rf artifacts runs build dist *.egg-info
