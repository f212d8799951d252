"""Command line: `python -m runtime serve ...` and `python -m runtime make-tiny-moe --out DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("make-tiny-moe", help="write the tiny Mixtral-format MoE checkpoint")
    tiny.add_argument("--out", type=Path, required=True, help="folder to write (created if needed)")
    tiny.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command == "make-tiny-moe":
        from runtime.tiny_moe import build_tiny_moe

        print(build_tiny_moe(args.out, seed=args.seed))
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
