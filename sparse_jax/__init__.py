"""sparse_jax: sparse training of JAX/Flax networks as Optax transformations.

GraNet (gradual magnitude pruning with zero-cost neuroregeneration), GraNet-ST,
GMP, RigL, SET and static sparse training, all as wrappers around any optax
optimizer, with masks kept as pytrees parallel to the params.
"""

from sparse_jax._distributions import active_count
from sparse_jax._distributions import erk_densities
from sparse_jax._distributions import kernel_fans
from sparse_jax._distributions import KernelFans
from sparse_jax._distributions import layer_counts
from sparse_jax._distributions import layer_densities_for
from sparse_jax._distributions import proportional_counts
from sparse_jax._distributions import random_masks
from sparse_jax._layers import LAYER_AXIS_NAMES
from sparse_jax._layers import detect as layer_axes_of
from sparse_jax._layers import layer_densities
from sparse_jax._gradient_flow import effective_gradient_flow
from sparse_jax._gradient_flow import gradient_flow_measures
from sparse_jax._gradient_flow import gradient_hessian_gradient
from sparse_jax._gradient_flow import gradient_norm
from sparse_jax._gradient_flow import layer_gradient_flow
from sparse_jax._condense import condense_train_state
from sparse_jax._condense import CondensedState
from sparse_jax._condense import mask_batch_stats
from sparse_jax._export import bcoo_compress
from sparse_jax._export import bcoo_dense
from sparse_jax._export import bcoo_kernels
from sparse_jax._export import bcoo_nbytes
from sparse_jax._export import Condensed
from sparse_jax._export import condense_channels
from sparse_jax._export import NMKernel
from sparse_jax._export import nm_compress
from sparse_jax._export import nm_decompress
from sparse_jax._export import nm_dense
from sparse_jax._masks import apply_masks
from sparse_jax._masks import check_mask_tree
from sparse_jax._masks import count_active
from sparse_jax._masks import count_prunable
from sparse_jax._masks import density
from sparse_jax._masks import leaf_names
from sparse_jax._masks import leaf_role
from sparse_jax._masks import ROLES
from sparse_jax._masks import masks_from_params
from sparse_jax._masks import pack_masks
from sparse_jax._masks import PackedMask
from sparse_jax._masks import params_sparsity
from sparse_jax._masks import path_to_name
from sparse_jax._masks import prunable_layers
from sparse_jax._masks import select_prunable
from sparse_jax._masks import sparsity
from sparse_jax._masks import unpack_masks
from sparse_jax._prune import drop_smallest
from sparse_jax._prune import global_magnitude_prune
from sparse_jax._prune import layer_active_counts
from sparse_jax._prune import layerwise_magnitude_prune
from sparse_jax._regrow import regrow_by_gradient
from sparse_jax._regrow import regrow_by_momentum
from sparse_jax._regrow import regrow_by_score
from sparse_jax._regrow import regrow_random
from sparse_jax._schedules import constant_rate
from sparse_jax._schedules import cosine_regrowth_rate
from sparse_jax._schedules import cubic_sparsity
from sparse_jax._schedules import gradual_active_counts
from sparse_jax._schedules import is_event
from sparse_jax._lazy import get_chunk_elements
from sparse_jax._lazy import set_chunk_elements
from sparse_jax._select import top_k_masks
from sparse_jax._state import StraightThroughState
from sparse_jax._state import get_straight_through_state
from sparse_jax._state import is_straight_through
from sparse_jax._straight_through import magnitude_masks
from sparse_jax._straight_through import masked_params
from sparse_jax._straight_through import ste
from sparse_jax._structure import Block
from sparse_jax._structure import Channels
from sparse_jax._structure import NM
from sparse_jax._scheduled_jit import ScheduledStep
from sparse_jax._scheduled_jit import event_compiler_options
from sparse_jax._scheduled_jit import scheduled_jit
from sparse_jax._state import SparseState
from sparse_jax._transform import event_schedule
from sparse_jax._state import apply_updates
from sparse_jax._state import get_masks
from sparse_jax._state import get_sparse_state
from sparse_jax._state import mask_inner_state
from sparse_jax._methods import gmp
from sparse_jax._methods import granet
from sparse_jax._methods import rigl
from sparse_jax._methods import sparse_evolutionary_training
from sparse_jax._state import sparsify_params
from sparse_jax._methods import static
from sparse_jax._flops import ModelFlops
from sparse_jax._flops import as_layer_densities
from sparse_jax._flops import dense_training_flops
from sparse_jax._flops import inference_flops
from sparse_jax._flops import model_flops
from sparse_jax._flops import training_flops
from sparse_jax._flops import training_step_flops
from sparse_jax._flops import xla_flops
from sparse_jax._methods import one_shot
from sparse_jax._pruning_at_init import grasp_masks
from sparse_jax._pruning_at_init import grasp_scores
from sparse_jax._pruning_at_init import masks_from_scores
from sparse_jax._pruning_at_init import random_pruning_masks
from sparse_jax._pruning_at_init import snip_masks
from sparse_jax._pruning_at_init import snip_scores
from sparse_jax._pruning_at_init import synflow_masks
from sparse_jax._pruning_at_init import synflow_scores

# SET is the method's name in the literature; it shadows the builtin only here.
set = sparse_evolutionary_training  # pylint: disable=redefined-builtin

METHODS = {
    "granet": granet,
    "gmp": gmp,
    "rigl": rigl,
    "set": sparse_evolutionary_training,
    "static": static,
    "one_shot": one_shot,
}

# The public API for ``from sparse_jax import *``: every name above except ``set``,
# which would replace the builtin (``sparse_jax.set`` stays available).
__all__ = [
    "ScheduledStep",
    "event_compiler_options",
    "event_schedule",
    "scheduled_jit",
    "active_count",
    "erk_densities",
    "kernel_fans",
    "KernelFans",
    "layer_counts",
    "layer_densities_for",
    "proportional_counts",
    "random_masks",
    "effective_gradient_flow",
    "gradient_flow_measures",
    "gradient_hessian_gradient",
    "gradient_norm",
    "layer_gradient_flow",
    "bcoo_compress",
    "bcoo_dense",
    "bcoo_kernels",
    "bcoo_nbytes",
    "Condensed",
    "condense_channels",
    "condense_train_state",
    "CondensedState",
    "mask_batch_stats",
    "NMKernel",
    "nm_compress",
    "nm_decompress",
    "nm_dense",
    "apply_masks",
    "check_mask_tree",
    "count_active",
    "count_prunable",
    "density",
    "layer_densities",
    "layer_axes_of",
    "LAYER_AXIS_NAMES",
    "leaf_names",
    "leaf_role",
    "ROLES",
    "masks_from_params",
    "pack_masks",
    "PackedMask",
    "params_sparsity",
    "path_to_name",
    "prunable_layers",
    "select_prunable",
    "sparsity",
    "unpack_masks",
    "drop_smallest",
    "global_magnitude_prune",
    "layer_active_counts",
    "layerwise_magnitude_prune",
    "regrow_by_gradient",
    "regrow_by_momentum",
    "regrow_by_score",
    "regrow_random",
    "constant_rate",
    "cosine_regrowth_rate",
    "cubic_sparsity",
    "gradual_active_counts",
    "is_event",
    "get_chunk_elements",
    "set_chunk_elements",
    "top_k_masks",
    "StraightThroughState",
    "get_straight_through_state",
    "is_straight_through",
    "magnitude_masks",
    "masked_params",
    "ste",
    "Block",
    "Channels",
    "NM",
    "SparseState",
    "apply_updates",
    "get_masks",
    "get_sparse_state",
    "mask_inner_state",
    "gmp",
    "granet",
    "rigl",
    "sparse_evolutionary_training",
    "sparsify_params",
    "static",
    "ModelFlops",
    "as_layer_densities",
    "dense_training_flops",
    "inference_flops",
    "model_flops",
    "training_flops",
    "training_step_flops",
    "xla_flops",
    "one_shot",
    "grasp_masks",
    "grasp_scores",
    "masks_from_scores",
    "random_pruning_masks",
    "snip_masks",
    "snip_scores",
    "synflow_masks",
    "synflow_scores",
    "METHODS",
]

__version__ = "0.1.0"
