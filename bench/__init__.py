"""Benchmarks (one command each; results in bench/results/*.json) and what they share."""

import sys


def portable_command(script: str, args) -> str:
    """The command as it was given, with this machine's folders named by their flags (WORKDIR, OUT)."""
    words = []
    for w in sys.argv[1:]:
        if args.workdir and w == str(args.workdir):
            w = "WORKDIR"
        elif args.out and w == str(args.out):
            w = "OUT.json"
        words.append(w)
    return f"python bench/{script} " + " ".join(words)
