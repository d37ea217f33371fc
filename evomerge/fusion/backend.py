"""FusedBackend: a candidate fusion of API models, behind the backend interface every suite is
scored through (evomerge/backends), so a fusion is scored by the same PreparedSuite as a merge.

`use(recipe)` is its weight swap: the recipe says which models are queried (gate), with which
weight, temperature and plausibility cut. Then

    loglikelihood   each queried model's echo of context + continuation, pooled token by token
                    (log_linear; vote gives no log-likelihoods)
    generate_until  each queried model's greedy answer; log_linear picks the answer the pool finds
                    most likely (every queried model's echo of each proposed answer), vote the one
                    with the largest sum of weights

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
        self.loglikelihoods = rule == "log_linear"  # declared per instance: the pool's rule decides
        self.members: list[rules.Member] = []
        self.temperature, self.alpha = 1.0, 0.0
        self.serving_usd = 0.0

    def use(self, recipe: Recipe) -> None:
        """The fusion to score next (the analogue of swapping in a merge's weights)."""
        self.members, self.serving_usd = [], 0.0
        if recipe.method != self.rule:
            raise EvomergeError(f"this fusion pool scores rule {self.rule!r}, the recipe has {recipe.method!r}")
        self.members = rules.members(recipe.experts, self.spec.names, self.spec.gate_threshold)
        if not any(m.weight > 0 for m in self.members):
            raise EvomergeError("no model is queried with a positive weight (every gate below "
                                f"{self.spec.gate_threshold} or every weight <= 0): nothing proposes an answer")
        if self.rule == "log_linear":
            text_only = [m.name for m in self.members if m.name not in self.logprob_models]
            if text_only:
                raise EvomergeError(f"log_linear needs logprobs, which {text_only[0]!r} does not give: gate it off "
                                    "or use the vote rule")
        self.temperature = float(recipe.parameters.get("temperature", 1.0))
        self.alpha = float(recipe.parameters.get("alpha", 0.1))

    # ---- the backend interface ------------------------------------------------------------------
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, int, bool]]:
        if not self.loglikelihoods:
            return super().loglikelihood(requests)
        scored = self._pooled(requests, self.members)
        return [(logprob, tokens, False) for logprob, tokens in scored]

    def generate_until(self, requests: list[tuple[str, dict]]) -> list[str]:
        from evomerge.evaluator import cut_at_stop

        proposing = [m for m in self.members if m.weight > 0] if self.rule == "log_linear" else self.members
        queries = [self._generate(m, context, kwargs) for context, kwargs in requests for m in proposing]
        answers = self._answers(queries)
        width = len(proposing)
        generated = [[None if a is None else cut_at_stop(a["choices"][0]["text"] or "", kwargs.get("until") or [])
                      for a in answers[i * width:(i + 1) * width]] for i, (_, kwargs) in enumerate(requests)]
        if self.rule == "vote":
            return [rules.vote(list(zip(proposing, texts))) for texts in generated]
        return self._rerank(requests, generated)

    # ---- log_linear -----------------------------------------------------------------------------
    def _rerank(self, requests, generated: list[list[Optional[str]]]) -> list[str]:
        """Each request's proposed answers scored by the whole pool; the most likely one wins."""
        pairs, owners = [], []
        for i, ((context, _), texts) in enumerate(zip(requests, generated)):
            for text in dict.fromkeys(t for t in texts if t):
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
