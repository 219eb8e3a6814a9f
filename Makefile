# The two entry points of the README. Both set up .venv first (idempotent).
.PHONY: demo test venv bench clean

venv:
	@bash scripts/setup.sh

demo: venv
	.venv/bin/pyro-tvc demo

test: venv
	.venv/bin/python -m pytest -q -p no:cacheprovider

bench: venv
	.venv/bin/python benchmarks/compose.py --quick --out benchmarks/results/compose_quick.json

clean:
	rm -rf artifacts runs build dist *.egg-info
