"""`flashlm sanity`: check the default model against transformers on the same checkpoint.

Builds a small random model, saves it (config.json + safetensors) in a temporary folder, loads that
folder both with `flashlm.models.from_pretrained` and with transformers (``LlamaForCausalLM``, eager
attention, fp32), and compares logits for (a) a plain batch, (b) a left-padded batch with an
attention mask, (c) a prefill plus 8 cached decode steps against a full forward. Prints the max
abs difference of each and exits 1 if any exceeds the tolerance (1e-4).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time

import torch

DECODE_STEPS = 8


def _parser() -> argparse.ArgumentParser:
    from flashlm.models.config import PRESETS

    p = argparse.ArgumentParser(prog="flashlm sanity", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset",
        default="sanity",
        choices=["sanity", *PRESETS],
        help=f"model shape: 'sanity' (default: 4 layers, GQA, llama3 RoPE scaling, "
        f"{sanity_config('sanity').num_parameters() / 1e6:.2f}M params) or a named preset",
    )
    p.add_argument("--batch", type=_positive_int, default=3, help="batch size, >= 1 (default 3)")
    p.add_argument("--seqlen", type=_positive_int, default=48, help="prompt length, >= 1 (default 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--tol", type=_tolerance, default=1e-4, help="max allowed abs logit difference, >= 0 (default 1e-4)"
    )
    return p


def _checked_number(convert, kind: str, ok, need: str):
    """An argparse type: ``convert(text)`` (else "must be ``kind``"), refused unless ``ok(value)``
    (else "must be ``need``"); argparse prints either message after the flag's name."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}")
        return value

    return parse


# --batch / --seqlen: an int >= 1 (0 rows or tokens compare nothing)
_positive_int = _checked_number(int, "an integer", lambda v: v >= 1, ">= 1")
# --tol: a finite number >= 0 (a negative one could never pass)
_tolerance = _checked_number(float, "a number", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def sanity_config(name: str):
    """The model checked: the 'sanity' shape (GQA 8 q / 4 kv heads, head_dim 32, llama3 RoPE scaling
    with a short original context so the scaling is exercised at these lengths) or a preset."""
    from flashlm.models.config import ModelConfig, get_preset

    if name != "sanity":
        return get_preset(name)
    return ModelConfig(
        vocab_size=512,
        hidden_size=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=512,
        max_position_embeddings=512,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )


def _hf_class(architecture: str):
    try:
        import transformers
    except ImportError as e:  # the `hf`/`test` extra
        raise SystemExit("flashlm sanity needs transformers: pip install 'flashlm[hf]'") from e
    transformers.utils.logging.disable_progress_bar()  # keep the report readable
    from flashlm.models.config import HF_ARCHITECTURES

    return getattr(transformers, HF_ARCHITECTURES[architecture].hf_class)


def hf_position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate derives them from a left-padded mask."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


@torch.no_grad()
def compare(ours, theirs, batch: int, seqlen: int, seed: int, device: str) -> dict[str, float]:
    """Max abs logit differences between our model and the transformers one for the three cases."""
    gen = torch.Generator().manual_seed(seed)
    vocab = ours.config.vocab_size
    diffs = {}

    # (a) plain batch
    ids = torch.randint(0, vocab, (batch, seqlen), generator=gen).to(device)
    diffs["plain batch"] = (ours(ids).logits - theirs(ids).logits).abs().max().item()

    # (b) left-padded batch: row r has r * seqlen // (2 * batch) pad tokens; compare real tokens only
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    for r in range(batch):
        mask[r, : r * seqlen // (2 * batch)] = 0
    mask = mask.to(device)
    a = ours(ids, attention_mask=mask).logits
    b = theirs(ids, attention_mask=mask, position_ids=hf_position_ids(mask)).logits
    real = mask.bool()
    diffs["left-padded batch"] = (a[real] - b[real]).abs().max().item()

    # (c) prefill + DECODE_STEPS cached steps vs one full forward over the same tokens
    total = torch.randint(0, vocab, (batch, seqlen + DECODE_STEPS), generator=gen).to(device)
    full = theirs(total).logits
    out = ours(total[:, :seqlen], use_cache=True)
    steps = [out.logits]
    cache = out.past_key_values
    for t in range(seqlen, seqlen + DECODE_STEPS):
        out = ours(total[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    diffs[f"prefill + {DECODE_STEPS} decode steps"] = (torch.cat(steps, 1) - full).abs().max().item()
    return diffs


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from flashlm.models import build_model, from_pretrained, save_pretrained

    start = time.perf_counter()
    config = sanity_config(args.preset)
    if args.seqlen + DECODE_STEPS > config.max_position_embeddings:
        print(f"flashlm sanity: error: --seqlen {args.seqlen} + {DECODE_STEPS} decode steps exceeds the model's "
              f"max_position_embeddings {config.max_position_embeddings}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"flashlm sanity: error: --device {args.device}: CUDA is not available here", file=sys.stderr)
        return 2
    hf_cls = _hf_class(config.architecture)
    torch.manual_seed(args.seed)
    model = build_model(config, attn="default", device=args.device, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="flashlm-sanity-") as tmp:
        folder = save_pretrained(model, f"{tmp}/model")
        ours = from_pretrained(folder, attn="default", device=args.device, dtype=torch.float32)
        theirs = hf_cls.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
        theirs = theirs.to(args.device).eval()
    print(
        f"flashlm sanity: {type(theirs).__name__} vs flashlm default model, fp32, {args.device}, "
        f"{config.num_parameters() / 1e6:.2f}M params, batch {args.batch}, seqlen {args.seqlen}"
    )
    diffs = compare(ours, theirs, args.batch, args.seqlen, args.seed, args.device)
    return report(diffs, args.tol, time.perf_counter() - start)


def report(diffs: dict[str, float], tol: float, seconds: float | None = None) -> int:
    """Print one line per comparison (ok, or FAIL when the difference exceeds ``tol``) and a
    summary; return the exit code, 1 if any failed."""
    failed = False
    for name, diff in diffs.items():
        ok = diff <= tol
        failed |= not ok
        print(f"  {name:<28} max abs diff {diff:.3e}  {'ok' if ok else f'FAIL (> {tol:g})'}")
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    print(f"{'FAILED' if failed else 'passed'}{took}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
