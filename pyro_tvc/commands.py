"""What each ``pyro-tvc`` command runs, given its parsed config (the CLI derives the options from the configs)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pyro_tvc.experiments.config import DEMO_METHODS, DEMO_TARGETS, DEMO_TASKS, BenchmarkConfig
from pyro_tvc.infer import DEFAULT_ARTIFACTS, TrainConfig


@dataclass(frozen=True)
class Command:
    name: str
    config: type
    run: Callable
    summary: str
    description: str
    positional: str | None = None  # a field that may be given as the first bare argument


@dataclass
class ImportConfig:
    """Build a task vector tau = fine-tuned image encoder - theta_0 from a fine-tuned checkpoint.

    Args:
        finetuned: Fine-tuned checkpoint: state dict (plain or wrapped), open_clip checkpoint, safetensors, or a
            pickled ImageEncoder of task_vectors/aTLAS (read without running its code).
        task: Task name (file name of the vector).
        artifacts: Folder holding theta_0 (clip.safetensors).
        allow_pickle: Allow unpickling arbitrary objects (runs code from the file: trusted files only).
        quiet: Print less.
    """

    finetuned: Path | None = None
    task: str = ""
    artifacts: Path = DEFAULT_ARTIFACTS
    allow_pickle: bool = False
    quiet: bool = False

    def __post_init__(self):
        if self.finetuned is None:
            raise ValueError("import-vector needs the fine-tuned checkpoint file (first argument)")
        if not self.task:
            raise ValueError("import-vector needs --task NAME")


@dataclass
class DemoConfig:
    """The main job: prepare (cached), a demo-sized benchmark, one VTVC run with its diagnostics, both tables.

    Args:
        artifacts: Artefact folder of ``prepare``.
        out: Folder of the demo's outputs (benchmark/ and vtvc-<target>/ inside).
        tasks: Tasks the demo fine-tunes and composes (theta_0 is pre-trained on every embedded set, as by a full
            ``prepare``, which later reuses all of it).
        targets: Targets of the demo's target-composition table (among ``tasks``).
        methods: Methods of the demo's tables.
        seed: Seed of the demo (one seed; ``pyro-tvc benchmark --full`` runs three).
        epochs: Epochs of the gradient-trained methods.
        max_train: Cap on training images per task.
        eval_samples: Posterior draws of the Monte-Carlo predictions.
        adamerging_steps: AdaMerging's test-time steps (demo size; the paper's 500 in ``benchmark``).
        pretrain_steps: prepare's pre-training steps of theta_0 (as ``prepare --pretrain-steps``).
        finetune_steps: prepare's fine-tuning steps per task (as ``prepare --finetune-steps``).
        diagnose_target: Target of the VTVC run whose posterior is diagnosed.
        device: auto (CUDA when present), cpu or cuda[:i].
        quiet: No progress bars.
    """

    artifacts: Path = DEFAULT_ARTIFACTS
    out: Path = Path("runs") / "demo"
    tasks: list[str] = field(default_factory=lambda: list(DEMO_TASKS))
    targets: list[str] = field(default_factory=lambda: list(DEMO_TARGETS))
    methods: list[str] = field(default_factory=lambda: list(DEMO_METHODS))
    seed: int = 1
    epochs: int = 2
    max_train: int = 500
    eval_samples: int = 4
    adamerging_steps: int = 100
    pretrain_steps: int = 150
    finetune_steps: int = 300
    diagnose_target: str = "mnist"
    device: str = "auto"
    quiet: bool = False

    def __post_init__(self):
        if len(self.tasks) < 2:
            raise ValueError(f"--tasks {self.tasks}: the demo composes vectors, give at least 2 tasks")
        for option, names in (("--targets", self.targets), ("--diagnose-target", [self.diagnose_target])):
            outside = [t for t in names if t not in self.tasks]
            if outside:
                raise ValueError(f"{option} {outside}: not among the demo's --tasks {self.tasks}")


def run_prepare(cfg) -> int:
    from pyro_tvc.prepare import run_prepare as prepare

    table = prepare(cfg)
    print((Path(cfg.out) / "table.md").read_text())
    print(f"prepare: {table['seconds']} s; artefacts in {cfg.out}")
    return 0


def run_train(cfg: TrainConfig) -> int:
    from pyro_tvc.infer import train
    from pyro_tvc.reporting import markdown_table

    from pyro_tvc import distributed

    results = train(cfg)
    if not distributed.is_main():
        return 0  # rank 0 writes and prints (torchrun)
    keys = [k for k in ("zero_shot_accuracy", "mc_accuracy", "mc_accuracy_se", "gated_mc_accuracy",
                        "single_model_accuracy", "mc_nll", "single_model_nll", "exact_zero_fraction",
                        "true_elbo_per_datum", "selected_epoch", "train_seconds") if results.get(k) is not None]
    table = markdown_table(["metric", "value"], [{"metric": k, "value": results[k]} for k in keys],
                           title=f"{cfg.guide} on {cfg.target}, test split (units: docs/glossary.md)")
    (Path(cfg.out) / "results.md").write_text(table)
    print(table)
    print(f"run folder: {cfg.out}")
    return 0


def run_diagnose(cfg) -> int:
    from pyro_tvc.diagnostics.report import diagnose

    out = diagnose(cfg)
    print(f"diagnostics: {Path(out) / 'index.md'}")
    return 0


def run_import(cfg: ImportConfig) -> int:
    from pyro_tvc.checkpoints import import_task_vector

    path = import_task_vector(cfg.finetuned, cfg.artifacts, cfg.task, allow_pickle=cfg.allow_pickle)
    print(f"task vector {cfg.task!r} -> {path}")
    return 0


def run_benchmark(cfg: BenchmarkConfig) -> int:
    from pyro_tvc.experiments import run_benchmark as bench

    from pyro_tvc import distributed

    result = bench(cfg)
    if not distributed.is_main():
        return 0
    print(result["tables"]["markdown"])
    print(f"benchmark folder: {result['out']}")
    return 0


def run_demo(cfg: DemoConfig) -> int:
    from pyro_tvc.data import EMBEDDED_TASKS
    from pyro_tvc.prepare import PrepareConfig

    run_prepare(PrepareConfig(out=cfg.artifacts, tasks=list(cfg.tasks), pretrain_tasks=list(EMBEDDED_TASKS),
                              pretrain_steps=cfg.pretrain_steps, finetune_steps=cfg.finetune_steps,
                              device=cfg.device, quiet=cfg.quiet))
    bench = BenchmarkConfig(artifacts=cfg.artifacts, out=cfg.out / "benchmark", protocols=["target", "addition"],
                            methods=cfg.methods, targets=cfg.targets, pool=list(cfg.tasks), seeds=[cfg.seed],
                            epochs=cfg.epochs,
                            max_train=cfg.max_train, eval_samples=cfg.eval_samples,
                            adamerging_steps=cfg.adamerging_steps, selection_per_task=100, device=cfg.device,
                            quiet=cfg.quiet,
                            resume=(cfg.out / "benchmark" / "config.json").is_file())
    run_benchmark(bench)
    run_dir = cfg.out / f"vtvc-{cfg.diagnose_target}"
    train_cfg = TrainConfig(artifacts=cfg.artifacts, target=cfg.diagnose_target, out=run_dir, guide="gated",
                            tasks=[t for t in cfg.tasks if t != cfg.diagnose_target],
                            rank=16, epochs=max(3, cfg.epochs), max_train=2 * cfg.max_train,
                            eval_samples=cfg.eval_samples,
                            seed=cfg.seed, device=cfg.device, quiet=cfg.quiet, overwrite=True)
    run_train(train_cfg)
    from pyro_tvc.diagnostics.report import DiagnoseConfig

    run_diagnose(DiagnoseConfig(run_dir=run_dir, num_obs=8, draws=100, quiet=cfg.quiet))
    print(f"demo: tables in {cfg.out / 'benchmark' / 'table.md'}; diagnostics in {run_dir / 'diagnostics'}")
    return 0


def _prepare_config():
    from pyro_tvc.prepare import PrepareConfig

    return PrepareConfig


def _diagnose_config():
    from pyro_tvc.diagnostics.report import DiagnoseConfig

    return DiagnoseConfig


COMMANDS: dict[str, Command] = {
    "prepare": Command("prepare", _prepare_config(), run_prepare,
                       "build theta_0, zero-shot heads and task vectors (cached)",
                       "Pre-train (tiny default) or load theta_0, build zero-shot heads, fine-tune one task vector "
                       "per task, and write table.json/table.md of zero-shot and fine-tuned accuracy."),
    "train": Command("train", TrainConfig, run_train, "train VTVC by SVI on one target",
                     "SVI on the target's training split composing the other tasks' vectors per input; writes "
                     "config.json, metrics.json, results.json/.md and per-epoch checkpoints into --out."),
    "diagnose": Command("diagnose", _diagnose_config(), run_diagnose, "ArviZ diagnostics of a training run",
                        "Writes RUN_DIR/diagnostics/: posterior.nc (ArviZ DataTree), summaries, calibration, "
                        "plots and index.md.", positional="run_dir"),
    "benchmark": Command("benchmark", BenchmarkConfig, run_benchmark,
                         "protocols x methods x targets x seeds -> tables and plots",
                         "Target composition, task addition and task negation for every registered method "
                         "(docs/methods.md), cached per cell; writes results.json, results.csv, table.md and plots."),
    "import-vector": Command("import-vector", ImportConfig, run_import,
                             "task vector from a fine-tuned checkpoint of a prepared theta_0",
                             "tau = fine-tuned image encoder - theta_0; reads state dicts, wrapped and open_clip "
                             "checkpoints, safetensors and task_vectors/aTLAS pickles without running their code.",
                             positional="finetuned"),
    "demo": Command("demo", DemoConfig, run_demo, "the main job on the embedded default",
                    "prepare (cached) + a demo-sized benchmark (target composition and task addition, every method, "
                    "one seed) + one VTVC run and its diagnostics; prints both tables."),
}
