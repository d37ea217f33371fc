"""SearchSpace: which recipe parameters are searched, their bounds, and genome <-> Recipe.

Like nevergrad's parametrization: named, bounded genes for people (``names()``), a flat float
vector for optimizers (``x0``, ``lower``, ``upper``, ``to_vector`` / ``to_recipe``). The genes are
derived from what the merge method declares (``evomerge.methods``: ``MergeMethod.parameters``):
per-expert parameters (weight, density) give one gene per expert (and per layer group and module
filter when the space asks for it), global ones (lambda, gamma, epsilon, k, t, normalize, ...) one
gene each; a list of methods adds a categorical gene ``method`` encoded as a float in [0, k).
Gene bounds outside the method's domain are a ConfigError naming the gene.

A space is a YAML spec (``searchspaces/*.yaml``, see ``SpaceSpec`` in ``evomerge.spacespec``),
loaded by ``load_space``; how its genes are derived from the spec and checked is ``evomerge.genes``.
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

from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.genes import EXPERT_PARAMS, METHOD_GENE, MODULE_LABELS, Gene, GeneDerivation, get_method_in
from evomerge.spacespec import PRESETS_DIR, GeneSpec, SpaceSpec, StageSpec, Value, load_spec, presets

# the spec's names (evomerge/spacespec.py) stay importable from here, as before
__all__ = ["SearchSpace", "Gene", "load_space", "EXPERT_PARAMS", "MODULE_LABELS", "METHOD_GENE",
           "SpaceSpec", "GeneSpec", "StageSpec", "Value", "PRESETS_DIR", "presets"]


class SearchSpace(GeneDerivation):
    """Genes, their bounds, and genome <-> Recipe. Build with ``load_space``."""

    def __init__(
        self,
        spec: SpaceSpec,
        experts: list[str],
        n_layers: int | None = None,
        where: str = "search space",
        *,
        tasks: list[str] | None = None,
        _stage: tuple[int, dict[str, float], dict[str, float]] | None = None,
    ):
        self.spec, self.experts, self.n_layers, self.where = spec, list(experts), n_layers, where
        self.tasks = list(tasks or [])  # per_task spaces: the suite's tasks
        if not self.experts:
            raise ConfigError(f"{where}: a search space needs at least one expert")
        if len(set(self.experts)) != len(self.experts):
            raise ConfigError(f"{where}: expert names must be unique, got {self.experts}")
        self.methods = [spec.method] if isinstance(spec.method, str) else list(spec.method)
        self._method_objs = [get_method_in(m, where) for m in self.methods]
        self.cells = self._cells()
        self.constants = self._constants()
        self.genes = self._genes()  # every gene, searched here or not
        self.stages = spec.stages or [StageSpec(search=sorted({g.param for g in self.genes}))]
        self._check_stages()
        if _stage is None:  # the whole space: every gene searched
            self.stage_index, self.stage_name = None, None
            self.fixed: dict[str, float] = {}
            self.start: dict[str, float] = {}
            self.l1, self.budget_fraction, self.evaluations = spec.l1, 1.0, None
            self.optimizer_hints = dict(spec.optimizer)
        else:
            self.stage_index, self.fixed, self.start = _stage
            stage = self.stages[self.stage_index]
            self.stage_name = stage.name or f"stage{self.stage_index}"
            self.l1 = spec.l1 if stage.l1 is None else stage.l1
            self.budget_fraction, self.evaluations = stage.budget_fraction, stage.evaluations
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
        """The genes' init, or for a stage with `start: best` the best recipe's values so far."""
        x0 = np.array([self.start.get(g.name, g.init) for g in self.searched])
        return np.clip(x0, self.lower, self.upper)

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
            spec = get_method_in(recipe.method, self.where).param(gene.param)
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
        before), else its ``init``. With ``start: best`` the searched genes start at
        ``fixed_from``'s values too."""
        if not 0 <= i < self.n_stages:
            raise ConfigError(f"{self.where}: no stage {i} (the space has {self.n_stages})")
        stage = self.stages[i]
        fixed: dict[str, float] = {}
        start: dict[str, float] = {}
        for g in self.genes:
            if g.param in stage.search:
                if stage.start == "best" and fixed_from is not None:
                    start[g.name] = self.gene_value(fixed_from, g)
                continue
            if g.param in stage.fixed:
                fixed[g.name] = self._encode(g, stage.fixed[g.param], f"stages[{i}].fixed.{g.param}")
            elif fixed_from is not None:
                fixed[g.name] = self.gene_value(fixed_from, g)
            else:
                fixed[g.name] = g.init
        return SearchSpace(self.spec, self.experts, self.n_layers, self.where, tasks=self.tasks, _stage=(i, fixed, start))

    def __repr__(self) -> str:
        return f"SearchSpace({self.where!r}, dim={self.dim}, stage={self.stage_name})"

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
