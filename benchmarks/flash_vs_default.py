"""flash / default ratios from `flashlm bench` JSON files (issue 16's targets).

    python benchmarks/flash_vs_default.py OUT_eager.json [OUT_compile.json ...]

Prints per file and case: default and flash median ms, speedup (default / flash; target >= 1.3 eager,
>= 1.2 compiled), peak memory ratio (flash / default; target <= 0.85 for train), and errors if any.
"""

from __future__ import annotations

import json
import sys


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
        models = res["models"]
        print(f"== {path}")
        for case in ("train", "forward"):
            rows = {m: models.get(m, {}).get("cases", {}).get(case, {}) for m in ("default", "flash")}
            if any(r.get("status") != "ok" for r in rows.values()):
                print(f"  {case}: " + "; ".join(f"{m} {r.get('status')} {r.get('error', '')[:200]}"
                                               for m, r in rows.items()))
                continue
            d, fl = rows["default"], rows["flash"]
            mem = (fl["peak_memory_bytes"] / d["peak_memory_bytes"]) if d.get("peak_memory_bytes") else float("nan")
            print(f"  {case:<8} default {d['median_ms']:.2f} ms  flash {fl['median_ms']:.2f} ms  "
                  f"speedup {d['median_ms'] / fl['median_ms']:.2f}x  peak mem flash/default {mem:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
