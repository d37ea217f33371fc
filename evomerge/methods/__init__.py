"""Merge methods: pure functions on one parameter tensor.

Every method takes the base tensor and the experts' task vectors (tau_t = theta_t - theta0) and returns
the full merged tensor in float32. Inputs are upcast to float32 once; every random step draws from the
torch.Generator it is given, never from the global RNG.

Methods that mergekit also has keep mergekit's semantics under mergekit's name (checked against
mergekit 0.1.5 by tests/test_methods.py with fixtures from tests/benchmarks/make_mergekit_fixtures.py).
Where evomerge deliberately differs, the difference is behind a flag that is off by default:
`normalize_abs` (divide by sum |w| instead of sum w, safe with negative weights) and `rescale_unbiased`
(the DARE/DELLA papers' 1/p rescale instead of mergekit's L1-norm match).

The package, one responsibility a module:
  base             Param, MergeMethod (declared parameters, validation), the METHODS registry
  sparsify         which entries of a task vector each method keeps (TopMag, TIES trim, DARE, ...)
  task_arithmetic  the task-arithmetic family (one function under several names), evo_merging, consensus
  interpolation    linear, slerp, model_stock
  lora             the low-rank merge of LoRA factors
  fusion           the fusion rules over API models' answers (declared here, computed in evomerge/fusion)
A new method is a function and a `register(MergeMethod(...))` line in one of them (or a new module
imported here).
"""

from evomerge.methods import fusion, interpolation, task_arithmetic  # noqa: F401  (they register their methods)
from evomerge.methods.base import EVOMERGE_ONLY_PARAMS, METHODS, MergeMethod, Param, get_method, register
from evomerge.methods.base import _check_domain  # noqa: F401  (materialize validates overrides with it)
from evomerge.methods.lora import lowrank_lora_merge
from evomerge.methods.sparsify import topmag

__all__ = [
    "Param",
    "MergeMethod",
    "METHODS",
    "get_method",
    "register",
    "topmag",
    "lowrank_lora_merge",
    "EVOMERGE_ONLY_PARAMS",
]
