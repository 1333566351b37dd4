"""The compared model rows: whether each can run here, loading it from the shared checkpoint folder, and
the checkpoint itself (a preset built once with the run's seed, so every row sees the same weights)."""

from __future__ import annotations

import contextlib
import os
import tempfile

import torch

from flashlm.bench.config import HF_ATTN, BenchConfig, base_name, fp8_recipe
from flashlm.bench.records import free_cuda


@contextlib.contextmanager
def restoring_llama_module():
    """Liger-Kernel's ``apply_liger_kernel_to_llama`` patches transformers' llama module globals (RoPE,
    RMSNorm, MLP classes, the causal-LM forward); restore them so later HF rows run unpatched."""
    from transformers.models.llama import modeling_llama as ml

    saved_module = dict(vars(ml))
    saved_forward = ml.LlamaForCausalLM.__dict__.get("forward")
    try:
        yield
    finally:
        for k in [k for k in vars(ml) if k not in saved_module]:
            delattr(ml, k)
        for k, v in saved_module.items():
            if vars(ml).get(k) is not v:
                setattr(ml, k, v)
        if saved_forward is not None:
            ml.LlamaForCausalLM.forward = saved_forward


def model_unavailable(name: str) -> str | None:
    """Why a compared model cannot run in this environment (a skip note), or None."""
    if fp8_recipe(name) is not None:
        from flashlm.errors import InputError
        from flashlm.models.fp8 import check_fp8_available

        try:
            check_fp8_available()
        except InputError as e:
            return str(e)
        name = base_name(name)
    if name.startswith("hf-"):
        try:
            import transformers  # noqa: F401
        except ImportError:
            return "transformers is not installed (pip install 'flashlm[hf]')"
    if name == "hf-liger":
        try:
            import liger_kernel.transformers  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed (pip install 'flashlm[liger]')"
    if name == "hf-flashlm":
        try:
            from flashlm import hf
        except ImportError as e:
            return f"flashlm.hf is not available yet ({e})"
        if not hasattr(hf, "register"):
            return "flashlm.hf.register() does not exist yet"
    if name == "flash":
        from flashlm.models import MODEL_CLASSES

        try:
            MODEL_CLASSES["flash"]
        except (KeyError, ImportError) as e:
            return f"the flash model is not available ({e})"
    return None


def load_model(name: str, path: str, cfg: BenchConfig) -> torch.nn.Module:
    """Load compared model ``name`` from checkpoint folder ``path`` on cfg.device in cfg.dtype; a ``--fp8``
    row is its base model converted to FP8 (``flashlm.models.fp8.convert_to_fp8``; on CPU only with a note,
    see ``flashlm.bench.cli``)."""
    recipe = fp8_recipe(name)
    if recipe is not None:
        from flashlm.models.fp8 import convert_to_fp8

        model = load_model(base_name(name), path, cfg)
        return convert_to_fp8(model, recipe, allow_cpu=cfg.device == "cpu")
    dtype = cfg.torch_dtype
    if name in ("default", "flash"):
        from flashlm.models import from_pretrained

        return from_pretrained(path, attn=name, device=cfg.device, dtype=dtype).eval()
    from transformers import AutoModelForCausalLM

    attn_implementation = HF_ATTN.get(name)
    if name == "hf-flashlm":
        from flashlm import hf

        attn_implementation = hf.register()  # the name transformers accepts ("FlashLM")
    try:  # transformers' "Loading weights" bar would interleave with ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype)
    if name == "hf-liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    gen_cfg = model.generation_config  # random weights: never stop early, never warn about pads
    gen_cfg.eos_token_id = None
    gen_cfg.pad_token_id = 0 if gen_cfg.pad_token_id is None else gen_cfg.pad_token_id
    return model.to(cfg.device).eval()


def prepare_weights(cfg: BenchConfig, stack: contextlib.ExitStack):
    """(checkpoint folder, ModelConfig): the HF folder itself, or the preset built with cfg.seed and
    saved to a temporary folder that lives as long as ``stack``."""
    from flashlm.models import build_model, save_pretrained
    from flashlm.models.config import ModelConfig, get_preset

    if os.path.isdir(cfg.model):
        return cfg.model, ModelConfig.from_hf_config(cfg.model)
    config = get_preset(cfg.model)
    path = stack.enter_context(tempfile.TemporaryDirectory(prefix="flashlm-bench-"))
    torch.manual_seed(cfg.seed)
    model = build_model(config, attn="default", device=cfg.device, dtype=cfg.torch_dtype)
    save_pretrained(model, path)
    del model
    free_cuda(cfg.device)
    return path, config
