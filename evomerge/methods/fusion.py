"""The fusion rules, declared like merge methods so that search spaces derive their genes from them
(a gate and a signed weight per model, as Evo-Merging has a density and a weight per expert). They
act on the outputs of API models (`acts_on="outputs"`): their arithmetic is evomerge/fusion/rules.py,
and a weight merge refuses them."""

from __future__ import annotations

from evomerge.errors import ConfigError
from evomerge.methods.base import MergeMethod, Param, register

GATE = Param("density", 1.0, 0.0, 1.0, True,
             "the model's gate: below the pool's gate_threshold it is not queried; above, the share of its top-k kept")
SIGNED_WEIGHT = Param("weight", 1.0, None, None, True, "the model's weight in the pool; negative is contrastive")
TEMPERATURE = Param("temperature", 1.0, 0.05, 10.0, False, "divides the pooled log-probs (log_linear)")
ALPHA = Param("alpha", 0.1, 0.0, 1.0, False,
              "plausibility cut: only tokens within log(alpha) of the positive models' best are candidates")


def _no_tensors(*args, **kwargs):
    raise ConfigError("a fusion rule combines API models' answers; it merges no tensors")


register(MergeMethod(
    name="log_linear", fn=_no_tensors, parameters=(SIGNED_WEIGHT, GATE, TEMPERATURE, ALPHA), random=False,
    mergekit_name=None, acts_on="outputs",
    doc="log-linear pooling (product of experts) of the models' answer log-probabilities; needs echo + logprobs"))
register(MergeMethod(
    name="vote", fn=_no_tensors, parameters=(SIGNED_WEIGHT, GATE), random=False, mergekit_name=None,
    acts_on="outputs", doc="weighted vote over the models' greedy answers; text only (generation tasks)"))
register(MergeMethod(
    name="route", fn=_no_tensors, parameters=(SIGNED_WEIGHT, GATE), random=False, mergekit_name=None,
    acts_on="outputs", doc="routing: one model answers, the gate-open one of largest weight (per task with per_task); "
                           "its own log-probs and answers, one query's cost"))
