"""The fusion rules' arithmetic, on answers already fetched: no I/O here.

A fusion recipe gives each model a gate g (its `density`) and a signed weight w (its `weight`),
plus `temperature` T and the plausibility cut `alpha`. Models with g below the pool's
gate_threshold are not queried. Model m keeps k_m = ceil(g * K) of the K top log-probs it returns
at each position; any other token gets the lowest log-prob it kept (its floor).

log_linear (product of experts; needs echo + top-k logprobs and a shared tokenizer): at each
answer position, over the support S = union of the kept tokens of the positively weighted models
(plus the scored token),

    f(v) = sum_m w_m lp_m(v) / T,          log p(token) = f(token) - logsumexp_{v in S' + rest} f(v)

where S' keeps only the tokens the positive models find plausible: their weighted mean log-prob is
within log(alpha) of the best (contrastive decoding's cut, so a negatively weighted model never
promotes a token it merely failed to rank), and `rest` stands for every other token: its lp_m is
log of model m's mass outside S', so one model alone at weight 1 and T = 1 scores exactly its own
log-probs. A negative weight is contrastive: expert minus amateur.

vote (text only): each queried model's greedy answer gets its weight; the answer with the largest
sum wins (a negative weight counts against the answers that model gives).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from evomerge.errors import EvomergeError

MISSING_LOGPROB = -20.0  # per token of an answer no positively weighted model could be asked for


@dataclass(frozen=True)
class Member:
    """One queried model of a candidate fusion."""

    name: str
    weight: float
    gate: float


@dataclass
class Position:
    """One token of an answer as one model saw it: the token, its log-prob, the top-k there."""

    token: str
    logprob: float
    top: dict[str, float]


def members(recipe_experts: dict[str, Any], names: list[str], threshold: float) -> list[Member]:
    """The models a recipe queries (gate at or above the threshold, weight not zero), in pool order."""
    out = []
    for name in names:
        params = recipe_experts.get(name)
        if params is None:
            continue
        if params.density >= threshold and params.weight != 0.0:
            out.append(Member(name, float(params.weight), float(params.density)))
    return out


def answer_positions(response: dict[str, Any], prompt: str, context_chars: int) -> list[Position]:
    """The positions of `prompt[context_chars:]` in an echo response (a completions response as a
    dict, echo=True + logprobs): vLLM's offsets count a BOS it adds, found as in the openai backend."""
    from evomerge.backends.openai_api import prompt_start

    choice = (response.get("choices") or [{}])[0]
    logprobs = choice.get("logprobs") or {}
    offsets, values = logprobs.get("text_offset"), logprobs.get("token_logprobs")
    tokens, tops = logprobs.get("tokens") or [], logprobs.get("top_logprobs") or []
    if not offsets or not values or not tops:
        raise EvomergeError("the endpoint returned no prompt logprobs with their top-k (it ignores echo + logprobs): "
                            "use the vote rule for this model")
    start = prompt_start(tokens, offsets, prompt)
    first, end = start + context_chars, start + len(prompt)
    positions = []
    for i, offset in enumerate(offsets):
        if first <= offset < end and values[i] is not None:
            positions.append(Position(tokens[i], float(values[i]), dict(tops[i] or {})))
    if not positions:
        raise EvomergeError("the endpoint's echoed tokens do not cover the answer (text_offset)")
    return positions


def kept(position: Position, gate: float, k: int) -> tuple[dict[str, float], float]:
    """A model's kept top log-probs at a position and its floor (the lowest it kept)."""
    ranked = sorted(position.top.items(), key=lambda item: -item[1])
    n = min(len(ranked), max(1, math.ceil(gate * k - 1e-9)) if gate < 1.0 else len(ranked))
    chosen = dict(ranked[:n])
    return chosen, min(chosen.values())


def pooled_logprob(views: list[tuple[Member, Position]], k: int, temperature: float, alpha: float) -> float:
    """log p(token) under the log-linear pool of `views` (one per model, all at the same token)."""
    token = views[0][1].token
    for member, position in views:
        if position.token != token:
            raise EvomergeError(f"models {views[0][0].name!r} and {member.name!r} tokenize the answer differently "
                                f"({token!r} vs {position.token!r}): log-linear pooling needs one tokenizer; use the "
                                "vote rule")
    lookups = [(member.weight, *kept(position, member.gate, k)) for member, position in views]

    def lp(view, v: str) -> float:
        _, top, floor = view
        return top.get(v, floor)

    positive = [view for view in lookups if view[0] > 0]
    if not positive:
        raise EvomergeError("no positively weighted model is queried: nothing proposes an answer")
    support = {token}
    for view in positive:
        support.update(view[1])
    if alpha > 0:
        total = sum(view[0] for view in positive)
        mean = {v: sum(view[0] * lp(view, v) for view in positive) / total for v in support}
        cut = max(mean.values()) + math.log(alpha)
        support = {v for v in support if mean[v] >= cut} | {token}
    fused = [sum(view[0] * lp(view, v) for view in lookups) / temperature for v in support]
    # every other token, as one: each model's probability mass outside the support, so that one
    # model alone at weight 1 and temperature 1 scores its own log-prob exactly
    fused.append(sum(view[0] * _rest(view, support) for view in lookups) / temperature)
    top = max(fused)
    own = sum(view[0] * lp(view, token) for view in lookups) / temperature
    return own - (top + math.log(sum(math.exp(f - top) for f in fused)))


def _rest(view, support: set[str]) -> float:
    """log of a model's mass outside the support (at least 1e-6: floors can overfill it)."""
    _, top, floor = view
    inside = sum(math.exp(top.get(v, floor)) for v in support)
    return math.log(max(1.0 - inside, 1e-6))


def pooled_answer(per_model: list[tuple[Member, list[Position]]], k: int, temperature: float,
                  alpha: float) -> tuple[float, int]:
    """(sum of pooled log-probs, tokens) of one answer, from each queried model's positions of it."""
    lengths = {len(positions) for _, positions in per_model}
    if len(lengths) != 1:
        names = ", ".join(f"{m.name}: {len(p)}" for m, p in per_model)
        raise EvomergeError(f"the models split the answer into different numbers of tokens ({names}): log-linear "
                            "pooling needs one tokenizer; use the vote rule")
    total = 0.0
    for j in range(lengths.pop()):
        total += pooled_logprob([(member, positions[j]) for member, positions in per_model], k, temperature, alpha)
    return total, len(per_model[0][1])


def vote(answers: list[tuple[Member, Optional[str]]]) -> str:
    """The answer with the largest sum of weights, among those a positively weighted model gave;
    a tie goes to the answer first in text order (not to the order a config lists the models in).
    No answer at all: the empty string (scored wrong)."""
    totals: dict[str, float] = {}
    for member, answer in answers:
        if answer is not None:
            key = answer.strip()
            totals[key] = totals.get(key, 0.0) + member.weight
    proposed = [answer.strip() for member, answer in answers if answer is not None and member.weight > 0]
    if not proposed:
        return ""
    return max(sorted(set(proposed)), key=lambda a: totals[a])
