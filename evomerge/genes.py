"""Genes: how a search space's genes are derived from its spec and the merge methods' declarations.

``GeneDerivation`` is the construction half of ``SearchSpace`` (evomerge/searchspace.py, which
keeps the genome <-> recipe half): the cells (layer groups x module filters, or the suite's tasks),
one gene per declared parameter (per expert and cell for per-expert ones), the fixed constants, and
every check of a spec's values against the methods' domains, each one line naming the gene.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from evomerge.errors import ConfigError, did_you_mean
from evomerge.spacespec import GeneSpec, Value

EXPERT_PARAMS = ("weight", "density")  # the per-expert fields a Recipe holds (ExpertParams)
MODULE_LABELS = {"attention": "attn", "mlp": "mlp"}
METHOD_GENE = "method"
TASK_CELL = "task:"  # the `modules` of a per-task override: a fusion's values for that task's queries


@dataclass(frozen=True)
class Gene:
    name: str  # "weight[add]", "density[add]@layers0-1/attn", "lambda", "method"
    param: str
    low: float
    high: float
    init: float
    kind: Literal["float", "int", "flag", "choice"] = "float"
    expert: str | None = None
    layers: tuple[int, int] | None = None  # [start, end); None = the whole model
    module: str | None = None  # "attention" | "mlp" | None

    def decode(self, v: float) -> float | bool:
        if self.kind == "flag":
            return bool(v >= 0.5)
        if self.kind == "int":
            return float(round(v))
        if self.kind == "choice":
            return float(min(max(int(math.floor(v)), 0), int(self.high) - 1))
        return float(v)


class GeneDerivation:
    """Needs ``spec``, ``experts``, ``n_layers``, ``tasks``, ``where``, ``methods`` and ``_method_objs``."""

    @property
    def structured(self) -> bool:
        return self.cells != [(None, None)]

    def _cells(self) -> list[tuple[tuple[int, int] | None, str | None]]:
        if self.spec.per_task:  # one cell per task: an override `modules: task:NAME` (fusion pools)
            if self.spec.layer_groups != 1 or self.spec.modules:
                raise ConfigError(f"{self.where}: per_task genes do not combine with layer_groups or modules")
            if not self.tasks:
                raise ConfigError(f"{self.where}: per_task needs the suite's tasks (a fusion pool with a `suite:`)")
            return [(None, f"{TASK_CELL}{task}") for task in self.tasks]
        groups = self.spec.layer_groups
        ranges: list[tuple[int, int] | None] = [None]
        if groups == "per_layer" or groups != 1:
            if not self.n_layers:
                raise ConfigError(f"{self.where}: layer_groups needs the number of layers (n_layers)")
            L = self.n_layers
            G = L if groups == "per_layer" else int(groups)
            if G < 1 or L % G:
                divisors = [d for d in range(1, L + 1) if L % d == 0]
                raise ConfigError(f"{self.where}: layer_groups {G} does not divide the {L} layers; use one of {divisors}")
            ranges = [(g * L // G, (g + 1) * L // G) for g in range(G)] if G > 1 else [None]
        modules: list[str | None] = list(self.spec.modules) if self.spec.modules else [None]
        if len(set(modules)) != len(modules):
            raise ConfigError(f"{self.where}: modules lists a filter twice: {modules}")
        return [(r, m) for r in ranges for m in modules]

    def _gene_name(self, param: str, expert: str, cell) -> str:
        layers, module = cell
        where = []
        if layers is not None:
            a, b = layers[0], layers[1] - 1
            where.append(f"layer{a}" if a == b else f"layers{a}-{b}")
        if module is not None:
            where.append(MODULE_LABELS.get(module, module))  # task:NAME stays as it is
        return f"{param}[{expert}]" + ("@" + "/".join(where) if where else "")

    def _declaring(self, param: str):
        return [(m.name, m.param(param)) for m in self._method_objs if m.param(param) is not None]

    def _check_param(self, param: str) -> list:
        declaring = self._declaring(param)
        if not declaring:
            known = sorted({p.name for m in self._method_objs for p in m.parameters})
            raise ConfigError(f"{self.where}: genes.{param}: merge method {'|'.join(self.methods)} has no parameter"
                              f" {param!r};{did_you_mean(param, known)} it takes: {', '.join(known)}")
        return declaring

    def _constants(self) -> dict[str, float | bool]:
        out: dict[str, float | bool] = {}
        for param, spec in self.spec.genes.items():
            if isinstance(spec, GeneSpec):
                continue
            if param == METHOD_GENE:
                raise ConfigError(f"{self.where}: genes.method: give the method as `method:`, not a gene")
            declaring = self._check_param(param)
            value = self._value(spec, f"genes.{param}")
            for method, p in declaring:
                if p.is_flag != isinstance(value, bool):
                    raise ConfigError(f"{self.where}: genes.{param}: {method} wants {'true/false' if p.is_flag else 'a number'}, got {spec!r}")
                if not p.is_flag:
                    _check_domain(self.where, f"genes.{param}", value, value, method, p)
            out[param] = value
        return out

    def _genes(self) -> list[Gene]:
        genes: list[Gene] = []
        if len(self.methods) > 1:
            genes.append(Gene(METHOD_GENE, METHOD_GENE, 0.0, float(len(self.methods)), 0.5, "choice"))
        for param, spec in self.spec.genes.items():
            if not isinstance(spec, GeneSpec):
                continue
            if param == METHOD_GENE:
                raise ConfigError(f"{self.where}: genes.method: give a list of methods as `method:` instead")
            declaring = self._check_param(param)
            label = f"genes.{param}"
            init = self._value(spec.init, f"{label}.init")
            if isinstance(init, bool):
                raise ConfigError(f"{self.where}: {label}.init must be a number (flags: 0 or 1)")
            if not spec.low < spec.high:
                raise ConfigError(f"{self.where}: {label}: low {spec.low} must be below high {spec.high}")
            if not spec.low <= init <= spec.high:
                raise ConfigError(f"{self.where}: {label}: init {init} is outside [{spec.low}, {spec.high}]")
            first = declaring[0][1]
            kind = "flag" if first.is_flag else ("int" if isinstance(first.default, int) else "float")
            for method, p in declaring:
                if p.is_flag:
                    if (spec.low, spec.high) != (0.0, 1.0):
                        raise ConfigError(f"{self.where}: {label}: {param} is true/false; search it with low 0, high 1")
                else:
                    _check_domain(self.where, label, spec.low, spec.high, method, p)
            if first.per_expert:
                if param not in EXPERT_PARAMS:
                    raise ConfigError(f"{self.where}: {label}: per-expert parameter {param!r} has no place in a recipe"
                                      f" (recipes hold {', '.join(EXPERT_PARAMS)} per expert)")
                for e in self.experts:
                    for cell in self.cells:
                        genes.append(Gene(self._gene_name(param, e, cell), param, spec.low, spec.high, init, kind,
                                          expert=e, layers=cell[0], module=cell[1]))
            else:
                genes.append(Gene(param, param, spec.low, spec.high, init, kind))
        return genes

    def _check_stages(self) -> None:
        params = {g.param for g in self.genes}
        for i, stage in enumerate(self.stages):
            for name in stage.search:
                if name not in params:
                    why = " is fixed in `genes`; give it {low, high, init} to search it" if name in self.constants else \
                        f" is not a searched gene (searched: {', '.join(sorted(params)) or 'none'})"
                    raise ConfigError(f"{self.where}: stages[{i}].search: {name!r}{why}")
            for name, value in stage.fixed.items():
                if name in stage.search:
                    raise ConfigError(f"{self.where}: stages[{i}]: {name!r} is both searched and fixed")
                if name not in params:
                    raise ConfigError(f"{self.where}: stages[{i}].fixed: {name!r} is not a gene of this space")

    def _value(self, v: Value, label: str) -> float | bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str):
            if re.fullmatch(r"\s*1\s*/\s*N\s*", v):
                return 1.0 / len(self.experts)
            raise ConfigError(f'{self.where}: {label}: {v!r} is not a number; the only expression is "1/N"')
        return float(v)

    def _encode(self, gene: Gene, v: Value, label: str) -> float:
        if gene.kind == "choice":
            if v not in self.methods:
                raise ConfigError(f"{self.where}: {label}: {v!r} is not one of the methods {self.methods}")
            return self.methods.index(v) + 0.5
        value = self._value(v, label)
        if gene.kind == "flag":
            return 1.0 if value else 0.0
        if isinstance(value, bool):
            raise ConfigError(f"{self.where}: {label}: {gene.param} wants a number, got {v!r}")
        for method, p in self._declaring(gene.param):
            _check_domain(self.where, label, value, value, method, p)
        return value



def _check_domain(where: str, label: str, low: float, high: float, method: str, p) -> None:
    if (p.low is not None and low < p.low) or (p.high is not None and high > p.high):
        domain = f"[{'-inf' if p.low is None else p.low}, {'inf' if p.high is None else p.high}]"
        got = f"{low}" if low == high else f"[{low}, {high}]"
        raise ConfigError(f"{where}: {label}: {got} is outside the domain {domain} of {p.name!r} in method {method!r}")


def get_method_in(name: str, where: str):
    from evomerge.methods import get_method

    try:
        return get_method(name)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
