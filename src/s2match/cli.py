"""What every entry script shares: its command line, logging, and one rule for errors.

    python SCRIPT [KEY=VALUE | GROUP=OPTION | +GROUP=OPTION ...]      # conf/ composed with Hydra overrides
    python SCRIPT --params params.yaml [KEY=VALUE ...]                # a composed file (what DVC stages run)
    python SCRIPT -h | --help                                        # usage, config groups, the script's keys

A user error (bad input, bad configuration, an output that cannot be written) is one line on stderr naming the
file, key or value and what to do, with exit status 1; `S2MATCH_DEBUG=1` shows its traceback instead. An interrupted
run (SIGINT, SIGTERM) unwinds, so that every temporary file of `s2match.fileio.atomic_path` is removed, and exits
with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from s2match.config import CONF_DIR, PARAMS_FLAG, config_groups, default_options, load_config, set_pair
from s2match.fileio import INTERRUPTS

DEBUG_ENV = "S2MATCH_DEBUG"
# Errors a user can cause with bad input, configuration or file system: one line, no traceback. ProductError and
# ConfigError are ValueErrors; FileNotFoundError and PermissionError are OSErrors.
USER_ERRORS = (ValueError, OSError, OmegaConfBaseException)
HELP_FLAGS = ("-h", "--help")


class UsageError(ValueError):
    """A command line that cannot be read (an unknown option, a missing argument)."""


class OptionParser(argparse.ArgumentParser):
    """argparse for a script's own options (the benchmark's), with its errors as one-line UsageErrors."""

    def __init__(self, **kwargs) -> None:
        super().__init__(add_help=False, **kwargs)

    def error(self, message: str) -> None:
        raise UsageError(f"{message} (see --help)")


class Interrupted(BaseException):
    """SIGINT or SIGTERM: unwinds like KeyboardInterrupt, so that `finally` clauses remove temporary files."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame) -> None:
    for other in INTERRUPTS:  # a second signal must not cut the clean-up short
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signum)


@contextmanager
def interrupts_unwind() -> Iterator[None]:
    previous = {signum: signal.signal(signum, _interrupt) for signum in INTERRUPTS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def one_line(err: BaseException) -> str:
    """The message of a user error on one line, naming the key or file it is about."""
    if isinstance(err, MissingMandatoryValue):
        return f"{err.full_key}: no value given (it has no default); set it: {err.full_key}=VALUE"
    if isinstance(err, OmegaConfBaseException):
        text = f"{err.full_key}: {err.msg}" if getattr(err, "full_key", None) else str(err)
    elif isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__


def split_arguments(args: list[str], images: bool) -> tuple[str | None, list[str], list[str]]:
    """(params file, positional images, overrides). An override is KEY=VALUE; with `images`, an argument that is
    an existing path, or has no '=', is an image (so that any file name works, '=' included)."""
    params, paths, overrides = None, [], []
    rest = iter(args)
    for arg in rest:
        if arg == PARAMS_FLAG:
            params = next(rest, None)
            if params is None:
                raise UsageError(f"{PARAMS_FLAG} needs a file name (e.g. {PARAMS_FLAG} params.yaml)")
        elif images and (os.path.lexists(arg) or ("=" not in arg and not arg.startswith("--"))):
            paths.append(arg)
        elif "=" not in arg:
            raise UsageError(f"{arg}: unexpected argument; overrides are KEY=VALUE (see --help)")
        else:
            overrides.append(arg)
    if images and len(paths) not in (0, 2):
        raise UsageError(f"two images are needed (IMAGE0 IMAGE1), got {len(paths)}: {' '.join(paths)}")
    return params, paths, overrides


def usage(script: str, doc: str, groups: tuple[str, ...], images: bool, options: OptionParser | None) -> str:
    """--help: what the script does, how to call it, the config groups and the keys of its own groups."""
    positional = "[IMAGE0 IMAGE1] " if images else ""
    own = " [OPTIONS]" if options else ""
    lines = [f"usage: {script}{own} {positional}[KEY=VALUE | GROUP=OPTION | +GROUP=OPTION ...]",
             f"       {script}{own} {PARAMS_FLAG} params.yaml {positional}[KEY=VALUE ...]", "",
             textwrap.dedent(doc).strip(), ""]
    if options:
        lines += [options.format_help().split("\n\n", 1)[-1].strip(), ""]
    defaults = default_options()
    lines.append("config groups (GROUP=OPTION picks conf/GROUP/OPTION.yaml; * the default; +GROUP=OPTION adds a "
                 "group that has no default):")
    for group, names in config_groups().items():
        shown = ", ".join(f"*{name}" if defaults.get(group) == name else name for name in names)
        lines.append(f"  {group:<13} {shown}{'' if group in defaults else '   (+' + group + '=OPTION)'}")
    for group in groups:
        option = defaults[group]
        lines += ["", f"keys of {group} (conf/{group}/{option}.yaml; set one with {group}.KEY=VALUE):"]
        lines += [("  " + line).rstrip() for line in (CONF_DIR / group / f"{option}.yaml").read_text().splitlines()]
    lines += ["", f"A bad input or configuration is one line on stderr and exit status 1 ({DEBUG_ENV}=1 shows "
                  "the traceback)."]
    return "\n".join(lines)


def script_name() -> str:
    """How the running script was called: python SCRIPT, relative to the working folder when inside it."""
    path = Path(sys.argv[0])
    try:
        path = path.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return f"python {path}"


def run(main: Callable[..., int | None], doc: str | None = None, groups: tuple[str, ...] = (), images: bool = False,
        options: OptionParser | None = None, argv: list[str] | None = None) -> None:
    """Read the command line (`argv`, default sys.argv[1:]), run `main(cfg)` (`main(cfg, options)` for a script with
    its own options), exit with its status. `doc` (the script's docstring; default main's) and the keys of `groups`
    make its --help; with `images`, two positional paths are the pair to match (cfg.pair)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in HELP_FLAGS for arg in args):
        print(usage(options.prog if options else script_name(), doc or main.__doc__ or "", groups, images, options))
        sys.exit(0)
    try:
        with interrupts_unwind():
            parsed = None
            if options is not None:
                parsed, args = options.parse_known_args(args)
            params, paths, overrides = split_arguments(args, images)
            cfg = load_config(overrides, params)
            if paths:
                set_pair(cfg, *paths)
            status = main(cfg) if options is None else main(cfg, parsed)
    except Interrupted as err:
        print(f"interrupted ({err}): stopped, temporary files removed", file=sys.stderr)
        sys.exit(128 + err.signum)
    except USER_ERRORS as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(status or 0)

