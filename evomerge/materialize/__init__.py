"""materialize: Recipe x Pool -> merged tensors, one tensor at a time, float32 accumulation.

Sinks: a state dict in memory (`merge_state_dict`), an HF model directory (`write_model_dir`,
written to a temporary directory then renamed), a PEFT adapter directory for LoRA merges that stay
low rank (`write_adapter_dir`), and a live torch model updated in place (`ResidentMerger`), which
holds the task vectors (or LoRA factors) on the device once so a new recipe is re-merged without
reading the disk.

The package, one responsibility a module:
  check     check_recipe: every value of a recipe and its overrides, before touching a tensor
  sources   TensorSource (the pool on disk), merge_tensor, the LoRA merge helpers, iter_merged
  sinks     merge_state_dict, write_model_dir, write_adapter_dir, staged_dir, sharding, dtypes
  resident  ResidentSource, ResidentMerger: re-merge in place from tensors held on the device
"""

from evomerge.materialize.check import check_recipe
from evomerge.materialize.resident import ResidentMerger, ResidentSource, _LinearPlan
from evomerge.materialize.sinks import (
    DTYPES,
    MODEL_FILES,
    SHARD_BYTES,
    TOKENIZER_FILES,
    base_model_reference,
    check_output_dir,
    merge_state_dict,
    resolve_dtype,
    staged_dir,
    write_adapter_dir,
    write_model_dir,
)
from evomerge.materialize.sources import (
    MERGE_THREADS,
    TensorSource,
    iter_merged,
    lowrank_lora,
    merge_tensor,
    tensor_generator,
)

__all__ = [
    "check_recipe",
    "TensorSource",
    "merge_tensor",
    "lowrank_lora",
    "iter_merged",
    "tensor_generator",
    "MERGE_THREADS",
    "merge_state_dict",
    "write_model_dir",
    "write_adapter_dir",
    "check_output_dir",
    "staged_dir",
    "base_model_reference",
    "resolve_dtype",
    "DTYPES",
    "MODEL_FILES",
    "TOKENIZER_FILES",
    "SHARD_BYTES",
    "ResidentSource",
    "ResidentMerger",
    "_LinearPlan",  # tests/test_materialize.py checks it against the general merge
]
