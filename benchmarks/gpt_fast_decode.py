"""gpt-fast's own decode at a flashlm preset's shape (random weights), bf16 and its int8 weight-only, for the
side-by-side rows of `flashlm bench decode` on the same warm machine.

gpt-fast is not a dependency: pass a checkout of https://github.com/pytorch-labs/gpt-fast (its model.py,
generate.py, quantize.py are imported as they are). Its generate.py is run the way its ``--compile`` flag
runs it: ``decode_one_token`` compiled with ``mode="reduce-overhead", fullgraph=True`` (CUDA graphs), the
prefill left eager, sampling with its CLI's defaults (temperature 0.8, top-k 200); compiled afresh for each
(model, batch), as one gpt-fast run compiles one shape. Per-token time = (time of a generate of N new tokens
- that of 2) / (N - 2) (its generate cannot make just 1), medians over ``--repeats``; first token = the
2-token generate less one step.

    python benchmarks/gpt_fast_decode.py --gpt-fast /path/to/gpt-fast --preset llama-1b --batch-sizes 1,32 \
        --context 128 --new-tokens 64 --quantize none,int8 --output gpt_fast_decode.json

Shape differences kept: gpt-fast's lm_head is its own weight (Llama-3.2-1B ties it to the embedding: the
bytes a step reads are the same), its RoPE has no llama3 scaling here (same cost).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types

import torch


def build(gpt_fast, config, quantize: str, max_seq: int):
    """gpt-fast's Transformer with the preset's shape, random bf16 weights, optionally its int8 weight-only."""
    gm, gq = gpt_fast["model"], gpt_fast["quantize"]
    args = gm.ModelArgs(block_size=max_seq, vocab_size=config.vocab_size, n_layer=config.num_layers,
                        n_head=config.num_heads, dim=config.hidden_size, intermediate_size=config.intermediate_size,
                        n_local_heads=config.num_kv_heads, rope_base=config.rope_theta, norm_eps=config.rms_norm_eps)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = gm.Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model = model.to(torch.bfloat16).eval()
    if quantize == "int8":
        handler = gq.WeightOnlyInt8QuantHandler(model)
        state = handler.create_quantized_state_dict()
        model = handler.convert_for_runtime()
        model.load_state_dict(state, assign=True)
        model = model.cuda()
    return model


def timed_generate(gg, model, prompt, new_tokens: int, batch: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gg.generate(model, prompt, new_tokens, batch_size=batch, interactive=False, draft_model=None, temperature=0.8,
                top_k=200)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpt-fast", required=True, help="a gpt-fast checkout (model.py, generate.py, quantize.py)")
    p.add_argument("--preset", default="llama-1b")
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64, help=">= 3")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quantize", default="none,int8", help="comma-separated among none, int8")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if args.new_tokens < 3:
        p.error("--new-tokens must be >= 3 (per-token time is the difference from a 2-token generate)")
    if not torch.cuda.is_available():
        print("gpt_fast_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    sys.path.insert(0, args.gpt_fast)
    try:  # gpt-fast's tokenizer.py needs sentencepiece and tiktoken; random prompts use no tokenizer
        import tokenizer  # noqa: F401
    except ImportError:
        sys.modules["tokenizer"] = types.SimpleNamespace(get_tokenizer=None)
    import generate as gg  # gpt-fast's
    import model as gm
    import quantize as gq

    from flashlm.models.config import get_preset

    decode_one_token = gg.decode_one_token
    config = get_preset(args.preset)
    rows = []
    for quantize in [q.strip() for q in args.quantize.split(",") if q.strip()]:
        model = build({"model": gm, "quantize": gq}, config, quantize, args.context + args.new_tokens + 8)
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            torch._dynamo.reset()  # one compiled shape per (model, batch), as a gpt-fast run has
            gg.decode_one_token = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
            prompt = torch.randint(0, config.vocab_size, (args.context,), device="cuda", dtype=torch.int)
            for _ in range(2):  # compile, capture and warm up both lengths
                timed_generate(gg, model, prompt, args.new_tokens, batch)
                timed_generate(gg, model, prompt, 2, batch)
            full = [timed_generate(gg, model, prompt, args.new_tokens, batch) for _ in range(args.repeats)]
            short = [timed_generate(gg, model, prompt, 2, batch) for _ in range(args.repeats)]
            per_token = (statistics.median(full) - statistics.median(short)) / (args.new_tokens - 2)
            row = {"impl": f"gpt-fast{'-int8' if quantize == 'int8' else ''}", "batch": batch,
                   "context": args.context, "first_token_ms": 1e3 * (statistics.median(short) - per_token),
                   "per_token_ms": 1e3 * per_token, "tokens_per_s": batch / per_token}
            rows.append(row)
            print(json.dumps(row))
        del model
        torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"benchmark": "gpt_fast_decode", "preset": args.preset, "device": torch.cuda.get_device_name(),
                       "argv": sys.argv, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
