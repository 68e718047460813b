"""The ``purebench`` command: run, train, leaderboard, data."""

from __future__ import annotations

import argparse
import logging
import sys
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
"""


def _hydra_app(name: str, argv: list[str]) -> None:
    # Hydra parses sys.argv itself; hand it the overrides as if it had been called directly.
    sys.argv = [f"purebench {name}", *argv]
    if name == "run":
        from bench.run import main
    elif any(arg.startswith("purifier=") for arg in argv):
        from bench.train import part_main as main
    else:
        from bench.train import classifier_main as main
    main()


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
    parser = argparse.ArgumentParser(prog="purebench data")
    parser.add_argument("name", help="fashion_mnist, mnist, cifar10, cifar100, svhn or digits")
    parser.add_argument(
        "--root", default=None, help="data dir (default: $PUREBENCH_DATA_DIR or data)"
    )
    parser.add_argument("--download", action="store_true", help="allow torchvision's download")
    args = parser.parse_args(argv)
    import os

    from bench.data import prepare

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
