"""Record which op implementation and which attention path each representative call of the flash model
runs (CPU), independently of how the model is written: the guard of the restructuring (issue 26) that
every call runs the same kernels as before. Used by tests/test_kernel_choice.py; run as a script it
prints the record as JSON (``python tests/kernel_choice.py > tests/kernel_choice.json`` re-baselines).

- ops: ``flashlm.ops.resolve`` is wrapped while the models are built, so each op set it hands out is
  tagged with the mode it was asked for ("eager", "compiled", "decode") and every call of one of its
  functions is counted as ``mode.op``; ``cuda_names`` maps each (mode, op) to what "auto" resolves to on
  CUDA (``resolve("auto", torch.device("cuda"), ...)``, Triton installed, no GPU needed).
- attention and loss: ``sys.setprofile`` counts every call from ``flashlm/models/`` or ``flashlm/hf.py``
  into the rest of flashlm (attention as ``file:function``, the losses by function name, wherever their
  module lives), and from ``attention/interface.py`` into a backend module (the backend the public API
  picked). The op wrappers live in tests/, so calls through an op set are counted only as ops.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import json
import os
import sys

import torch

import flashlm.ops as fused_ops

MODES = ("eager", "compiled", "decode")
_SRC = os.sep + "flashlm" + os.sep


def _rel(filename: str) -> str | None:
    i = filename.rfind(_SRC)
    return None if i < 0 else filename[i + len(_SRC):]


@contextlib.contextmanager
def tagged_resolve(counts: collections.Counter):
    """Wrap ``flashlm.ops.resolve``: the functions of each op set count their calls as ``mode.op``."""
    real = fused_ops.resolve

    def resolve(kernels="auto", device=None, compiled=False, decode=False):
        ops = real(kernels, device, compiled=compiled, decode=decode)
        mode = "compiled" if compiled else "decode" if decode else "eager"
        fields = {}
        for name in ops.names:
            fn = getattr(ops, name)

            def counted(*args, _fn=fn, _key=f"{mode}.{name}"):
                counts[_key] += 1
                return _fn(*args)

            fields[name] = counted
        return type(ops)(**fields, names=dict(ops.names))

    fused_ops.resolve = resolve
    try:
        yield
    finally:
        fused_ops.resolve = real


@contextlib.contextmanager
def boundary_calls(counts: collections.Counter):
    """Count calls from the models (and hf.py) into the rest of flashlm, and from the public attention API
    into a backend module."""

    def prof(frame, event, arg):
        if event != "call" or frame.f_back is None:
            return
        callee = _rel(frame.f_code.co_filename)
        if callee is None:
            return
        caller = _rel(frame.f_back.f_code.co_filename)
        if caller is None:
            return
        from_models = caller.startswith("models" + os.sep) or caller == "hf.py"
        if from_models and not (callee.startswith("models" + os.sep) or callee in ("hf.py", "errors.py")):
            # attention by file and function; the rest (the losses) by function name only, wherever it lives
            attention = callee.startswith("attention" + os.sep)
            counts[f"{callee}:{frame.f_code.co_name}" if attention else frame.f_code.co_name] += 1
        elif caller == os.path.join("attention", "interface.py") and callee.startswith(
                os.path.join("attention", "backends")):
            counts[f"{callee}:{frame.f_code.co_name}"] += 1

    sys.setprofile(prof)
    try:
        yield
    finally:
        sys.setprofile(None)


@contextlib.contextmanager
def compiling_in_models():
    """The old API (before issue 26): the model asked ``torch.compiler.is_compiling()``; answer True for
    calls made from flashlm/models/ only, so the compiled branches run eagerly."""
    real = torch.compiler.is_compiling

    def fake():
        caller = _rel(sys._getframe(1).f_code.co_filename) or ""
        return caller.startswith("models" + os.sep) or real()

    torch.compiler.is_compiling = fake
    try:
        yield
    finally:
        torch.compiler.is_compiling = real


def _whole_model_compiled(model):
    """The model as a whole-model torch.compile would run it: the new API says so, the old one asked."""
    prep = getattr(model, "prepare_compile", None)
    if "whole_model" in inspect.signature(prep).parameters:
        model.prepare_compile(whole_model=True)
        return contextlib.nullcontext()
    return compiling_in_models()


def _decode_logits_compiled(model, ids, cache):
    if "compiled" in inspect.signature(model.decode_logits).parameters:
        return model.decode_logits(ids, cache, compiled=True)
    with compiling_in_models():
        return model.decode_logits(ids, cache)


CONFIGS = {
    "tiny": {},
    "qk_norm": {"qk_norm": True, "head_dim": 16},
    "gemma2": {"post_norms": True, "sliding_window": 4, "attn_logit_softcap": 5.0, "final_logit_softcap": 3.0,
               "hidden_act": "gelu_pytorch_tanh", "rms_norm_unit_offset": True, "embed_scale": True},
}


def _scenarios(build):
    """name -> callable(model) for the representative calls (each builds its own model)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 200, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    packed_pos = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, -1)
    cu = torch.tensor([0, 5, 12, 20, 24], dtype=torch.int32)

    def train(m, **kw):
        m.train()
        out = m(ids, labels=ids, **kw)
        out.loss.backward()

    def prefill_decode(m, with_mask):
        m.eval()
        cache = m.allocate_cache(2, 32)
        with torch.no_grad():
            m(ids, attention_mask=mask if with_mask else None, past_key_values=cache, use_cache=True,
              logits_to_keep=1)
            m(ids[:, :1], past_key_values=cache, use_cache=True)  # decode step through forward
            m(ids[:, :3], past_key_values=cache, use_cache=True)  # a chunk appended, no mask
            chunk_mask = torch.ones(2, 3, dtype=torch.long)
            chunk_mask[1, 0] = 0
            m(ids[:, :3], attention_mask=chunk_mask, past_key_values=cache, use_cache=True)  # padded chunk
            m.decode_logits(ids[:, :1], cache)

    def prefill_logits(m):
        m.eval()
        cache = m.allocate_cache(2, 32)
        with torch.no_grad():
            m.prefill_logits(ids, cache)
            m.decode_logits(ids[:, :1], cache)
            _decode_logits_compiled(m, ids[:, :1], cache)

    def blocks_compiled(m):
        m.prepare_compile()
        train(m)
        train(m, attention_mask=mask)
        train(m, position_ids=packed_pos)

    def whole_compiled(m):
        with _whole_model_compiled(m):
            train(m)
            train(m, attention_mask=mask)
            train(m, cu_seqlens=cu, max_seqlen=8)
            m.eval()
            with torch.no_grad():
                m(ids, return_logits=True)

    return {
        "train_dense": lambda m: train(m),
        "train_padded": lambda m: train(m, attention_mask=mask),
        "train_packed_position_ids": lambda m: train(m, position_ids=packed_pos),
        "train_cu_seqlens": lambda m: train(m, cu_seqlens=cu, max_seqlen=8),
        "eval_logits_padded": lambda m: m.eval()(ids, attention_mask=mask),
        "prefill_decode": lambda m: prefill_decode(m, False),
        "prefill_padded_decode": lambda m: prefill_decode(m, True),
        "prefill_logits_decode_logits": prefill_logits,
        "blocks_compiled": blocks_compiled,
        "whole_model_compiled": whole_compiled,
    }


def record() -> dict:
    from flashlm.models import build_model, get_preset

    out: dict = {"cuda_names": {}}
    for mode in MODES:
        ops = fused_ops.resolve("auto", torch.device("cuda"), compiled=mode == "compiled", decode=mode == "decode")
        out["cuda_names"][mode] = dict(ops.names)
    for cname, overrides in CONFIGS.items():
        for dtype in (torch.float32, torch.float16) if cname == "tiny" else (torch.float32,):
            for sname, run in _scenarios(None).items():
                if dtype == torch.float16 and sname.startswith(("train", "blocks", "whole")):
                    continue
                ops_counts: collections.Counter = collections.Counter()
                calls: collections.Counter = collections.Counter()
                torch.manual_seed(0)
                with tagged_resolve(ops_counts):
                    model = build_model(get_preset("tiny", **overrides), attn="flash", dtype=dtype)
                with boundary_calls(calls):
                    run(model)
                key = f"{cname}/{str(dtype).split('.')[-1]}/{sname}"
                out[key] = {"ops": dict(sorted(ops_counts.items())),
                            "calls": dict(sorted((k, v) for k, v in calls.items()
                                                 if not k.startswith(os.path.join("attention", "padding"))))}
    out.update(_record_hf())
    return out


def _record_hf() -> dict:
    """transformers' Llama with flashlm's attention (flashlm.hf): dense, padded, packed by position_ids."""
    try:
        import transformers
    except ImportError:
        return {}
    import flashlm.hf

    name = flashlm.hf.register()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, attn_implementation=name)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    packed = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, -1)
    out = {}
    for sname, kw in (("dense", {}), ("padded", {"attention_mask": mask}), ("packed", {"position_ids": packed})):
        calls: collections.Counter = collections.Counter()
        with torch.no_grad(), boundary_calls(calls):
            model(ids, **kw)
        padding = os.path.join("attention", "padding")
        out[f"hf/float32/{sname}"] = {
            "calls": dict(sorted((k, v) for k, v in calls.items() if not k.startswith(padding))),
            "plan": dict(sorted((k, v) for k, v in calls.items() if k.startswith(padding)))}
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    json.dump(record(), sys.stdout, indent=1, sort_keys=True)
    print()
