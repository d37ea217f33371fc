"""SearchSpace: which recipe parameters are searched, their bounds, and genome <-> Recipe.

Like nevergrad's parametrization: named, bounded genes for people (``names()``), a flat float
vector for optimizers (``x0``, ``lower``, ``upper``, ``to_vector`` / ``to_recipe``). The genes are
derived from what the merge method declares (``evomerge.methods``: ``MergeMethod.parameters``):
per-expert parameters (weight, density) give one gene per expert (and per layer group and module
filter when the space asks for it), global ones (lambda, gamma, epsilon, k, t, normalize, ...) one
gene each; a list of methods adds a categorical gene ``method`` encoded as a float in [0, k).
Gene bounds outside the method's domain are a ConfigError naming the gene.

A space is a YAML spec (``searchspaces/*.yaml``, see ``SpaceSpec`` in ``evomerge.spacespec``),
loaded by ``load_space``.
Specs may have stages (Evo-Merging: densities first, then weights with the best densities fixed):
``space.stage(i, fixed_from=best_recipe)`` is the space of stage i, whose genes outside that
stage's ``search`` are fixed (stage ``fixed:`` values first, then ``fixed_from``'s values, then
the genes' ``init``). ``space.penalty(x)`` is the stage's L1 term, ``l1 * mean |x|`` over its
float genes, added to the objective by the search loop.

Gene names: ``density[add]``, ``weight[add]@layers0-1/attn`` (layers 0 and 1, attention
tensors), ``weight[mul]@layer3``, ``lambda``, ``method``; with ``per_task`` (fusion pools),
``weight[add]@task:upper``: the override ``modules: task:upper`` holds that task's values.

Layer groups: ``layer_groups: G`` (G divides the number of layers L; or ``per_layer``) makes
group g cover layers [g L/G, (g+1) L/G); each (group, module) cell becomes a recipe ``Override``.
Tensors outside every cell (embeddings, final norm, head; and with module filters, the layer
norms) get the recipe's own ``experts`` values, which are the mean of each expert's cell genes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from evomerge.errors import ConfigError, did_you_mean
from evomerge.spacespec import PRESETS_DIR, GeneSpec, SpaceSpec, StageSpec, Value, load_spec, presets

# the spec's names (evomerge/spacespec.py) stay importable from here, as before
__all__ = ["SearchSpace", "Gene", "load_space", "EXPERT_PARAMS", "MODULE_LABELS", "METHOD_GENE",
           "SpaceSpec", "GeneSpec", "StageSpec", "Value", "PRESETS_DIR", "presets"]

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


class SearchSpace:
    """Genes, their bounds, and genome <-> Recipe. Build with ``load_space``."""

    def __init__(
        self,
        spec: SpaceSpec,
        experts: list[str],
        n_layers: int | None = None,
        where: str = "search space",
        *,
        tasks: list[str] | None = None,
        _stage: tuple[int, dict[str, float]] | None = None,
    ):
        self.spec, self.experts, self.n_layers, self.where = spec, list(experts), n_layers, where
        self.tasks = list(tasks or [])  # per_task spaces: the suite's tasks
        if not self.experts:
            raise ConfigError(f"{where}: a search space needs at least one expert")
        if len(set(self.experts)) != len(self.experts):
            raise ConfigError(f"{where}: expert names must be unique, got {self.experts}")
        self.methods = [spec.method] if isinstance(spec.method, str) else list(spec.method)
        self._method_objs = [_get_method(m, where) for m in self.methods]
        self.cells = self._cells()
        self.constants = self._constants()
        self.genes = self._genes()  # every gene, searched here or not
        self.stages = spec.stages or [StageSpec(search=sorted({g.param for g in self.genes}))]
        self._check_stages()
        if _stage is None:  # the whole space: every gene searched
            self.stage_index, self.stage_name = None, None
            self.fixed: dict[str, float] = {}
            self.l1, self.budget_fraction = spec.l1, 1.0
            self.optimizer_hints = dict(spec.optimizer)
        else:
            self.stage_index, self.fixed = _stage
            stage = self.stages[self.stage_index]
            self.stage_name = stage.name or f"stage{self.stage_index}"
            self.l1 = spec.l1 if stage.l1 is None else stage.l1
            self.budget_fraction = stage.budget_fraction
            self.optimizer_hints = dict(spec.optimizer if stage.optimizer is None else stage.optimizer)
        self.searched = [g for g in self.genes if g.name not in self.fixed]
        if not self.searched:
            raise ConfigError(f"{where}: {self.stage_name or 'the space'} searches no gene")

    # ---- the vector side ----------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return len(self.searched)

    @property
    def lower(self) -> np.ndarray:
        return np.array([g.low for g in self.searched])

    @property
    def upper(self) -> np.ndarray:
        return np.array([g.high for g in self.searched])

    @property
    def x0(self) -> np.ndarray:
        return np.array([g.init for g in self.searched])

    def names(self) -> list[str]:
        """Human-readable names of the searched genes, in vector order."""
        return [g.name for g in self.searched]

    def penalty(self, x: np.ndarray) -> float:
        """``l1 * mean |x|`` over the searched float genes (not method choices, flags or ints)."""
        idx = [i for i, g in enumerate(self.searched) if g.kind == "float"]
        if not self.l1 or not idx:
            return 0.0
        return float(self.l1 * np.mean(np.abs(np.asarray(x, dtype=float)[idx])))

    # ---- genome <-> Recipe ----------------------------------------------------------------------
    def to_recipe(self, x: np.ndarray, seed: int | None = None):
        """The Recipe of genome ``x`` (searched genes in ``names()`` order, clipped to the bounds)."""
        from evomerge.recipe import ExpertOverride, ExpertParams, Override, Recipe

        x = np.asarray(x, dtype=float).reshape(-1)
        if x.shape != (self.dim,):
            raise ValueError(f"genome has {x.size} values, the space has {self.dim} genes")
        x = np.clip(x, self.lower, self.upper)  # rounding noise from a log or an optimizer
        values = dict(self.fixed)
        values.update({g.name: float(v) for g, v in zip(self.searched, x)})
        decoded = {g.name: g.decode(values[g.name]) for g in self.genes}
        method_i = int(decoded[METHOD_GENE]) if METHOD_GENE in decoded else 0
        method = self._method_objs[method_i]
        declared = {p.name for p in method.parameters}

        per_expert = [p for p in EXPERT_PARAMS if p in declared]
        experts, overrides = {}, []
        for e in self.experts:
            fields = {}
            for p in per_expert:
                if p in self.constants:
                    fields[p] = float(self.constants[p])
                elif any(g.param == p for g in self.genes):
                    cell_values = [decoded[self._gene_name(p, e, c)] for c in self.cells]
                    fields[p] = float(np.mean(cell_values))
            experts[e] = ExpertParams(**fields)
        if self.structured:
            for layers, module in self.cells:
                cell = {}
                for e in self.experts:
                    fields = {p: decoded[self._gene_name(p, e, (layers, module))] for p in per_expert
                              if p not in self.constants and any(g.param == p for g in self.genes)}
                    if fields:
                        cell[e] = ExpertOverride(**fields)
                if cell:
                    overrides.append(Override(layers=layers, modules=module, experts=cell))
        parameters: dict[str, float | bool] = {}
        for name, value in self.constants.items():
            if name in declared and name not in EXPERT_PARAMS:
                parameters[name] = value
        for g in self.genes:
            if g.expert is None and g.param != METHOD_GENE and g.param in declared:
                parameters[g.param] = decoded[g.name]
        return Recipe(method=method.name, experts=experts, parameters=parameters, overrides=overrides,
                      seed=self.spec.seed if seed is None else seed, lora_merge=self.spec.lora_merge)

    def to_vector(self, recipe) -> np.ndarray:
        """The genome of ``recipe`` (searched genes only). Exact for float genes; a recipe from
        another space maps to the nearest thing this space can express (see ``gene_value``)."""
        return np.array([self.gene_value(recipe, g) for g in self.searched])

    def gene_value(self, recipe, gene: Gene) -> float:
        """What ``recipe`` says for ``gene``: its method's index (+0.5), an expert's value in the
        gene's cell (the recipe's own value, then every override covering the cell, in order), or
        a global parameter (the method's default when the recipe leaves it out)."""
        if gene.param == METHOD_GENE:
            if recipe.method not in self.methods:
                raise ConfigError(f"{self.where}: recipe method {recipe.method!r} is not one of {self.methods}")
            return self.methods.index(recipe.method) + 0.5
        if gene.expert is not None:
            if gene.expert not in recipe.experts:
                raise ConfigError(f"{self.where}: the recipe has no expert {gene.expert!r} (gene {gene.name})")
            value = getattr(recipe.experts[gene.expert], gene.param)
            for o in recipe.overrides:
                if self._covers(o, gene):
                    v = getattr(o.experts.get(gene.expert), gene.param, None)
                    value = value if v is None else v
            return float(value)
        value = recipe.parameters.get(gene.param)
        if value is None:
            spec = _get_method(recipe.method, self.where).param(gene.param)
            value = spec.default if spec is not None and spec.default is not None else gene.init
        return float(value)

    @staticmethod
    def _covers(override, gene: Gene) -> bool:
        if override.layers is not None:
            if gene.layers is None or not (override.layers[0] <= gene.layers[0] and gene.layers[1] <= override.layers[1]):
                return False
        return override.modules is None or override.modules == gene.module

    # ---- stages --------------------------------------------------------------------------------
    @property
    def n_stages(self) -> int:
        return len(self.stages)

    def stage(self, i: int, fixed_from=None) -> "SearchSpace":
        """The space of stage ``i``: its ``search`` genes searched, every other gene fixed at the
        stage's ``fixed`` value, else ``fixed_from``'s value (the best recipe of the stage
        before), else its ``init``."""
        if not 0 <= i < self.n_stages:
            raise ConfigError(f"{self.where}: no stage {i} (the space has {self.n_stages})")
        stage = self.stages[i]
        fixed: dict[str, float] = {}
        for g in self.genes:
            if g.param in stage.search:
                continue
            if g.param in stage.fixed:
                fixed[g.name] = self._encode(g, stage.fixed[g.param], f"stages[{i}].fixed.{g.param}")
            elif fixed_from is not None:
                fixed[g.name] = self.gene_value(fixed_from, g)
            else:
                fixed[g.name] = g.init
        return SearchSpace(self.spec, self.experts, self.n_layers, self.where, tasks=self.tasks, _stage=(i, fixed))

    def __repr__(self) -> str:
        return f"SearchSpace({self.where!r}, dim={self.dim}, stage={self.stage_name})"

    # ---- construction --------------------------------------------------------------------------
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


def _get_method(name: str, where: str):
    from evomerge.methods import get_method

    try:
        return get_method(name)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_space(
    space: str | Path | dict[str, Any],
    experts: list[str],
    n_layers: int | None = None,
    tasks: list[str] | None = None,
    **overrides: Any,
) -> SearchSpace:
    """A preset name (``searchspaces/NAME.yaml``), a YAML path, or a spec dict. A spec (file or
    dict) may start from another with ``preset: NAME``: its top-level keys replace the preset's.
    ``overrides`` replace top-level keys last (e.g. ``layer_groups=4``, ``lora_merge="lowrank"``)."""
    spec, where = load_spec(space, **overrides)
    return SearchSpace(spec, experts, n_layers, where, tasks=tasks)
