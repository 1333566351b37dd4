"""What every ``flashlm bench <sub>`` command shares: the device/dtype flags and their defaults (CUDA and
bf16 when there is a GPU, else the CPU in fp32), the checks that refuse a bad flag before anything runs
or is written, and the ``main`` wrapper that turns those refusals into exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import torch

from flashlm._util import DTYPE_ALIASES, DTYPES
from flashlm.errors import InputError

__all__ = [
    "add_common_flags",
    "add_cuda_only_flags",
    "add_device_flags",
    "at_least",
    "check_output_file",
    "dtype_field",
    "emit",
    "parser_from_doc",
    "positive_ints",
    "require_cuda",
    "resolve_common",
    "resolve_cuda_only",
    "resolve_device",
    "resolve_dtype",
    "run_main",
    "subcommand_main",
]


def parser_from_doc(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser whose --help is the subcommand module's docstring: its first line as the description,
    the rest (usage, what each field means) as the epilog, line breaks kept."""
    first, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=first, epilog=rest,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """``--device`` (default: cuda when available) and ``--dtype`` (default: bf16 on CUDA, fp32 on CPU)."""
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help=f"{' | '.join(DTYPES)} (default: bf16 on CUDA, fp32 on CPU)")


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """:func:`add_device_flags` and ``--output FILE`` (the JSON)."""
    add_device_flags(p)
    p.add_argument("--output", default=None, help="write the JSON here")


def add_cuda_only_flags(p: argparse.ArgumentParser) -> None:
    """``--device`` (cuda or cuda:N; the CPU is refused by :func:`resolve_cuda_only`) and ``--output``."""
    p.add_argument("--device", default=None, help="cuda or cuda:N (default: cuda; the CPU is refused)")
    p.add_argument("--output", default=None, help="write the JSON here")


def resolve_common(args: argparse.Namespace, default_dtype: str | None = None,
                   by_device: dict[str, tuple] | None = None) -> None:
    """Check ``args.output``, then set ``args.device`` and ``args.torch_dtype`` (``--dtype``, else
    ``default_dtype``, else bf16 on CUDA / fp32 on CPU); InputError on a bad value. ``by_device``
    {attribute: (on CUDA, on CPU)}: the defaults of flags left unset (falsy), chosen by the device."""
    check_output_file("--output", args.output)
    args.device = resolve_device(args.device)
    args.torch_dtype = resolve_dtype(args.dtype or default_dtype, args.device)
    for attr, (on_cuda, on_cpu) in (by_device or {}).items():
        setattr(args, attr, getattr(args, attr) or (on_cuda if args.device.type == "cuda" else on_cpu))


def resolve_cuda_only(args: argparse.Namespace, what: str) -> None:
    """Check ``args.output`` and set ``args.device``, refusing the CPU for ``what`` (:func:`require_cuda`)."""
    check_output_file("--output", args.output)
    args.device = resolve_device(args.device)
    require_cuda(args.device, what)


def at_least(*checks: tuple[str, int, int]) -> None:
    """Each ``(flag, value, minimum)``: InputError "FLAG must be >= MINIMUM, got VALUE" for the first below."""
    for flag, value, lo in checks:
        if value < lo:
            raise InputError(f"{flag} must be >= {lo}, got {value}")


def dtype_field(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> ``"bfloat16"``: the dtype as the subcommands' JSON records it."""
    return str(dtype).replace("torch.", "")


def emit(result: dict, output: str | None, last_line: bool = True) -> None:
    """Write ``result`` to ``output`` (when given) and, with ``last_line``, print it as the last stdout line."""
    if output:
        from flashlm.bench.report import write_json

        write_json(result, output)
    if last_line:
        print(json.dumps(result, default=str))


def resolve_device(value: str | None) -> torch.device:
    """``--device`` -> torch.device; InputError for a name that is not cpu/cuda or a CUDA that is absent."""
    name = value or ("cuda" if torch.cuda.is_available() else "cpu")
    if not (name == "cpu" or name == "cuda" or name.startswith("cuda:")):
        raise InputError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name!r}: CUDA is not available here (use --device cpu)")
    return torch.device(name)


def resolve_dtype(value: str | None, device: torch.device) -> torch.dtype:
    """``--dtype`` (any spelling of :data:`flashlm._util.DTYPE_ALIASES`) -> torch dtype, defaulted by device."""
    if value is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    short = DTYPE_ALIASES.get(value.lower())
    if short is None:
        raise InputError(f"--dtype {value!r}: allowed {', '.join(DTYPES)}")
    return DTYPES[short]


def require_cuda(device: torch.device, what: str) -> None:
    """Refuse a CPU run of a measurement that only exists on a GPU (CUDA graphs, the allocator's trace)."""
    if device.type != "cuda":
        raise InputError(f"{what} needs a CUDA device (got {device}); run it on the GPU machine")


def names(value: str, flag: str, allowed) -> list[str]:
    """``"a,b"`` -> ["a", "b"]; InputError for an empty list or a name not in ``allowed``."""
    xs = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in xs if x not in allowed]
    if bad or not xs:
        raise InputError(f"{flag}: unknown {bad or 'empty'}; choose among {', '.join(allowed)}")
    return xs


def positive_ints(value: str, flag: str) -> list[int]:
    """``"1,8,32"`` -> [1, 8, 32]; InputError unless every item is a positive integer."""
    try:
        xs = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag} takes comma-separated integers, got {value!r}") from None
    if not xs or any(x < 1 for x in xs):
        raise InputError(f"{flag} needs positive integers, got {value!r}")
    return xs


def check_output_file(flag: str, path: str | None) -> None:
    """Refuse, before the run, an output path that no file can be written to (a folder, a file
    under a file): the results would be lost after minutes of measuring."""
    if path is None:
        return
    if path == "" or os.path.isdir(path):
        raise InputError(f"{flag} {path!r} is a folder; give a file name, e.g. {os.path.join(path or '.', 'r.json')!r}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path!r} cannot be written: {parent!r} is not a writable folder")


def run_main(prog: str, parse: Callable[[list[str]], argparse.Namespace],
             body: Callable[[argparse.Namespace], int | None], argv: list[str] | None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) with ``parse`` and run ``body``; a ValueError from parsing
    (a refused flag) prints ``prog: error: ...`` and returns 2 with nothing run or written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return int(body(args) or 0)


def subcommand_main(prog: str, parse: Callable[[list[str]], argparse.Namespace],
                    body: Callable[[argparse.Namespace], int | None]) -> Callable[[list[str] | None], int]:
    """The ``main(argv=None) -> int`` of a subcommand module: :func:`run_main` of ``parse`` then ``body``."""

    def main(argv: list[str] | None = None) -> int:
        return run_main(prog, parse, body, argv)

    main.__doc__ = f"`{prog}`: parse ``argv`` (default: sys.argv[1:]) and run; 2 for a refused flag."
    return main
