"""Kinds of pool, and what a search needs from each, declared in one place.

- `local`: a base and its experts on this machine (evomerge/pool.py); each worker holds them
  resident and scores candidates on the config's suite.
- `remote`: a provider's (`evomerge serve`); the weights stay there, the workers are HTTP clients
  (provider_client.RemoteWorker) and the provider scores on its own suite.
- `fusion`: API models (evomerge/fusion); a candidate fuses their answers, scored on the config's
  suite from the run's query cache, with its serving cost per query.

A pool spec (poolspec.py: a typed union, told apart by its keys as users write them) maps to its kind
here. Everything that differs between kinds is a method or a declaration here, so the config, the search, the
WorkerPool and `export` never ask which kind they hold. A new kind is its spec model (a member of
`PoolSpec`) and one class here with a POOL_KINDS line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from evomerge.errors import ConfigError
from evomerge.poolspec import PoolSpec, parse_pool_spec

if TYPE_CHECKING:
    from evomerge.config import SearchConfig
    from evomerge.pool import Pool
    from evomerge.recipe import Recipe


@dataclass
class PoolInfo:
    """What the search space and the loop need to know about a pool before any worker starts."""

    experts: list[str]
    n_layers: int
    tasks: list[str] = field(default_factory=list)  # empty: the tasks come from the scored references
    provider: Optional[dict[str, Any]] = None  # a provider's own description, recorded in the run dir


class PoolKind:
    name: ClassVar[str]  # the spec's tag in poolspec.PoolSpec
    scores_itself: ClassVar[bool] = False  # scored on the pool's own suite: a config gives none
    uses_devices: ClassVar[bool] = True  # its workers run on workers.device (GPUs are counted for them)
    reports_cost: ClassVar[bool] = False  # its results carry a serving cost per query (API models)
    # `preselect: auto` narrows a large pool to the experts its references choose (evomerge/preselect.py)
    preselects_by_default: ClassVar[bool] = True

    def __init__(self, spec: PoolSpec):
        self.spec = spec

    def info(self, config: "SearchConfig") -> PoolInfo:
        """Checked before any run dir or worker: a bad pool is one line now, not a failed budget."""
        raise NotImplementedError

    def open(self) -> "Pool":
        """The weights, here, to merge (evomerge merge, export, a worker)."""
        raise NotImplementedError

    def new_worker(self, config: "SearchConfig", threads: int, device: str, run_dir: Optional[Path] = None) -> Any:
        """One Ray actor with the Worker interface (info, evaluate); `run_dir` for files it keeps there."""
        raise NotImplementedError

    def references(self, experts: list[str], config: "SearchConfig") -> dict[str, "Recipe"]:
        """What every candidate is read against: the base (every weight 0) and each expert alone."""
        from evomerge.baselines import reference_recipes

        return reference_recipes(experts)

    def warm_start(self, references: dict[str, Any], config: "SearchConfig") -> Optional["Recipe"]:
        """Where the search starts (the optimizer's x0), read off the scored references
        (references.json); None: the space's own init."""
        return None

    def export(self, recipe: "Recipe", output: Path, device: str = "cpu", dtype: Optional[str] = None) -> Path:
        """What `evomerge export` writes for a picked candidate."""
        raise NotImplementedError


class LocalPool(PoolKind):
    name = "local"

    def info(self, config):
        pool = self.open().validate(check_values=True)  # a NaN expert: one line now
        if config.objective is None:
            from evomerge.worker import check_backend

            check_backend(config.backend)  # e.g. openai: no weights to swap, refused before any work
        return PoolInfo(experts=pool.names, n_layers=pool.n_layers())

    def open(self):
        from evomerge.pool import Pool

        spec = self.spec
        return Pool(spec.base, dict(spec.experts), None if spec.tokenizer is None else str(spec.tokenizer))

    def new_worker(self, config, threads, device, run_dir=None):
        from evomerge.worker import ray_worker_class

        return ray_worker_class(config.workers.device).remote(
            self.spec, config.suite, config.backend, device=device, threads=threads, objective=config.objective)

    def export(self, recipe, output, device="cpu", dtype=None):
        import sys

        import yaml

        from evomerge.materialize import write_adapter_dir, write_model_dir
        from evomerge.mergekit_yaml import recipe_to_mergekit

        pool = self.open()
        if recipe.lora_merge == "lowrank":
            path = write_adapter_dir(recipe, pool, output, device=device)
        else:
            path = write_model_dir(recipe, pool, output, device=device, dtype=dtype)
        try:
            (path / "mergekit.yaml").write_text(yaml.safe_dump(recipe_to_mergekit(recipe, self.spec), sort_keys=False))
        except ConfigError as why:  # mergekit cannot express this recipe (e.g. evo_merging's top-magnitude masks)
            print(f"evomerge: no mergekit.yaml written: {str(why).split(': ', 1)[-1]}", file=sys.stderr)
        return path


class RemotePool(PoolKind):
    name = "remote"
    scores_itself = True  # the provider's suite
    uses_devices = False  # its workers wait on HTTP

    def info(self, config):
        from evomerge.provider_client import pool_info

        provider = pool_info(self.spec)  # checks the endpoint and the token once, up front
        return PoolInfo(experts=provider["experts"], n_layers=provider["n_layers"], tasks=sorted(provider["tasks"]),
                        provider=provider)

    def open(self):
        raise ConfigError(f"the pool is held by the provider at {self.spec.endpoint}: its weights are not here "
                          "(ask the provider to export the recipe)")

    def new_worker(self, config, threads, device, run_dir=None):
        import ray

        from evomerge.provider_client import RemoteWorker

        return ray.remote(num_cpus=0)(RemoteWorker).remote(self.spec, config.workers.timeout_s)

    def export(self, recipe, output, device="cpu", dtype=None):
        """The weights are the provider's: the merge config to run there, and the recipe."""
        import yaml

        from evomerge.materialize import check_output_dir, staged_dir

        output = check_output_dir(output)
        with staged_dir(output) as staging:
            (staging / "merge.yaml").write_text(  # `evomerge merge merge.yaml -o DIR`, where the pool is
                f"pool: POOL.yaml  # the provider's pool ({self.spec.endpoint})\n"
                + yaml.safe_dump({"recipe": recipe.model_dump(mode="json")}, sort_keys=False))
            recipe.save(staging / "recipe.yaml")
        return output


class FusionPool(PoolKind):
    """API models whose answers are fused (evomerge/fusion): a candidate is a fusion recipe."""

    name = "fusion"
    uses_devices = False  # its workers wait on HTTP
    reports_cost = True  # each result carries its serving cost (multi_objective: cost)
    preselects_by_default = False  # a fusion space (routing, voting) picks its own models from all of them

    def info(self, config):
        """Every model asked once (one line per model that cannot be used), and the space's rule
        checked against what the models give and what the suite asks."""
        from evomerge.evaluator import load_suite
        from evomerge.fusion.spec import probe

        found = probe(self.spec)
        rule = fusion_rule(config)
        suite = load_suite(config.suite)
        tasks = [t.task for t in suite.tasks]  # per_task spaces have genes per task
        scored = [t.task for t in suite.tasks if t.output_type != "generate_until"]
        text_only = [name for name, f in found.items() if not f["logprobs"]]
        if text_only and (rule == "log_linear" or (rule == "route" and scored)):
            raise ConfigError(f"pool: rule {rule} needs echo + logprobs{' for task ' + repr(scored[0]) if rule == 'route' else ''}"
                              f", which {', '.join(text_only)} does not give (a text-only server): use a space with "
                              "`method: vote`, or drop it")
        if rule == "vote" and scored:
            raise ConfigError(f"suite: task {scored[0]!r} needs log-likelihoods, which the vote rule does not give; "
                              "score it with generate_until tasks, or use rule log_linear")
        return PoolInfo(experts=self.spec.names, n_layers=0, tasks=tasks)

    def open(self):
        raise ConfigError("the pool is API models: there are no weights to merge (export writes the fusion)")

    def new_worker(self, config, threads, device, run_dir=None):
        import ray

        from evomerge.fusion.worker import FusionWorker

        return ray.remote(num_cpus=0)(FusionWorker).remote(self.spec, config.suite, fusion_rule(config),
                                                           str(run_dir) if run_dir else None)

    def references(self, experts, config):
        """Each model alone: gate 1, weight 1, temperature 1, no plausibility cut (there is no base)."""
        from evomerge.recipe import Recipe

        rule = fusion_rule(config)
        parameters = {"temperature": 1.0, "alpha": 0.0} if rule == "log_linear" else {}

        def alone(name: str) -> "Recipe":
            return Recipe(method=rule, experts={e: {"weight": float(e == name), "density": float(e == name)}
                                                for e in experts}, parameters=parameters)

        return {name: alone(name) for name in experts}

    def warm_start(self, references, config):
        """Routing starts with each task sent to the model that scored best alone on it: the
        references are each model alone on the same suite, so that routing's score is known before
        the search, and a search over the argmax's plateaus need not stumble on it (the tiny zoo's
        routing, replayed: NGOpt from the space's init found it in 0 of 10 seeds at 60
        evaluations on one machine's scores, 10 of 10 on another's)."""
        from evomerge.recipe import Recipe

        alone = {name: r["scores"] for name, r in references.items() if r.get("status") == "ok" and r.get("scores")}
        if fusion_rule(config) != "route" or not alone:
            return None
        tasks = sorted({task for scores in alone.values() for task in scores})
        best = {task: max(sorted(alone), key=lambda name: alone[name].get(task, float("-inf"))) for task in tasks}
        return Recipe(method="route", experts={name: {"weight": 0.5, "density": 1.0} for name in self.spec.names},
                      overrides=[{"modules": f"task:{task}", "experts": {name: {"weight": float(name == best[task])}
                                                                         for name in self.spec.names}}
                                 for task in tasks])

    def export(self, recipe, output, device="cpu", dtype=None):
        """fusion.yaml (what `evomerge fuse` serves: the queried models, their weights and gates) + recipe.yaml."""
        from evomerge.fusion.serve import fusion_config
        from evomerge.materialize import check_output_dir, staged_dir

        import yaml

        output = check_output_dir(output)
        with staged_dir(output) as staging:
            (staging / "fusion.yaml").write_text(yaml.safe_dump(fusion_config(recipe, self.spec), sort_keys=False))
            recipe.save(staging / "recipe.yaml")
        return output


def fusion_rule(config: "SearchConfig") -> str:
    """The one fusion rule a fusion search's space names (log_linear or vote)."""
    from evomerge.methods import get_method
    from evomerge.spacespec import load_spec

    spec, where = load_spec(config.space)
    methods = [spec.method] if isinstance(spec.method, str) else list(spec.method)
    weights = [m for m in methods if get_method(m).acts_on != "outputs"]
    if weights or len(methods) != 1:
        raise ConfigError(f"{where}: a fusion pool of API models is searched with one fusion rule (method: log_linear"
                          f", vote or route; presets fusion, fusion-two-stage, fusion-vote, fusion-routing), not "
                          f"{', '.join(methods)}")
    return methods[0]


POOL_KINDS: dict[str, type[PoolKind]] = {kind.name: kind for kind in (LocalPool, RemotePool, FusionPool)}


def pool_kind(spec: "PoolSpec | dict[str, Any]") -> PoolKind:
    """The kind of a resolved spec (a run's config.json holds one), wrapping its typed model."""
    from evomerge.poolspec import spec_kind

    spec = parse_pool_spec(spec)
    return POOL_KINDS[spec_kind(spec)](spec)
