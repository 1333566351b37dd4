# Host-bound A/B of the flash model (small, bs2 x 256, bf16): median ms of 60 synchronized forward (inference)
# and forward+backward calls after 20 warm-ups. Run once per tree: PYTHONPATH=<tree>/src python benchmarks/ab_host.py flash
import sys, time, torch
from flashlm.models import build_model
m = build_model("small", attn=sys.argv[1], device="cuda", dtype=torch.bfloat16)
ids = torch.randint(0, 32000, (2, 256), device="cuda")
def fwd():
    with torch.inference_mode():
        m(ids)
def train():
    out = m(ids, labels=ids); out.loss.backward()
for name, f in (("forward", fwd), ("train", train)):
    for _ in range(20): f()
    torch.cuda.synchronize(); ts = []
    for _ in range(60):
        t = time.perf_counter(); f(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    ts.sort(); print(sys.argv[1], name, f"{1e3 * ts[len(ts) // 2]:.2f} ms")
