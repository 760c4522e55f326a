"""The `centroidkv` command: `centroidkv <subcommand> ...` (subcommands: eval)."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: centroidkv eval [options]   (centroidkv eval --help for the options)")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "eval":
        from .eval.cli import main as eval_main
        return eval_main(rest)
    print(f"centroidkv: unknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
