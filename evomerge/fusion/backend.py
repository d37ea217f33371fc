"""FusedBackend: a candidate fusion of API models, behind the backend interface every suite is
scored through (evomerge/backends), so a fusion is scored by the same PreparedSuite as a merge.

`use(recipe)` is its weight swap: the recipe says which models are queried (gate), with which
weight, temperature and plausibility cut. Then

    loglikelihood   each queried model's echo of context + continuation, pooled token by token
                    (log_linear; route: the one routed-to model's own; vote gives none)
    generate_until  each queried model's greedy answer; log_linear picks the answer the pool finds
                    most likely (every queried model's echo of each proposed answer), vote the one
                    with the largest sum of weights, route the routed-to model's

Every answer comes through the run's cache (ModelClients), so a genome scored on prompts already
seen makes no call. `serving_usd` adds up what the fusion's queries cost at the models' prices,
cached or not: what serving this fusion would cost, apart from what the search spent.
"""

from __future__ import annotations

from typing import Any, Optional

from evomerge.backends import Backend
from evomerge.errors import EvomergeError
from evomerge.fusion import rules
from evomerge.fusion.client import ModelClients, Query
from evomerge.fusion.spec import FusionPoolSpec
from evomerge.recipe import Recipe


class FusedBackend(Backend):
    name = "fusion"
    weights = "none"  # it takes a fusion recipe (`use`), no tensors
    chat_template = False

    def __init__(self, spec: FusionPoolSpec, clients: ModelClients, logprob_models: set[str], rule: str):
        self.spec, self.clients, self.rule = spec, clients, rule
        self.logprob_models = logprob_models
        self.loglikelihoods = rule != "vote"  # declared per instance: the pool's rule decides
        self.members: list[rules.Member] = []  # queried for the current task
        self.queried: list[str] = []  # queried for any task of this candidate
        self.recipe: Optional[Recipe] = None
        self.temperature, self.alpha = 1.0, 0.0
        self.serving_usd = 0.0

    def use(self, recipe: Recipe) -> None:
        """The fusion to score next (the analogue of swapping in a merge's weights)."""
        self.members, self.serving_usd, self.queried = [], 0.0, []
        if recipe.method != self.rule:
            raise EvomergeError(f"this fusion pool scores rule {self.rule!r}, the recipe has {recipe.method!r}")
        self.recipe = recipe
        self.temperature = float(recipe.parameters.get("temperature", 1.0))
        self.alpha = float(recipe.parameters.get("alpha", 0.1))
        self.begin_task(None)  # checked now, for every task; a suite then asks per task
        self.queried = []

    def begin_task(self, task: Optional[str]) -> None:
        """The members for this task's queries: the recipe's own values, then a per-task override's
        (`modules: task:NAME`, from a per_task space)."""
        experts = dict(self.recipe.experts)
        for override in self.recipe.overrides:
            if task is not None and override.modules == f"task:{task}":
                experts.update({name: o.apply_to(experts[name]) for name, o in override.experts.items()})
        members = rules.members(experts, self.spec.names, self.spec.gate_threshold)
        if self.rule == "route":  # one-hot: the open gate of largest weight answers alone (a tie: by
            # name, so that the choice does not depend on the order a config file lists the models in)
            members = [rules.Member(m.name, 1.0, 1.0) for m in sorted(members, key=lambda m: (-m.weight, m.name))[:1]
                       if m.weight > 0]
        if not any(m.weight > 0 for m in members):
            raise EvomergeError("no model is queried with a positive weight (every gate below "
                                f"{self.spec.gate_threshold} or every weight <= 0): nothing proposes an answer"
                                + (f" (task {task})" if task else ""))
        if self.rule == "log_linear":
            text_only = [m.name for m in members if m.name not in self.logprob_models]
            if text_only:
                raise EvomergeError(f"log_linear needs logprobs, which {text_only[0]!r} does not give: gate it off "
                                    "or use the vote rule")
        self.members = members
        self.queried = list(dict.fromkeys(self.queried + [m.name for m in members]))

    # ---- the backend interface ------------------------------------------------------------------
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, int, bool]]:
        if not self.loglikelihoods:
            return super().loglikelihood(requests)
        scored = self._own(requests, self.members[0]) if self.rule == "route" else self._pooled(requests, self.members)
        return [(logprob, tokens, False) for logprob, tokens in scored]

    def generate_until(self, requests: list[tuple[str, dict]]) -> list[str]:
        from evomerge.evaluator import cut_at_stop

        proposing = [m for m in self.members if m.weight > 0] if self.rule == "log_linear" else self.members
        queries = [self._generate(m, context, kwargs) for context, kwargs in requests for m in proposing]
        answers = self._answers(queries)
        width = len(proposing)
        generated = [[None if a is None else cut_at_stop(a["choices"][0]["text"] or "", kwargs.get("until") or [])
                      for a in answers[i * width:(i + 1) * width]] for i, (_, kwargs) in enumerate(requests)]
        if self.rule == "route":
            return [texts[0] or "" for texts in generated]
        if self.rule == "vote":
            return [rules.vote(list(zip(proposing, texts))) for texts in generated]
        return self._rerank(requests, generated)

    # ---- log_linear -----------------------------------------------------------------------------
    def _rerank(self, requests, generated: list[list[Optional[str]]]) -> list[str]:
        """Each request's proposed answers scored by the whole pool; the most likely one wins."""
        pairs, owners = [], []
        for i, ((context, _), texts) in enumerate(zip(requests, generated)):
            for text in _proposals(texts):
                pairs.append((context, text))
                owners.append(i)
        scored = self._pooled(pairs, self.members) if pairs else []
        best: dict[int, tuple[float, str]] = {}
        for i, (_, text), (logprob, _) in zip(owners, pairs, scored):
            if i not in best or logprob > best[i][0]:
                best[i] = (logprob, text)
        return [best[i][1] if i in best else "" for i in range(len(requests))]

    def _pooled(self, requests: list[tuple[str, str]], members: list[rules.Member]) -> list[tuple[float, int]]:
        queries = [Query(m.name, "echo", context + continuation) for context, continuation in requests for m in members]
        answers = self._answers(queries)
        width, out = len(members), []
        for i, (context, continuation) in enumerate(requests):
            prompt, context_chars = context + continuation, len(context.rstrip())  # spaces go with the answer
            per_model = [(m, rules.answer_positions(a, prompt, context_chars))
                         for m, a in zip(members, answers[i * width:(i + 1) * width]) if a is not None]
            if not any(m.weight > 0 for m, _ in per_model):  # nobody who proposes answered: the worst
                out.append((rules.MISSING_LOGPROB, 1))
                continue
            out.append(rules.pooled_answer(per_model, self.spec.top_logprobs, self.temperature, self.alpha))
        return out

    def _own(self, requests: list[tuple[str, str]], member: rules.Member) -> list[tuple[float, int]]:
        """One model's own log-probs of each continuation (routing: no pooling, no top-k)."""
        answers = self._answers([Query(member.name, "echo", c + x) for c, x in requests])
        out = []
        for (context, continuation), answer in zip(requests, answers):
            if answer is None:
                out.append((rules.MISSING_LOGPROB, 1))
                continue
            positions = rules.answer_positions(answer, context + continuation, len(context.rstrip()))
            out.append((sum(p.logprob for p in positions), len(positions)))
        return out

    # ---- queries --------------------------------------------------------------------------------
    @staticmethod
    def _generate(member: rules.Member, context: str, kwargs: dict[str, Any]) -> Query:
        until = tuple(s for s in kwargs.get("until") or [] if s)
        return Query(member.name, "generate", context, max_tokens=int(kwargs.get("max_gen_toks") or 64), stop=until)

    def _answers(self, queries: list[Query]) -> list[Optional[dict[str, Any]]]:
        answers = self.clients.ask(queries)
        for query, answer in zip(queries, answers):
            if answer is not None:
                self.serving_usd += self.spec.models[query.model].price(answer.get("usage") or {})
        return answers


def _proposals(texts: list[Optional[str]]) -> list[str]:
    """The distinct answers proposed for one request. A blank one (only whitespace) is no answer,
    and a whole answer's log-prob cannot beat its own first token's: " " would outscore " ABC"
    whenever every model starts with the space. So a blank answer is a candidate only when no model
    proposes anything else."""
    distinct = list(dict.fromkeys(t for t in texts if t))
    return [t for t in distinct if t.strip()] or distinct

