"""The ``pyro-tvc`` command line. Every command's options are derived from its config dataclass by tyro
(docs/cli.md; docs/design-decisions.md says why tyro): a documented field is an option ``--field-name``, and every
command also takes ``--config FILE`` (JSON or TOML holding any of those fields; options given on the command line
win). ``--debug`` shows the traceback of an error; ``--version`` prints the version.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import sys
import tomllib
import traceback
import warnings
from pathlib import Path

from pyro_tvc import commands

COMMANDS: dict[str, commands.Command] = commands.COMMANDS


def _load_config_file(path: Path, cls) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"--config {path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({err})")
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a table/object of options, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    # A run folder's config.json also records provenance (versions, commit, ...): keep only the options.
    return {k: v for k, v in data.items() if k in known}


def _from_dict(cls, data: dict):
    """Build ``cls`` from plain values (nested dataclasses from dicts, paths from strings)."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        default = hints[key].default_factory() if hints[key].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = dataclasses.replace(default, **value)
        elif isinstance(value, str) and "Path" in str(hints[key].type):
            value = Path(value)
        kwargs[key] = value
    return kwargs


def _split_global(argv: list[str]) -> tuple[list[str], bool, Path | None]:
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    config = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a file")
        config = Path(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    return argv, debug, config


def _parse(command: commands.Command, argv: list[str], config: Path | None):
    import tyro

    if command.positional and argv and not argv[0].startswith("-"):
        argv = [f"--{command.positional.replace('_', '-')}", *argv]
    default = None
    if config is not None:
        fields = _from_dict(command.config, _load_config_file(config, command.config))
        try:
            default = command.config(**fields)
        except TypeError:  # required fields missing from the file: let the command line supply them
            default = None
            argv = [*[a for k, v in fields.items() for a in _as_args(k, v)], *argv]
    cls = command.config
    # tyro turns a ValueError raised while building the config into a boxed multi-line message; parse with the
    # validation switched off, then build the config ourselves so a bad value ends in our one-line error.
    post_init = cls.__dict__.get("__post_init__")
    if post_init is not None:
        cls.__post_init__ = lambda self: None
    captured = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(captured):
            warnings.simplefilter("ignore")  # tyro warns about defaults it cannot display; nothing to act on
            parsed = tyro.cli(cls, args=argv, default=default, prog=f"pyro-tvc {command.name}",
                              description=command.description)
    except SystemExit as exit_:
        if exit_.code:  # a parse error: tyro drew a box; keep its words on one line
            raise ValueError(_one_line(captured.getvalue())) from None
        raise
    finally:
        if post_init is not None:
            cls.__post_init__ = post_init
    return cls(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(cls) if f.init})


def _one_line(boxed: str) -> str:
    words = []
    for line in boxed.splitlines():
        text = line.strip().strip("│╭╰─╮╯┃━ ").strip()
        if text and not text.startswith(("For full helptext", "usage:")) and set(text) - set("─━"):
            words.append(text)
    return " ".join(words) or "invalid arguments (see --help)"


def _as_args(key: str, value) -> list[str]:
    flag = f"--{key.replace('_', '-')}"
    if isinstance(value, bool):
        return [flag] if value else [f"--no-{key.replace('_', '-')}"]
    if isinstance(value, list):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def _usage() -> str:
    lines = ["usage: pyro-tvc COMMAND [OPTIONS]   (pyro-tvc COMMAND --help for its options)", "",
             "Variational Task Vector Composition with Pyro.", "", "commands:"]
    lines += [f"  {name:<14} {c.summary}" for name, c in COMMANDS.items()]
    lines += ["", "global options: --config FILE (JSON/TOML options), --debug (tracebacks), --version, --help"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs a warning for every randomly initialised model
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"pyro-tvc {version('pyro-tvc')}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pyro-tvc: error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    debug = "--debug" in rest
    try:
        from pyro_tvc.runs import set_command

        set_command(["pyro-tvc", name, *rest])
        rest, debug, config = _split_global(rest)
        cfg = _parse(COMMANDS[name], rest, config)
        return COMMANDS[name].run(cfg)
    except SystemExit as exit_:  # tyro: --help (0) or a parse error it already printed (2)
        return int(exit_.code or 0) if isinstance(exit_.code, int) else 2
    except (FileNotFoundError, ValueError, RuntimeError, OSError, KeyError) as err:
        if debug:
            traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"pyro-tvc {name}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyro-tvc {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
