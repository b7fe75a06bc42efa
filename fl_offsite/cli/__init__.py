"""``fl-offsite``: the command line. Each command parses arguments and calls the library."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ..errors import UserError
from . import attack, federated, offsite, reference


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-offsite", description="Federated Offsite-Tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (offsite, attack, reference, federated):
        group.add_commands(sub)
    return parser


def _exit(signum, frame):
    """SIGTERM (``kill``, a scheduler's stop) unwinds like Ctrl-C: temporary and half-written
    directories are removed on the way out (their context managers run)."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # the flags written (not defaulted): what a command's --recipe lets them override
    args.given = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    if not getattr(args, "verbose", False):
        from ..quiet import quiet_libraries
        quiet_libraries()
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
