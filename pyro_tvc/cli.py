"""The ``pyro-tvc`` command line. Each sub-command has ``--help``; see docs/cli.md for examples."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pyro_tvc.backbones import TINY_MODEL

DEFAULT_ARTIFACTS = Path("artifacts") / TINY_MODEL


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda[:i] (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="build theta_0, zero-shot heads and task vectors (cached)",
                       description="Pre-train (tiny default) or load theta_0, build zero-shot heads, fine-tune one task "
                                   "vector per task, and write table.json/table.md of zero-shot and fine-tuned accuracy.")
    p.add_argument("--out", type=Path, default=DEFAULT_ARTIFACTS, help=f"artefact folder (default: {DEFAULT_ARTIFACTS})")
    p.add_argument("--model", default=TINY_MODEL, help=f"open_clip model name (default: {TINY_MODEL})")
    p.add_argument("--pretrained", type=Path, help="local CLIP checkpoint for --model (skips pre-training)")
    p.add_argument("--data-root", type=Path, help="folder of real datasets (torchvision layout); default: embedded sets")
    p.add_argument("--tasks", nargs="+", help="tasks to prepare (default: all embedded tasks)")
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-train", type=int, help="cap on training images per task (fast mode)")
    _add_common(p)


def _cmd_prepare(args) -> int:
    from pyro_tvc.prepare import PrepareConfig, run_prepare

    cfg = PrepareConfig(out=args.out, model=args.model, pretrained=args.pretrained, data_root=args.data_root,
                        pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
                        batch_size=args.batch_size, max_train=args.max_train, seed=args.seed, device=args.device,
                        quiet=args.quiet)
    if args.tasks:
        cfg.tasks = args.tasks
    table = run_prepare(cfg)
    print((Path(cfg.out) / "table.md").read_text())
    print(f"prepare: {table['seconds']} s; artefacts in {cfg.out}")
    return 0


def _train_parser(sub) -> None:
    from pyro_tvc.infer import GUIDES, TrainConfig

    d = TrainConfig(artifacts=Path("."), target="", out=Path("."))
    p = sub.add_parser("train", help="train VTVC by SVI on one target with the other tasks' vectors",
                       description="SVI on the target's training split; writes config.json, metrics.json, "
                                   "results.json/.md and per-epoch checkpoints into --out.")
    p.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS, help="folder written by `pyro-tvc prepare`")
    p.add_argument("--target", default="mnist", help="target task (default: mnist)")
    p.add_argument("--tasks", nargs="+", help="task vectors to compose (default: every prepared task but the target)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<target>-<guide>)")
    p.add_argument("--guide", choices=GUIDES, default=d.guide, help=f"variational family (default: {d.guide})")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--kl-weight", type=float, default=d.kl_weight,
                   help=f"multiplies the KL (1 = the true ELBO; default {d.kl_weight})")
    p.add_argument("--particles", type=int, default=d.particles, help="Monte-Carlo draws per step")
    p.add_argument("--rank", type=int, help="compose through rank-r task vectors (default: full rank)")
    p.add_argument("--parts", type=int, default=1, help="random parts per block (aTLAS x K)")
    p.add_argument("--inclusion-prob", type=float, default=d.inclusion_prob, help="prior pi")
    p.add_argument("--slab-scale", type=float, default=d.slab_scale, help="prior slab standard deviation")
    p.add_argument("--learn-inclusion", choices=("none", "global", "per_task"), default=d.learn_inclusion)
    p.add_argument("--max-scale", type=float, default=d.max_scale, help="cap on the posterior scale sigma")
    p.add_argument("--cv-max", type=float, default=d.gate.cv_max, help="gate: reliable if sigma/|mu| <= this")
    p.add_argument("--inclusion-min", type=float, default=d.gate.inclusion_min, help="gate: reliable if gamma >= this")
    p.add_argument("--importance-min", type=float, default=d.gate.importance_min, help="gate: pruned if gamma|mu| < this")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="posterior draws for the MC predictive")
    p.add_argument("--max-train", type=int, help="cap on training images (fast mode)")
    _add_common(p)


def _cmd_train(args) -> int:
    from pyro_tvc.guides import GateConfig
    from pyro_tvc.infer import TrainConfig, train
    from pyro_tvc.reporting import markdown_table
    from pyro_tvc.runtime import command_line

    out = args.out or Path("runs") / f"{args.target}-{args.guide}"
    cfg = TrainConfig(artifacts=args.artifacts, target=args.target, out=out, tasks=args.tasks, guide=args.guide,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, kl_weight=args.kl_weight,
                      particles=args.particles, rank=args.rank, parts=args.parts, inclusion_prob=args.inclusion_prob,
                      slab_scale=args.slab_scale, learn_inclusion=args.learn_inclusion, max_scale=args.max_scale,
                      gate=GateConfig(args.importance_min, args.inclusion_min, args.cv_max),
                      eval_samples=args.eval_samples, max_train=args.max_train, seed=args.seed, device=args.device,
                      quiet=args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(command_line() + "\n")
    results = train(cfg)
    keys = ["zero_shot_accuracy", "mc_accuracy", "gated_accuracy", "mc_nll", "gated_nll", "sparsity",
            "true_elbo_per_datum", "train_seconds"]
    table = markdown_table(["metric", "value"], [{"metric": k, "value": results[k]} for k in keys],
                           title=f"VTVC ({cfg.guide}) on {cfg.target}, test split")
    (out / "results.md").write_text(table)
    print(table)
    print(f"run folder: {out}")
    return 0


def _diagnose_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="ArviZ posterior diagnostics of a training run",
                       description="Writes RUN_DIR/diagnostics/: posterior.nc (ArviZ DataTree), coefficients.csv, "
                                   "inputs.csv, summary.json, PNG plots and index.md linking them.")
    p.add_argument("run_dir", type=Path, help="a folder written by `pyro-tvc train`")
    p.add_argument("--num-obs", type=int, default=16, help="test inputs whose posteriors are exported (default 16)")
    p.add_argument("--draws", type=int, default=200, help="posterior draws per input (default 200)")
    p.add_argument("--mc-samples", type=int, default=16, help="draws for the MC predictive on the whole test split")
    p.add_argument("--seed", type=int, default=0)


def _cmd_diagnose(args) -> int:
    from pyro_tvc.diagnostics.report import diagnose

    out = diagnose(args.run_dir, args.num_obs, args.draws, args.mc_samples, args.seed)
    print(f"diagnostics: {out / 'index.md'}")
    return 0


def _import_parser(sub) -> None:
    p = sub.add_parser("import-vector", help="build a task vector from a fine-tuned checkpoint of a prepared theta_0",
                       description="tau = fine-tuned image encoder - theta_0, from a plain state dict, an open_clip "
                                   "checkpoint or safetensors; whole pickled modules (task_vectors' format) only with "
                                   "--allow-pickle, because unpickling runs code from the file.")
    p.add_argument("finetuned", type=Path, help="fine-tuned checkpoint file")
    p.add_argument("--task", required=True, help="task name (file name of the vector)")
    p.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS, help="folder holding theta_0 (clip.safetensors)")
    p.add_argument("--allow-pickle", action="store_true", help="allow unpickling whole modules (trusted files only)")


def _cmd_import(args) -> int:
    from pyro_tvc.artifacts import ArtifactPaths, load_clip
    from pyro_tvc.backbones import image_encoder
    from pyro_tvc.task_vectors import TaskVector, image_encoder_state, load_checkpoint

    paths = ArtifactPaths(args.artifacts)
    model, name = load_clip(paths.clip)
    theta0 = image_encoder(model).state_dict()
    finetuned = image_encoder_state(load_checkpoint(args.finetuned, allow_pickle=args.allow_pickle))
    vector = TaskVector.from_state_dicts(theta0, finetuned, task=args.task, backbone=name)
    vector.save(paths.task_vector(args.task))
    print(f"task vector {args.task!r} ({len(vector.params)} blocks) -> {paths.task_vector(args.task)}")
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job: prepare the embedded default, then train VTVC on one target",
                       description="Runs `prepare` (cached), `train --guide gated` and `diagnose` on the embedded "
                                   "default, then writes runs/demo/summary.md with the tables.")
    p.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS)
    p.add_argument("--target", default="mnist")
    p.add_argument("--out", type=Path, default=Path("runs") / "demo")
    _add_common(p)


def _cmd_demo(args) -> int:
    common = ["--device", args.device, "--seed", str(args.seed)] + (["--quiet"] if args.quiet else [])
    if main(["prepare", "--out", str(args.artifacts), *common]) != 0:
        return 1
    if main(["train", "--artifacts", str(args.artifacts), "--target", args.target, "--out", str(args.out), *common]):
        return 1
    if main(["diagnose", str(args.out), "--seed", str(args.seed)]):
        return 1
    summary = (args.artifacts / "table.md").read_text() + "\n" + (args.out / "results.md").read_text()
    (args.out / "summary.md").write_text(summary)
    print(f"demo summary: {args.out / 'summary.md'}")
    return 0


COMMANDS = {"prepare": (_prepare_parser, _cmd_prepare), "train": (_train_parser, _cmd_train),
            "diagnose": (_diagnose_parser, _cmd_diagnose), "import-vector": (_import_parser, _cmd_import),
            "demo": (_demo_parser, _cmd_demo)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-tvc", description="Variational Task Vector Composition with Pyro.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs a warning for every randomly initialised model
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"pyro-tvc {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
