"""`flashlm` command line: one entry point, subcommands implemented by their own modules.

Each subcommand module exposes ``main(argv: list[str] | None = None) -> int`` and parses its own
flags, so `flashlm bench ...` and `python -m flashlm.bench ...` behave the same.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "bench": ("flashlm.bench.cli", "benchmark default vs flash vs HF models"),
    "sanity": ("flashlm.sanity", "check the default model against transformers' LlamaForCausalLM"),
    "generate": ("flashlm.generation.cli", "generate text/tokens with a flashlm model"),
    "train": ("flashlm.train.cli", "train a model on local text with packing and checkpoints"),
    "eval": ("flashlm.evaluate", "perplexity of a checkpoint on held-out text (and of its int8 copy: --quantize)"),
}


# `flashlm bench <sub>`: flashlm.bench.cli dispatches through this table, so both helps list every one
# (kept here, not there, so that `flashlm --help` does not import torch)
BENCH_SUBCOMMANDS = {
    "kernels": ("flashlm.bench.kernels", "attention kernels: TFLOP/s per backend, KV-cache decode GB/s"),
    "decode": ("flashlm.bench.decode", "decode latency, tokens/s and GB/s over batch x context"),
    "ops": ("flashlm.bench.ops", "fused ops: host/wall us per call and kernels, per implementation"),
    "optim": ("flashlm.bench.optim", "one AdamW step per variant: median ms and peak memory"),
    "loss": ("flashlm.bench.loss", "cross-entropy on logits vs fused linear loss: ms and MiB by size"),
    "memory": ("flashlm.bench.memory", "what is alive at a train step's peak, by allocation site (CUDA)"),
    "profile": ("flashlm.bench.profile", "where a forward/train/decode step's time goes (torch.profiler)"),
    "launches": ("flashlm.bench.launches", "aten ops / CUDA kernels per step, default vs flash"),
    "decode-probe": ("flashlm.bench.decode_probe", "decode kernel tile sweep, decode ops, prefill (CUDA)"),
}


def version() -> str:
    """The installed distribution's version, else (a source tree on sys.path) ``flashlm.__version__``."""
    from importlib import metadata

    try:
        return metadata.version("flashlm")
    except metadata.PackageNotFoundError:
        from flashlm import __version__

        return __version__


def _usage() -> str:
    width = max(len("bench " + sub) for sub in BENCH_SUBCOMMANDS)
    lines = ["usage: flashlm <command> [options]", "       flashlm --version", "", "commands:"]
    for name, (_, doc) in SUBCOMMANDS.items():
        lines.append(f"  {name:<{width}} {doc}")
        if name == "bench":
            lines += [f"  {'bench ' + sub:<{width}} {sub_doc}" for sub, (_, sub_doc) in BENCH_SUBCOMMANDS.items()]
    lines += ["", "`flashlm <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"flashlm {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"flashlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
