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


COMMANDS = {"prepare": (_prepare_parser, _cmd_prepare)}


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
