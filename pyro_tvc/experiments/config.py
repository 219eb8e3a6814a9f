"""The benchmark's configuration (the ``pyro-tvc benchmark`` options are derived from it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pyro_tvc.backbones import TINY_MODEL
from pyro_tvc.methods import get_method, method_names
from pyro_tvc.methods.base import MethodConfig

DEMO_TARGETS = ["mnist", "eurosat5"]
# the demo fine-tunes 5 of the 9 embedded tasks (about 40 % of prepare's time saved; README: the demo)
DEMO_TASKS = ["mnist", "fashion_mnist", "digits", "eurosat5", "resisc45_12"]
DEMO_METHODS = ["zero_shot", "finetuned", "task_arithmetic", "ties", "atlas", "adamerging", "metanet",
                "task_level_vi", "vtvc_gated", "vtvc_ungated"]
FULL_PROTOCOLS = ["target", "addition", "negation"]
ISSUE_TARGETS = ["mnist", "cifar10", "dtd10"]  # where every ablation and model variant is compared
MAIN_METHODS = DEMO_METHODS
NEGATION_METHODS = ["zero_shot", "task_arithmetic", "ties", "atlas", "metanet", "vtvc_gated", "vtvc_ungated"]


def full_grid() -> list[tuple[str, list[str] | None, list[str] | None]]:
    """The committed benchmark, sized for 2 CPU cores: (protocol, methods or None = all, targets or None = all).
    Every method on all 9 targets would take about 5 CPU-hours here; the ablations and model variants are compared
    on the three targets of issue 11, the main methods everywhere."""
    return [("target", MAIN_METHODS, None), ("target", None, ISSUE_TARGETS), ("addition", MAIN_METHODS, None),
            ("negation", NEGATION_METHODS, None)]


@dataclass
class BenchmarkConfig:
    """Protocols x methods x targets x seeds on prepared artefacts.

    Args:
        artifacts: folder written by ``pyro-tvc prepare``.
        out: run folder (cells/, results.json, results.csv, table.md, plots).
        protocols: any of target, addition, negation.
        methods: registered method names (``pyro-tvc benchmark --list`` shows them); default: every method that
            serves the protocol.
        targets: targets of target composition and negation (default: every prepared task).
        pool: task vectors to compose (default: every prepared vector but the target's).
        seeds: seeds (each >= 1); means and standard deviations are taken over them, paired across methods.
        shots: k labelled training images per class for target composition (aTLAS's few-shot setting; None: all).
        max_train: cap on training images per task (None: all).
        data_root: folder of real data sets (torchvision layout, as ``prepare --data-root``) for targets and pool
            tasks that are real sets prepared from it; read with the model's own preprocessing, streamed.
        epochs: epochs of the gradient-trained methods (the best validation epoch is kept).
        batch_size: minibatch size of the gradient-trained methods.
        rank: rank of the per-sample methods' low-rank composition (None: full rank).
        lr: learning rate of the per-sample methods.
        eval_samples: posterior draws of the Monte-Carlo predictions.
        adamerging_steps: AdaMerging's test-time steps (paper: 500).
        negation_control: control task of negation (must keep >= 95 % of its zero-shot accuracy).
        selection_per_task: held-out train inputs per task for model selection in addition and negation.
        full: the committed benchmark (:func:`full_grid`): the main methods on every target and protocol, the
            ablations and model variants on mnist, cifar10 and dtd10, 3 seeds (overrides the lists; writes to
            results/ unless --out is given).
        report_only: build the tables from the finished cells only, computing nothing.
        resume: continue an interrupted run in ``out`` (finished cells are reused).
        overwrite: replace an existing ``out``.
        device: auto (CUDA when present), cpu or cuda[:i].
        quiet: no progress bars.
    """

    artifacts: Path = Path("artifacts") / TINY_MODEL
    out: Path = Path("runs") / "benchmark"
    protocols: list[str] = field(default_factory=lambda: ["target", "addition"])
    methods: list[str] | None = None
    targets: list[str] | None = None
    pool: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [1])
    shots: int | None = None
    max_train: int | None = 1000
    data_root: Path | None = None
    epochs: int = 5
    batch_size: int = 64
    rank: int | None = 16
    lr: float = 1e-2
    eval_samples: int = 8
    adamerging_steps: int = 500
    negation_control: str = "cifar10"
    selection_per_task: int = 200
    full: bool = False
    report_only: bool = False
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    quiet: bool = False

    def __post_init__(self):
        from pyro_tvc.protocols import PROTOCOLS

        if self.full:
            self.protocols, self.methods, self.targets = list(FULL_PROTOCOLS), None, None
            self.seeds = [1, 2, 3]
            if self.out == Path("runs") / "benchmark":
                self.out = Path("results")  # the committed results (README)
        if not self.protocols:
            raise ValueError("--protocols is empty; accepted: " + ", ".join(PROTOCOLS))
        for p in self.protocols:
            if p not in PROTOCOLS:
                raise ValueError(f"unknown protocol {p!r}; accepted: {', '.join(PROTOCOLS)}")
        for m in self.methods or []:
            get_method(m)  # raises, listing the known methods
        if self.methods is not None and not self.methods:
            raise ValueError("--methods is empty; known methods: " + ", ".join(method_names()))
        if not self.seeds or any(s <= 0 for s in self.seeds):
            raise ValueError(f"--seeds must be positive integers, got {self.seeds}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds has duplicates: {self.seeds}")
        if self.pool is not None and not self.pool:
            raise ValueError("--pool is empty: give task names with prepared vectors, or leave it out")
        for name, value in (("shots", self.shots), ("max_train", self.max_train), ("rank", self.rank)):
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name, value in (("epochs", self.epochs), ("batch_size", self.batch_size),
                            ("eval_samples", self.eval_samples),
                            ("adamerging_steps", self.adamerging_steps),
                            ("selection_per_task", self.selection_per_task)):
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: choose one")
        from pyro_tvc.infer import check_data_root

        check_data_root(self.data_root)

    def method_config(self) -> MethodConfig:
        return MethodConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, rank=self.rank,
                            eval_samples=self.eval_samples, max_train=self.max_train,
                            adamerging_steps=self.adamerging_steps)

    def methods_for(self, protocol: str) -> list[str]:
        names = method_names(protocol)
        return names if self.methods is None else [m for m in self.methods if m in names]
