"""Profile the flash model's forward on a padded batch (which backend, where the time goes)."""
import sys

import torch

from flashlm.attention import explain
from flashlm.bench.models import make_batch  # noqa: F401  (same inputs as the bench)
from flashlm.models import build_model

torch.manual_seed(0)
model = build_model("small", attn="flash", device="cuda", dtype=torch.bfloat16).eval()
B, S = 8, 2048
ids = torch.randint(0, 32000, (B, S), device="cuda")
lengths = torch.randint(S // 4, S, (B,))
mask = torch.zeros(B, S, dtype=torch.long, device="cuda")
for b, n in enumerate(lengths.tolist()):
    mask[b, S - n:] = 1
for grad in (False, True):
    ctx = torch.inference_mode() if not grad else torch.enable_grad()
    with ctx:
        for _ in range(3):
            model(ids, attention_mask=mask, return_logits=True)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(ids, attention_mask=mask, return_logits=True)
            torch.cuda.synchronize()
    print(f"==== grad={grad}")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))
q = torch.randn(int(mask.sum()), 12, 64, device="cuda", dtype=torch.bfloat16)
cu = torch.nn.functional.pad(mask.sum(1).cumsum(0), (1, 0)).to(torch.int32)
print(explain(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=S, max_seqlen_k=S, causal=True))
sys.stdout.flush()
