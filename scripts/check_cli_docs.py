"""Check that docs/cli.md and the command line agree, option by option, in both directions.

* Every ``--option`` written in a command's section of docs/cli.md (a heading ``## `pyro-tvc COMMAND ...` ``) must
  be an option of ``pyro-tvc COMMAND --help``; an option written before the first command section (the options
  common to all commands) must be an option of at least one command.
* Every option of ``pyro-tvc COMMAND --help`` must be written in that command's section or in the common part.
* Every command of ``pyro-tvc --help`` must have a section, and every section must name a command.

Options are read from the help text's option lines only (``  -s, --seed SEED   help``), not from descriptions that
mention other options. Usage: ``python scripts/check_cli_docs.py [--doc docs/cli.md] [--cli pyro-tvc]``; exit
status 1 with one line per disagreement, 0 when they agree.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

OPTION = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")
SECTION = re.compile(r"^#{2,4}\s+`pyro-tvc\s+([\w-]+)[^`]*`", re.M)
IGNORED = {"--help"}  # every command has it; documenting it would be noise
# Handled by pyro-tvc before tyro parses a command, so absent from every --help: documented once, in the common part.
GLOBAL = {"--config", "--debug", "--version"}


def doc_options(markdown: str) -> tuple[set[str], dict[str, set[str]]]:
    """``(common, {command: options})`` written in a cli.md text: options before the first command section are
    common; each later section's options belong to its command (up to the next section)."""
    matches = list(SECTION.finditer(markdown))
    common = set(OPTION.findall(markdown[:matches[0].start()] if matches else markdown))
    sections: dict[str, set[str]] = {}
    for m, nxt in zip(matches, [*matches[1:], None]):
        body = markdown[m.start():nxt.start() if nxt else len(markdown)]
        sections.setdefault(m.group(1), set()).update(OPTION.findall(body))
    return common, sections


def help_options(text: str) -> set[str]:
    """Options defined in an argparse, jsonargparse or tyro ``--help`` text: the long options of option lines (a
    line whose first non-blank character, after tyro's box border ``│``, is ``-`` within a few columns), before the
    help column (two or more spaces). Wrapped description lines are indented further and never read."""
    found = set()
    for line in text.splitlines():
        inner = line.lstrip()[1:] if line.lstrip().startswith("│") else line
        if not re.match(r"\s{1,6}-", inner):
            continue
        spec = re.split(r"\s{2,}", inner.strip().rstrip("│").strip())[0]
        found.update(OPTION.findall(spec))
    return found


def help_commands(text: str) -> set[str]:
    """Sub-commands listed in the top-level help as ``{a,b,c}``; empty when the help shows none."""
    m = re.search(r"\{([\w,-]+)\}", text)
    return set(m.group(1).split(",")) if m else set()


def compare(markdown: str, top_help: str, helps: dict[str, str]) -> list[str]:
    """Every disagreement between a cli.md text and the help texts (``helps``: command -> its ``--help``)."""
    common, sections = doc_options(markdown)
    problems = []
    commands = help_commands(top_help) or set(helps)
    for cmd in sorted(commands - set(sections)):
        problems.append(f"command {cmd!r} has no section `pyro-tvc {cmd}` in the docs")
    for cmd in sorted(set(sections) - commands):
        problems.append(f"docs section `pyro-tvc {cmd}` names no command of `pyro-tvc --help`")
    real = {cmd: help_options(helps[cmd]) - IGNORED for cmd in sorted(commands & set(sections)) if cmd in helps}
    for cmd, opts in real.items():
        # a boolean's negative form (tyro: --quiet / --no-quiet) is covered by documenting its positive form
        negatives = {o for o in opts if o.startswith("--no-") and "--" + o[5:] in opts}
        for opt in sorted(sections[cmd] - opts - IGNORED - GLOBAL):
            problems.append(f"docs list {opt} for `pyro-tvc {cmd}`, which has no such option")
        for opt in sorted(opts - negatives - sections[cmd] - common):
            problems.append(f"`pyro-tvc {cmd} --help` has {opt}, which the docs do not mention")
    everywhere = set().union(*real.values()) if real else set()
    for opt in sorted(common - everywhere - IGNORED - GLOBAL):
        problems.append(f"docs list {opt} as a common option, but no command has it")
    return problems


def cli_help(cli: list[str], *args: str) -> str:
    """The text of ``CLI *args --help`` (stdout); raises RuntimeError with stderr when the command fails."""
    proc = subprocess.run([*cli, *args, "--help"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join([*cli, *args])} --help` exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def default_cli() -> list[str]:
    """``pyro-tvc`` next to this Python (the project's venv), else on PATH, else ``python -m pyro_tvc``."""
    here = Path(sys.executable).with_name("pyro-tvc")
    if here.exists():
        return [str(here)]
    found = shutil.which("pyro-tvc")
    return [found] if found else [sys.executable, "-m", "pyro_tvc"]


def check(doc: Path, cli: list[str]) -> list[str]:
    """Run every ``--help`` (two at a time) and compare with ``doc``."""
    markdown = Path(doc).read_text(encoding="utf-8")
    top = cli_help(cli)
    _, sections = doc_options(markdown)
    commands = sorted(help_commands(top) or set(sections))
    with ThreadPoolExecutor(max_workers=2) as pool:
        texts = dict(zip(commands, pool.map(lambda c: _try_help(cli, c), commands)))
    problems = [f"`pyro-tvc {c} --help` failed: {t[1]}" for c, t in texts.items() if isinstance(t, tuple)]
    helps = {c: t for c, t in texts.items() if isinstance(t, str)}
    return problems + compare(markdown, top, helps)


def _try_help(cli, command):
    try:
        return cli_help(cli, command)
    except RuntimeError as err:
        return ("error", str(err))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "cli.md",
                        help="the Markdown file to check (default: docs/cli.md)")
    parser.add_argument("--cli", nargs="+", help="the command to run (default: the venv's pyro-tvc)")
    args = parser.parse_args(argv)
    problems = check(args.doc, args.cli or default_cli())
    for p in problems:
        print(p)
    if not problems:
        print(f"{args.doc}: every option agrees with --help")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
