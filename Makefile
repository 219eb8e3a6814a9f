# The two entry points of the README (demo, test). Both set up .venv first (idempotent).
.PHONY: demo test venv full results text clean

venv:
	@bash scripts/setup.sh

demo: venv
	.venv/bin/pyro-tvc demo

test: venv
	.venv/bin/python -m pytest -q -p no:cacheprovider

# The committed benchmark (3 seeds, every protocol, method and target) into results/, then the README's numbers.
full: venv
	.venv/bin/pyro-tvc prepare --quiet
	.venv/bin/pyro-tvc benchmark --full --resume
	.venv/bin/pyro-tvc benchmark --protocols target --methods metanet vtvc_gated vtvc_conditional_gated \
		--targets mnist cifar10 dtd10 --seeds 1 2 3 --epochs 15 --out results/converged --resume
	.venv/bin/pyro-tvc benchmark --protocols target --methods atlas metanet task_level_vi vtvc_gated vtvc_ungated \
		--seeds 1 2 3 --epochs 15 --out results/converged_all --resume
	cp artifacts/pyro-tvc-tiny/table.json benchmarks/results/prepare_table.json
	.venv/bin/python scripts/update_readme.py

# The engine benchmarks (after `make demo`), then the README's numbers.
results: venv
	.venv/bin/python benchmarks/compose.py --quick --out benchmarks/results/compose_quick.json
	.venv/bin/python benchmarks/svi_step.py --out benchmarks/results/svi_step.json
	.venv/bin/python benchmarks/gradient_variance.py --out benchmarks/results/gradient_variance.json
	.venv/bin/python benchmarks/gradient_variance.py --guide conditional_gated --rank 16 --train-epochs 15 \
		--max-train 1000 --seed 1 --set gate.inclusion_min=0.9 --gate-sweep 0.9:0.25 0.7:0.25 0.5:0.25 0.7:1 0.5:1 \
		0.5:4 --out benchmarks/results/gradient_variance_conditional_gated.json
	.venv/bin/python benchmarks/gradient_variance.py --guide conditional_gated --rank 16 --train-epochs 15 \
		--max-train 1000 --seed 1 --set gate.inclusion_min=0.7 --gate-sweep 0.9:0.25 0.7:0.25 0.5:0.25 0.7:1 0.5:1 \
		0.5:4 --out benchmarks/results/gradient_variance_conditional_gated_inclusion07.json
	.venv/bin/python benchmarks/lowrank_accuracy.py --out benchmarks/results/lowrank_accuracy.json
	.venv/bin/python benchmarks/stream_memory.py --out benchmarks/results/stream_memory.json
	cp artifacts/pyro-tvc-tiny/table.json benchmarks/results/prepare_table.json
	.venv/bin/python scripts/update_readme.py

# The text path (issue 14): prepare six text tasks on all-MiniLM-L6-v2, the benchmark on them into results/text.
text: venv
	.venv/bin/pyro-tvc prepare --modality text --quiet
	.venv/bin/pyro-tvc benchmark --artifacts artifacts/all-MiniLM-L6-v2 --protocols target \
		--methods zero_shot finetuned task_arithmetic atlas metanet vtvc_gated --seeds 1 2 3 --max-train 500 \
		--eval-samples 4 --out results/text --resume
	cp artifacts/all-MiniLM-L6-v2/table.json benchmarks/results/prepare_text_table.json
	.venv/bin/python scripts/update_readme.py

clean:
	rm -rf artifacts runs build dist *.egg-info
