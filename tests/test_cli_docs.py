"""scripts/check_cli_docs.py: finds every disagreement between a cli.md and --help texts (on small hand-written
texts), and docs/cli.md agrees with the real command line."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_cli_docs", ROOT / "scripts" / "check_cli_docs.py")
check_cli_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_cli_docs)

DOC = """# Command line

All commands: `--device auto|cpu`, `--seed N`.

## `pyro-tvc train`
    pyro-tvc train --target mnist --epochs 3
Run with `--overwrite` to replace a run.

## `pyro-tvc diagnose RUN_DIR`
`--num-obs`, `--draws` control the sizes; `--artifacts DIR` when the run was copied.
"""

TOP = """usage: pyro-tvc [-h] [--version] COMMAND ...

positional arguments:
  COMMAND
    {train,diagnose}
"""

TRAIN = """usage: pyro-tvc train [-h] [--target TARGET] [--epochs EPOCHS] [--overwrite] [--seed SEED] [--device DEVICE]

options:
  -h, --help            show this help message and exit
  --target TARGET       Target task (needs a prepared head; default: mnist).
  --epochs EPOCHS       Passes over the training split (refused with --not-an-option).
  --overwrite, --no-overwrite
                        Replace a non-empty --out.
  -s SEED, --seed SEED  Random seed (default: 0).
  --device DEVICE       auto, cpu or cuda (default: auto).
"""

DIAGNOSE = """usage: pyro-tvc diagnose [-h] [--num-obs NUM_OBS] [--draws DRAWS] [--artifacts ARTIFACTS] run_dir

positional arguments:
  run_dir               Run folder.

options:
  -h, --help            show this help message and exit
  --num-obs NUM_OBS     Test inputs exported (default: 16).
  --draws DRAWS         Draws per input (default: 200).
  --artifacts ARTIFACTS
                        Artefact folder.
"""


TYRO = """usage: pyro-tvc diagnose [-h] [OPTIONS] PATH

╭─ positional arguments ───────────────────────────────────────────╮
│ PATH                    Run folder written by pyro-tvc train.    │
╰──────────────────────────────────────────────────────────────────╯
╭─ options ────────────────────────────────────────────────────────╮
│ -h, --help              show this help message and exit          │
│ --num-obs INT           Test inputs exported, refused below 1    │
│                         --like-this (default: 16)                │
│ --quiet, --no-quiet     No progress messages. (default: False)   │
╰──────────────────────────────────────────────────────────────────╯
"""


def test_help_options_reads_tyro_boxes():
    assert check_cli_docs.help_options(TYRO) == {"--help", "--num-obs", "--quiet", "--no-quiet"}


def test_help_options_reads_option_lines_only():
    assert check_cli_docs.help_options(TRAIN) == {"--help", "--target", "--epochs", "--overwrite", "--no-overwrite",
                                                  "--seed", "--device"}  # not --not-an-option, --out (descriptions)
    assert check_cli_docs.help_commands(TOP) == {"train", "diagnose"}


def test_agreeing_texts_pass_and_negative_boolean_forms_need_no_mention():
    # tyro gives every boolean a negative form (--overwrite / --no-overwrite): documenting --overwrite covers both
    assert check_cli_docs.compare(DOC, TOP, {"train": TRAIN, "diagnose": DIAGNOSE}) == []
    # but a --no-x without its --x is an option of its own and must be documented
    lone = TRAIN.replace("  --overwrite, --no-overwrite\n", "  --no-overwrite\n")
    assert sorted(check_cli_docs.compare(DOC, TOP, {"train": lone, "diagnose": DIAGNOSE})) == [
        "`pyro-tvc train --help` has --no-overwrite, which the docs do not mention",
        "docs list --overwrite for `pyro-tvc train`, which has no such option"]


def test_every_kind_of_disagreement_is_reported():
    doc = DOC.replace("`--draws`", "`--draw`").replace("## `pyro-tvc diagnose", "## `pyro-tvc diagnos") + \
        "\n## `pyro-tvc export`\nNothing.\n"
    doc = doc.replace("`--seed N`", "`--seed N`, `--verbose`")
    helps = {"train": TRAIN.replace("  --overwrite, --no-overwrite\n", "  --overwrite\n"), "diagnose": DIAGNOSE}
    problems = check_cli_docs.compare(doc, TOP, helps)
    assert sorted(problems) == sorted([
        "command 'diagnose' has no section `pyro-tvc diagnose` in the docs",
        "docs section `pyro-tvc diagnos` names no command of `pyro-tvc --help`",
        "docs section `pyro-tvc export` names no command of `pyro-tvc --help`",
        "docs list --verbose as a common option, but no command has it",
    ])
    doc = DOC.replace("`--draws`", "`--draw`")
    problems = check_cli_docs.compare(doc, TOP, helps)
    assert sorted(problems) == ["`pyro-tvc diagnose --help` has --draws, which the docs do not mention",
                                "docs list --draw for `pyro-tvc diagnose`, which has no such option"]


@pytest.mark.slow
def test_real_cli_agrees_with_docs_cli_md():
    """Runs `pyro-tvc COMMAND --help` for every command (a few seconds each) against docs/cli.md."""
    problems = check_cli_docs.check(ROOT / "docs" / "cli.md", check_cli_docs.default_cli())
    assert problems == [], "\n".join(problems)


def test_script_exit_status(tmp_path):
    """The command-line wrapper: exit 1 and one line per problem (a fake CLI printing the help texts above)."""
    fake = tmp_path / "fake_cli.py"
    fake.write_text("import sys\n"
                    f"texts = {{(): {TOP!r}, ('train',): {TRAIN!r}, ('diagnose',): {DIAGNOSE!r}}}\n"
                    "print(texts[tuple(a for a in sys.argv[1:] if a != '--help')])\n")
    doc = tmp_path / "cli.md"
    doc.write_text(DOC.replace("`--draws`", "`--draw`"))
    assert check_cli_docs.main(["--doc", str(doc), "--cli", sys.executable, str(fake)]) == 1
    doc.write_text(DOC.replace("to replace a run.", "to replace a run (`--no-overwrite`: the default)."))
    assert check_cli_docs.main(["--doc", str(doc), "--cli", sys.executable, str(fake)]) == 0
