"""Every module that moved still imports from its old path, as the new module, with a DeprecationWarning."""

import importlib
import importlib.machinery
import sys
import warnings

import pytest

from flashlm._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_new_module_with_warning(old):
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=MOVED[old].replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is new


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_has_no_file_left(old):
    """An old path is served by the table alone: a stale file there would shadow nothing but confuse."""
    parent = old.rpartition(".")[0]
    package = importlib.import_module(parent)
    spec = importlib.machinery.PathFinder.find_spec(old, package.__path__)
    assert spec is None, f"{old} still has a file ({spec.origin}); delete it, MOVED serves the old path"


def test_unmoved_modules_import_without_warning():
    sys.modules.pop("flashlm.errors", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        importlib.import_module("flashlm.errors")

# Public names each old module had at 976712f (before the restructuring); each must still import from its old
# path. Dropped on purpose: re-imported std/typing names, is_compiling (Dynamo's), and the deleted Triton
# rotary module's internal RotaryFunction / rotary_op (its public functions remain).
OLD_PUBLIC_NAMES = {
    'flashlm.attention.backends.triton.rotary': 'InputError apply_rotary_bshd apply_rotary_bshd_ref',
    'flashlm.checkpoint': 'CHECKPOINTS CHECKPOINT_DIRS CHECKPOINT_ENTRIES ConfigMismatchError FORMAT_VERSION InputError check_config export_model is_sharded latest_checkpoint load_checkpoint read_train_state resolve_checkpoint rng_state save_checkpoint set_rng_state verify_checkpoint',
    'flashlm.data': 'DATA_SUFFIXES DEFAULT_EOS DataIterator EOS_CANDIDATES IGNORE_INDEX PackedDataset default_cache_dir files_hash find_files load_tokenizer pack read_documents resolve_eos_id tokenize_corpus tokenizer_hash train_tokenizer',
    'flashlm.decode_graph': 'CAPACITY_MULTIPLE COMPILE_MODES CUDAGraphDecodeStep DecodeStep PREFILL_GRAPHS_KEPT PREFILL_GRAPH_AFTER_USES PREFILL_GRAPH_MAX_TOKENS SamplingKey cache_capacity capture_stream compile_mode graph_unavailable_reason graphed_decode_step release_graphs sample_next_token',
    'flashlm.loss_kernels': 'CHUNK_LOGITS_BYTES InputError LogitsCrossEntropy MAX_BLOCK autocast_linear_inputs chunk_rows logits_cross_entropy next_pow2 row_warps',
    'flashlm.losses': 'ChunkedLinearCrossEntropy MATERIALIZED_LOGITS_MAX_BYTES autocast_linear_inputs cross_entropy liger_available linear_cross_entropy materialize_logits_for_loss',
    'flashlm.models.cache': 'DynamicCache',
    'flashlm.models.default': 'CausalLMOutput DecoderLayer DefaultForCausalLM DefaultModel DynamicCache IGNORE_INDEX InputError MLP ModelConfig MultiHeadAttention RMSNorm RotaryEmbedding ScaledEmbedding causal_lm_loss check_inputs check_token_range default_position_ids make_norm',
    'flashlm.models.flash_backends': 'ATEN_DENSE_MAX_TOKENS aten_dense_eligible',
    'flashlm.models.flash_cache': 'StaticKVCache',
    'flashlm.models.flash_mixin': 'FlashAttentionMixin flash_attn_func flash_attn_varlen_func get_unpad_data index_first_axis pad_input prepare_from_position_ids unpad_input',
    'flashlm.models.flash_rope': 'apply_rope_bshd apply_rotary rotate_half',
    'flashlm.models.fused': 'FUSED_PROJECTIONS fuse_into fuse_linears register_fused_names split_fused_state_dict split_sizes',
    'flashlm.models.io': 'CONFIG_NAME InputError LoadReport ModelConfig SAFE_INDEX_NAME SAFE_WEIGHTS_NAME checkpoint_dtype checkpoint_files load_state_dict_from_folder read_json save_pretrained',
    'flashlm.models.layers': 'MLP ModelConfig MultiHeadAttention RMSNorm RotaryEmbedding apply_rope attention_mask_bhsd make_norm repeat_kv rope_inv_freq rotate_half',
    'flashlm.optim': 'KERNELS LOW_PRECISION MasterWeightAdamW adamw_master_step triton_usable',
    'flashlm.optim_kernels': 'BLOCK LOW_PRECISION adamw_master_step',
    'flashlm.sampling': 'SamplingKey argmax_rows sample_next_token top_k_filter top_p_filter',
}


@pytest.mark.parametrize("old", sorted(OLD_PUBLIC_NAMES))
def test_old_path_keeps_its_public_names(old):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = importlib.import_module(old)
    missing = [n for n in OLD_PUBLIC_NAMES[old].split() if not hasattr(module, n)]
    assert not missing, f"{old} (now {MOVED[old]}) lost {missing}"


def test_every_moved_module_has_its_name_list():
    assert set(OLD_PUBLIC_NAMES) == set(MOVED)
