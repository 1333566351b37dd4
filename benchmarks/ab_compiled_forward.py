"""The seed config's compiled forward (bench --compile's forward case), flash and default, in one process:
median ms of 30 calls after 10 warm-up calls. Run twice with PYTHONPATH pointing at two checkouts to
A/B a change:  python benchmarks/ab_compiled_forward.py [--models flash,default]"""

import argparse
import statistics
import time

import torch

from flashlm.models import build_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="flash,default")
    args = p.parse_args()
    ids = torch.randint(0, 32000, (2, 256), device="cuda")
    mask = torch.ones_like(ids)
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build_model("small", attn=name, device="cuda", dtype=torch.bfloat16)
        fwd = torch.compile(model, fullgraph=name == "flash")
        times = []
        with torch.inference_mode():  # as flashlm bench's forward case: ids and an all-ones mask
            for i in range(40):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fwd(ids, attention_mask=mask, use_cache=False)
                torch.cuda.synchronize()
                if i >= 10:
                    times.append((time.perf_counter() - t0) * 1e3)
        print(f"{name}: compiled forward {statistics.median(times):.2f} ms (p10 {sorted(times)[3]:.2f})", flush=True)


if __name__ == "__main__":
    main()
