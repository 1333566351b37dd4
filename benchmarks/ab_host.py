# Host-bound A/B of one model (small, bs2 x 256, bf16): median ms of 60 synchronized forward (inference) and
# forward+backward calls after 20 warm-ups. Run once per tree, alternating trees several times:
#   PYTHONPATH=<tree>/src python benchmarks/ab_host.py flash|default [--profile FILE]
# --profile: also run cProfile over 20 calls of each and write the functions by own time (ncalls, tottime per
# call) to FILE, so two trees' host work can be compared function by function.
import cProfile
import pstats
import sys
import time

import torch

from flashlm.models import build_model

attn = sys.argv[1]
profile_file = sys.argv[sys.argv.index("--profile") + 1] if "--profile" in sys.argv else None
m = build_model("small", attn=attn, device="cuda", dtype=torch.bfloat16)
ids = torch.randint(0, 32000, (2, 256), device="cuda")


def fwd():
    with torch.inference_mode():
        m(ids)


def train():
    out = m(ids, labels=ids)
    out.loss.backward()


lines = []
for name, f in (("forward", fwd), ("train", train)):
    for _ in range(20):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(60):
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    ts.sort()
    print(attn, name, f"{1e3 * ts[len(ts) // 2]:.2f} ms (min {1e3 * ts[0]:.2f})")
    if profile_file:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            f()
        torch.cuda.synchronize()
        prof.disable()
        stats = pstats.Stats(prof).stats
        calls = sum(v[1] for v in stats.values()) / 20
        lines.append(f"## {attn} {name}: {calls:.0f} Python calls per step")
        for (fn, ln, fname), v in sorted(stats.items(), key=lambda kv: -kv[1][2])[:40]:
            where = fn.split("site-packages/")[-1].split("/src/")[-1]
            lines.append(f"{v[1] / 20:8.1f} calls {1e6 * v[2] / 20:9.1f} us/step  {where}:{ln} {fname}")
if profile_file:
    with open(profile_file, "w") as fh:
        fh.write("\n".join(lines) + "\n")
