"""Run the seed project's six tests by name: ``python -m flashlm.tests_seed [extra pytest args]``.

The tests live in the repository's ``tests/test_seed.py`` (a source checkout; they are not part of
the installed package). Equivalent to ``pytest tests/test_seed.py -k "<the six names>"``.
"""

from __future__ import annotations

import sys
from pathlib import Path

SEED_TESTS = (
    "test_seed_basic_forward",
    "test_seed_attention_mask_varlen",
    "test_seed_fused_cross_entropy_loss",
    "test_seed_gradient_flow",
    "test_seed_kv_cache_generation",
    "test_seed_determinism",
)


def seed_test_file() -> Path:
    """tests/test_seed.py of the source checkout this package was installed from (editable install)."""
    return Path(__file__).resolve().parents[2] / "tests" / "test_seed.py"


def main(argv: list[str] | None = None) -> int:
    try:
        import pytest
    except ImportError:
        print("flashlm.tests_seed needs pytest: pip install 'flashlm[test]'", file=sys.stderr)
        return 2
    path = seed_test_file()
    if not path.is_file():
        print(f"flashlm.tests_seed: {path} not found; run it from a source checkout "
              "(pip install -e .)", file=sys.stderr)
        return 2
    node_ids = [f"{path}::{name}" for name in SEED_TESTS]
    args = list(sys.argv[1:] if argv is None else argv)
    return int(pytest.main(["-q", "--rootdir", str(path.parents[1]), *node_ids, *args]))


if __name__ == "__main__":
    sys.exit(main())
