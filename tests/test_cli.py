"""`flashlm` entry point: --version, and every subcommand named in the help."""

from __future__ import annotations

import importlib.metadata

import pytest

import flashlm
from flashlm import cli
from flashlm.bench import cli as bench_cli


def test_version(capsys, monkeypatch):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"flashlm {importlib.metadata.version('flashlm')}"

    def missing(name):  # a source tree on sys.path without an installed distribution
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert cli.main(["-V"]) == 0
    assert capsys.readouterr().out.strip() == f"flashlm {flashlm.__version__}"


def test_help_names_every_bench_subcommand(capsys):
    assert set(getattr(bench_cli, "SUBCOMMANDS", ())) >= {"kernels", "decode"}
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(["--help"])
    assert exc.value.code == 0
    bench = capsys.readouterr().out
    for name in bench_cli.SUBCOMMANDS:
        assert f"bench {name}" in top, top
        assert f"flashlm bench {name}" in bench, bench


@pytest.mark.parametrize("name", ["kernels", "decode"])
def test_each_bench_subcommand_dispatches(name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", name, "--help"])
    assert exc.value.code == 0
    assert f"flashlm bench {name}" in capsys.readouterr().out


def test_docs_name_the_cpu_attention_backend():
    """docs/flash.md and docs/hf.md say which backend serves the CPU: the first of the CPU order."""
    from pathlib import Path

    from flashlm.attention.order import ORDERS

    first = ORDERS["cpu"]["dense"][0]
    root = Path(__file__).resolve().parents[1] / "docs"
    for page in ("flash.md", "hf.md"):
        text = (root / page).read_text()
        assert f"`{first}`" in text and "the reference on CPU" not in text and "reference on the CPU" not in text, page
