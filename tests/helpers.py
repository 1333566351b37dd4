"""Setup shared by several test files: twin default/flash models, left-padded prompts and masks, a
cache-free greedy loop, a tiny transformers config and its per-family variants, and a one-thread fixture for tests made of tiny
tensors. (pytest puts tests/ on sys.path, so test files import this as ``helpers``.)"""

import pytest
import torch

from flashlm.models.config import get_preset
from flashlm.models.flash import FlashForCausalLM
from flashlm.models.reference import DefaultForCausalLM

# A tiny transformers config (GQA 4/2 heads, 3 layers) shared by the HF comparison tests.
HF_TINY = {
    "vocab_size": 128,
    "hidden_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "max_position_embeddings": 128,
    "initializer_range": 0.1,  # larger weights than HF's 0.02 so softcaps and windows change the logits
}

# HF config class per family (on top of HF_TINY), with the features that set it apart switched on;
# windows (5 tokens) shorter than the sequences (12-16), so a wrong window rule shows.
HF_FAMILIES = {
    "llama": ("LlamaConfig", {"attention_bias": True}),
    "mistral": ("MistralConfig", {"sliding_window": 5}),
    # layer 0 global, layers 1-2 sliding (i >= max_window_layers); q/k/v biases
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),
    # head_dim explicit (16 != 48 / 4), q/k norms, biases on q/k/v/o
    "qwen3": ("Qwen3Config", {"head_dim": 16, "attention_bias": True}),
    # alternating sliding layers, both softcaps, query_pre_attn_scalar != head_dim, GeGLU, (1 + w)
    # norms, pre/post norms, sqrt(hidden) embedding scale, tied embeddings
    "gemma2": (
        "Gemma2Config",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 10,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
            "sliding_window": 5,
        },
    ),
}


def jitter_vectors(model, scale=0.3):
    """Move every 1-D parameter (norm weights, biases) off its 0/1 init in place, drawing from the
    global RNG, so that a dropped or misplaced norm or bias changes the logits."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(scale * torch.randn_like(p))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is ~50x faster than two on a loaded 2-core CI box, where
    OpenMP workers spin against the other processes. Autouse: importing it into a test module
    applies it to that module's tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_pair(device="cpu", dtype=None, **overrides):
    """A default and a flash model of the tiny preset (with ``overrides``), identical weights, eval mode."""
    config = get_preset("tiny", **overrides)
    default = DefaultForCausalLM(config).to(device)
    flash = FlashForCausalLM(config).to(device)
    flash.load_state_dict(default.state_dict())
    if dtype is not None:
        default, flash = default.to(dtype), flash.to(dtype)
    return default.eval(), flash.eval()


def left_padded_prompts(rows, device="cpu"):
    """Token-id lists -> left-padded (ids (batch, width) int64 with 0 at padding, mask (batch, width))."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def left_padded_mask(batch, seqlen):
    """(batch, seqlen) int64 mask whose row r starts with 3 * r padding positions."""
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    for r in range(batch):
        mask[r, : 3 * r] = 0
    return mask


def naive_greedy(model, prompt, steps):
    """Greedy decoding by re-running the full sequence each step (no cache)."""
    seq = torch.tensor(prompt)[None]
    for _ in range(steps):
        seq = torch.cat([seq, model(seq).logits[0, -1].argmax().view(1, 1)], dim=1)
    return seq[0, len(prompt):].tolist()
