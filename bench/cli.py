"""The ``purebench`` command: run, train, leaderboard, data."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

USAGE = """purebench <command> [args]

commands:
  run [overrides...]        evaluate (the Hydra app of `python -m bench`), e.g.
                            purebench run dataset=digits suite=pgd n_samples=64
  train [overrides...]      train or find in the cache one classifier, e.g.
                            purebench train classifier=small_cnn_at
                            or one purifier part, e.g.
                            purebench train purifier=score dataset=fashion_mnist
  leaderboard [DIR]         records under DIR (default results) -> results/leaderboard.
                            {md,csv,html} and results/figures/*.png (--out elsewhere)
  data NAME [--download]    make a dataset available (fashion_mnist from Debian's package)

`purebench run --help` (or `python -m bench --help`) lists the config groups with their options,
the main keys and examples. A bad value ends in one line `error: ...`; add --debug to any run or
train command for the full traceback.
"""

GRAMMAR_URL = "https://hydra.cc/docs/advanced/override_grammar/basic/"


class ReportedError(BaseException):
    """A user's error on its way from a task function to :func:`run_app`.

    A ``BaseException`` so that Hydra's job machinery, which catches ``Exception`` and prints
    "Error executing job with overrides: ..." on stderr before re-raising it, lets it pass.

    Args:
        error: the error to report in one line.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _State:
    """Whether :func:`run_app` is reporting errors in one line (the task function asks)."""

    one_line = False


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` comes from what the user passed: a PureBench, Hydra or OmegaConf error."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from common.errors import PureBenchError

    return isinstance(err, (PureBenchError, HydraException, OmegaConfBaseException))


def reported(err: BaseException) -> ReportedError | None:
    """What a task function raises in place of ``err`` (``None``: re-raise ``err`` itself).

    Only under :func:`run_app` without ``--debug``, and only for user errors: a bug keeps its
    traceback.
    """
    return ReportedError(err) if _State.one_line and is_user_error(err) else None


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Let errors reach the caller instead of Hydra's report (a stripped traceback, exit 1)."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    # Hydra's run_and_report re-raises instead of printing when this is 1.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _State.one_line = True
    try:
        yield
    finally:
        _State.one_line = False
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


def run_app(app: Callable[[], object], help_page: Callable[[], str] | None = None) -> None:
    """Run a ``@hydra.main`` app on ``sys.argv`` with PureBench's help page and one-line errors.

    ``--help``/``-h`` print ``help_page()`` (when given) instead of Hydra's page. A user error
    (see :func:`is_user_error`) prints ``error: <message>`` on stderr and exits with status 2;
    ``--debug`` (taken out before Hydra parses the arguments) or ``HYDRA_FULL_ERROR=1`` shows
    the full traceback instead.
    """
    argv = [arg for arg in sys.argv[1:] if arg != "--debug"]
    debug = len(argv) < len(sys.argv) - 1 or os.environ.get("HYDRA_FULL_ERROR") == "1"
    sys.argv = [sys.argv[0], *argv]
    if help_page is not None and ("--help" in argv or "-h" in argv):
        sys.stdout.write(help_page())
        return
    if debug:
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's own errors keep their whole traceback
        app()
        return
    with _one_line_errors():
        try:
            app()
        except ReportedError as err:
            _fail(one_line(err.error, argv))
        except Exception as err:
            if not is_user_error(err):
                raise
            _fail(one_line(err, argv))


def _fail(message: str) -> None:
    """Print ``error: message`` on stderr and exit with status 2 (bad usage)."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


def one_line(err: BaseException, argv: Sequence[str] = ()) -> str:
    """``err`` as one line that names the bad value and what is allowed.

    Hydra's messages for an unknown option, an unknown key and a bad override span several lines
    and suggest nothing; they are rewritten with a "did you mean" from the allowed names.
    """
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    from common.errors import PureBenchError

    if isinstance(err, HydraException) and isinstance(err.__cause__, PureBenchError):
        # instantiate() wraps what a constructor raised; ours already names the bad value.
        return one_line(err.__cause__, argv)
    if isinstance(err, MissingConfigException) and "/" in (err.missing_cfg_file or ""):
        return _not_an_option(err.missing_cfg_file, err.options)
    if isinstance(err, OverrideParseException):
        reason = _join(err.message.splitlines()[:1])
        return f"{err.override!r} is not a valid override ({reason}); see {GRAMMAR_URL}"
    unknown = _unknown_key(err, argv)
    if unknown is not None:
        return unknown
    lines = str(err).splitlines()
    cause = err.__cause__
    if cause is not None and type(cause).__module__.startswith("omegaconf"):
        lines += str(cause).splitlines()[:1]  # Hydra prints it below its own message too
    text = _join(lines)
    # Our --debug is the way to see it, and it works for every error.
    return text.replace("set env var HYDRA_FULL_ERROR=1", "run with --debug")


def _join(lines: Sequence[str]) -> str:
    """Lines of a message as one: after a full stop a space, else a semicolon."""
    text = ""
    for line in (line.strip() for line in lines):
        if line:
            text += line if not text else (" " if text[-1] in ".:;,!?" else "; ") + line
    return text


def _did_you_mean(name: str, allowed: Sequence[str]) -> str:
    """``"; did you mean x?"`` for the names of ``allowed`` close to ``name``, else ``""``."""
    close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.75)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _not_an_option(missing: str, options: Sequence[str] | None) -> str:
    """The message for ``group=name`` when ``conf/group/name.yaml`` does not exist."""
    group, name = missing.rsplit("/", 1)
    if not options:
        from bench.config import CONF_DIR
        from bench.help import options as listed

        options = listed(CONF_DIR, group)
    if not options:
        return f"{group}={name}: there is no config group {group}"
    return (
        f"{group}={name} is not an option of {group}{_did_you_mean(name, options)} "
        f"(options: {', '.join(options)})"
    )


def _unknown_key(err: BaseException, argv: Sequence[str]) -> str | None:
    """The message for an override of a key the config does not have, or ``None``."""
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    parent = getattr(cause, "parent_node", None)
    if not full_key or parent is None or "is not in struct" not in str(cause):
        return None
    where, _, name = str(full_key).rpartition(".")
    keys = sorted(str(k) for k in parent.keys() if k != "hydra")
    given = next((a for a in argv if a.lstrip("+~").split("=", 1)[0] == full_key), full_key)
    return (
        f"{given}: {name} is not a key of {where or 'the config'}{_did_you_mean(name, keys)} "
        f"(keys: {', '.join(keys)}; +{full_key}=... adds a new one)"
    )


def _hydra_app(name: str, argv: list[str]) -> None:
    """``purebench run|train``: the Hydra app, with one-line errors (and, for run, the help)."""
    # Hydra parses sys.argv itself; hand it the overrides as if it had been called directly.
    sys.argv = [f"purebench {name}", *argv]
    if name == "run":
        from bench.run import main

        main()  # bench.run.main goes through run_app itself, as `python -m bench` does
        return
    if any(arg.startswith("purifier=") for arg in argv):
        from bench.train import part_main as app
    else:
        from bench.train import classifier_main as app
    run_app(app)


def _leaderboard(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="purebench leaderboard")
    parser.add_argument("dir", nargs="?", default="results", help="where to look for record.json")
    parser.add_argument(
        "--out", default="results", help="where leaderboard.{md,csv,html} and figures/ go"
    )
    args = parser.parse_args(argv)
    from bench.reporting.leaderboard import ShardConflictError, write_leaderboard

    try:
        written = write_leaderboard(Path(args.dir), Path(args.out))
    except ShardConflictError as err:
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from None
    # stdout is the Markdown page itself (pipe it anywhere); the paths go to the log.
    sys.stdout.write(written.md.read_text(encoding="utf-8"))
    log = logging.getLogger(__name__)
    log.info("wrote %s, %s and %s", written.md, written.csv, written.html)
    for path in written.figures.values():
        log.info("wrote %s", path)


def _data(argv: list[str]) -> None:
    from bench.data import DATASET_NAMES, prepare

    parser = argparse.ArgumentParser(prog="purebench data")
    parser.add_argument("name", help=", ".join(DATASET_NAMES))
    parser.add_argument(
        "--root", default=None, help="data dir (default: $PUREBENCH_DATA_DIR or data)"
    )
    parser.add_argument("--download", action="store_true", help="allow torchvision's download")
    args = parser.parse_args(argv)
    root = args.root or os.environ.get("PUREBENCH_DATA_DIR", "data")
    path = prepare(args.name, root, download=args.download)
    logging.getLogger(__name__).info("%s is ready in %s", args.name, path)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``purebench`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return
    command, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if command in ("run", "train"):
        _hydra_app(command, rest)
    elif command == "leaderboard":
        _leaderboard(rest)
    elif command == "data":
        from common.errors import PureBenchError

        try:
            _data(rest)
        except PureBenchError as err:
            sys.stderr.write(f"error: {err}\n")
            raise SystemExit(2) from None
    else:
        sys.stderr.write(f"unknown command {command!r}\n\n{USAGE}")
        raise SystemExit(2)


if __name__ == "__main__":
    main()
