"""`flashlm` command line: one entry point, subcommands implemented by their own modules.

Each subcommand module exposes ``main(argv: list[str] | None = None) -> int`` and parses its own
flags, so `flashlm bench ...` and `python -m flashlm.bench ...` behave the same.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "bench": ("flashlm.bench.cli", "benchmark default vs flash vs HF models (`bench kernels`: attention kernels)"),
    "sanity": ("flashlm.sanity", "check the default model against transformers' LlamaForCausalLM"),
    "generate": ("flashlm.generation", "generate text/tokens with a flashlm model"),
    "train": ("flashlm.train", "train a model on local text with packing and checkpoints"),
}


def _usage() -> str:
    lines = ["usage: flashlm <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {doc}" for name, (_, doc) in SUBCOMMANDS.items()]
    lines += ["", "`flashlm <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"flashlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
