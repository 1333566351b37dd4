"""Default vs flash model on CPU at the tiny preset, the flash model on each CPU attention backend.

One process, one thread, CPU time of the calling thread (``time.thread_time``): on a shared, busy
machine wall-clock medians of ``flashlm bench`` swing by 5x between runs, CPU time much less. The
variants are interleaved round by round (default, flash on the reference, flash on sdpa_cpu) with
the same weights and inputs. Cases as ``flashlm bench``: train step (forward + backward + AdamW,
flash with return_logits=False), inference forward, decode per token (generate 1 and 1 + N tokens,
difference / N). Run: ``PYTHONPATH=src python benchmarks/cpu_model_ab.py [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flashlm.attention import use_backend
from flashlm.generation import generate
from flashlm.models import build_model


def _cpu_ms(fn) -> float:
    t0 = time.thread_time()
    fn()
    return (time.thread_time() - t0) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    default = build_model("tiny", attn="default").eval()
    flash = build_model("tiny", attn="flash").eval()
    flash.load_state_dict(default.state_dict())
    ids = torch.randint(3, default.config.vocab_size, (a.batch, a.seqlen))
    variants = {"default": (default, None), "flash/reference": (flash, "reference"),
                "flash/sdpa_cpu": (flash, "sdpa_cpu")}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-5) for n, (m, _) in variants.items()}

    def train(name, model):
        model.train()
        extra = {"return_logits": False} if model is flash else {}
        model(ids, labels=ids, use_cache=False, **extra).loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        model.eval()

    def forward(model):
        with torch.no_grad():
            model(ids, use_cache=False)

    def gen(model, n):
        generate(model, ids, max_new_tokens=n, do_sample=False, eos_token_id=[])

    times = {n: {"train": [], "forward": [], "per_token": []} for n in variants}
    for r in range(a.rounds + 1):  # round 0 warms up
        for name, (model, backend) in variants.items():
            with use_backend(backend):
                t = {"train": _cpu_ms(lambda n=name, m=model: train(n, m)),
                     "forward": _cpu_ms(lambda m=model: forward(m))}
                one = _cpu_ms(lambda m=model: gen(m, 1))
                t["per_token"] = (_cpu_ms(lambda m=model: gen(m, 1 + a.new_tokens)) - one) / a.new_tokens
            if r:
                for case, ms in t.items():
                    times[name][case].append(ms)
    rows = {n: {c: round(statistics.median(v), 3) for c, v in cases.items()} for n, cases in times.items()}
    print(f"tiny preset, batch {a.batch} x {a.seqlen}, fp32, 1 thread, CPU ms (median of {a.rounds}); "
          f"torch {torch.__version__}")
    print(f"{'variant':<18} {'train':>9} {'forward':>9} {'per token':>10}   flash speedup vs default")
    for n, r in rows.items():
        sp = "  ".join(f"{c} {rows['default'][c] / r[c]:.2f}x" for c in r) if n != "default" else ""
        print(f"{n:<18} {r['train']:>9.2f} {r['forward']:>9.2f} {r['per_token']:>10.3f}   {sp}")
    payload = {"config": vars(a), "torch": torch.__version__, "clock": "thread CPU time, 1 thread",
               "median_ms": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(payload, f, indent=1)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
