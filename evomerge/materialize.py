"""materialize: Recipe x Pool -> merged tensors, one tensor at a time, float32 accumulation.

Sinks: a state dict in memory (`merge_state_dict`), an HF model directory (`write_model_dir`,
written to a temporary directory then renamed), a PEFT adapter directory for LoRA merges that stay
low rank (`write_adapter_dir`), and a live torch model updated in place (`ResidentMerger`), which
holds the task vectors (or LoRA factors) on the device once so a new recipe is re-merged without
reading the disk.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from evomerge.errors import ConfigError, EvomergeError
from evomerge.methods import METHODS, get_method, lowrank_lora_merge
from evomerge.pool import LoraFactors, Pool, all_finite
from evomerge.recipe import Recipe, TensorPlan

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODEL_FILES = ("config.json", "generation_config.json")  # from the base
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")  # from pool.tokenizer_path
SHARD_BYTES = 2 * 1024**3
# Tensors merged at once by iter_merged: most merge ops (topk above all) run on one core per
# tensor, so two tensors in flight keep two cores busy; memory grows with this, not the pool.
MERGE_THREADS = min(2, os.cpu_count() or 1)


def resolve_dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; available: float32, float16, bfloat16")
    return DTYPES[name]


def tensor_generator(seed: int, tensor_name: str, device: torch.device | str) -> torch.Generator:
    """A generator per tensor, seeded from the recipe seed and the name: order-independent masks."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(tensor_name.encode())) % (2**63))
    return generator


def check_recipe(recipe: Recipe, pool: Pool) -> None:
    """Everything about a recipe that can be checked before touching a tensor: its own values,
    every override's (one line naming the override's index and key), and every combination of
    overrides a tensor of the pool gets, so that no value outside a method's domain fails mid-merge."""
    method = get_method(recipe.method)
    unknown = [name for name in recipe.experts if name not in pool.experts]
    if unknown:
        raise ConfigError(f"recipe names expert {unknown[0]!r}, which is not in the pool ({', '.join(pool.names)})")
    for index, override in enumerate(recipe.overrides):
        _check_override_values(recipe, method, index, override)
    if recipe.lora_merge == "lowrank":
        if pool.kinds != {"lora"}:
            raise ConfigError("lora_merge: lowrank needs a pool of LoRA adapters only")
        if method.lora_rule != "sparsify_a":
            raise ConfigError(f"lora_merge: lowrank is defined for methods that sparsify only LoRA's A "
                              f"({', '.join(m for m in METHODS if METHODS.get(m).lora_rule == 'sparsify_a')}), "
                              f"not {recipe.method}")
    _check_plan(method, _plan_with(recipe, []))  # the recipe's own values: the method's message as it is
    for index, override in enumerate(recipe.overrides):  # each override over them, whatever it matches
        with _prefixed(f"recipe overrides[{index}]: "):
            _check_plan(method, _plan_with(recipe, [override]))
    _check_tensor_plans(recipe, method, pool)


def _plan_with(recipe: Recipe, overrides: list) -> TensorPlan:
    """The plan of a tensor that these overrides match (their layer and module filters aside)."""
    experts, parameters = dict(recipe.experts), dict(recipe.parameters)
    for override in overrides:
        for name, values in override.experts.items():
            experts[name] = values.apply_to(experts[name])
        parameters.update(override.parameters)
    return TensorPlan(weights=tuple(experts[n].weight for n in recipe.experts),
                      densities=tuple(experts[n].density for n in recipe.experts), parameters=parameters)


def _check_override_values(recipe: Recipe, method, index: int, override) -> None:
    """Per-expert values of one override, each against the method's domain for its key."""
    from evomerge.methods import _check_domain

    for name, values in override.experts.items():
        if name not in recipe.experts:
            raise ConfigError(f"recipe overrides[{index}].experts.{name}: expert {name!r} is not one of the "
                              f"recipe's experts ({', '.join(recipe.experts)})")
        for key, value in values.model_dump(exclude_none=True).items():
            spec = method.param(key)
            if spec is not None:  # a key the method does not take is ignored, as in the recipe's own values
                _check_domain(method.name, f"recipe overrides[{index}].experts.{name}.{key}", float(value), spec)


def _check_tensor_plans(recipe: Recipe, method, pool: Pool) -> None:
    """Overrides that match one tensor together (say two whose weights then sum to 0): every
    distinct plan the pool's merged tensors get, checked once."""
    if not recipe.overrides:
        return
    seen: set = set()
    for name in pool.tensor_names():
        if not pool.touched(name):
            continue
        plan = recipe.plan(name)
        key = (plan.weights, plan.densities, tuple(sorted(plan.parameters.items())))
        if key in seen:
            continue
        seen.add(key)
        matched = ", ".join(str(i) for i, override in enumerate(recipe.overrides) if override.matches(name))
        with _prefixed(f"recipe overrides[{matched}] combined on tensor {name}: "):
            _check_plan(method, plan)


def _check_plan(method, plan) -> None:
    """Let the method check its parameter domains once, on a 1-element tensor."""
    one = torch.zeros(1)
    method.merge(one, [one] * len(plan.weights), list(plan.weights), list(plan.densities),
                 dict(plan.parameters), torch.Generator().manual_seed(0))


@contextlib.contextmanager
def _prefixed(where: str) -> Iterator[None]:
    """A ConfigError raised inside says where it comes from."""
    try:
        yield
    except ConfigError as error:
        raise ConfigError(f"{where}{error}") from None


class TensorSource:
    """Where one merge reads its inputs: the pool on disk, or tensors held resident on a device."""

    def __init__(self, pool: Pool, device: str):
        self.pool, self.device = pool, torch.device(device)

    def base(self, name: str) -> torch.Tensor:
        return self.pool.base_tensor(name).to(self.device, torch.float32)

    def presparsified(self, experts, name, deltas, densities, sparsify):
        """The inputs of a method that declares `presparsify`; a streamed merge lets the method
        sparsify as it goes (ResidentSource keeps the masks between candidates instead)."""
        return deltas, densities

    def delta(self, expert: str, name: str, base: torch.Tensor) -> torch.Tensor | None:
        entry = self.pool.experts[expert]
        if entry.kind == "lora":
            factors = self.factors(expert, name)
            return None if factors is None else factors.scaling * (factors.B @ factors.A)
        return self.pool.task_vector(expert, name, base)

    def factors(self, expert: str, name: str) -> LoraFactors | None:
        found = self.pool.lora_factors(expert, name)
        if found is None:
            return None
        return LoraFactors(found.A.to(self.device, torch.float32), found.B.to(self.device, torch.float32), found.scaling)


def merge_tensor(recipe: Recipe, name: str, source: TensorSource) -> torch.Tensor | None:
    """The merged float32 tensor for `name`, or None when no expert touches it (keep the base)."""
    if not source.pool.touched(name):
        return None
    plan = recipe.plan(name)
    experts = list(recipe.experts)
    base = source.base(name)
    method = get_method(recipe.method)
    if source.pool.kinds == {"lora"} and method.lora_rule == "sparsify_a":
        return _merge_lora_sparsified_a(recipe, method, name, source, base, experts, plan)
    deltas = [source.delta(expert, name, base) for expert in experts]
    if all(delta is None for delta in deltas):
        return None
    deltas = [torch.zeros_like(base) if delta is None else delta for delta in deltas]
    densities = list(plan.densities)
    if method.presparsify is not None:
        deltas, densities = source.presparsified(experts, name, deltas, densities, method.presparsify)
    generator = tensor_generator(recipe.seed, name, source.device)
    return method.merge(base, deltas, list(plan.weights), densities, dict(plan.parameters), generator)


def _merge_lora_sparsified_a(recipe, method, name, source, base, experts, plan) -> torch.Tensor | None:
    """A method of LoRA rule "sparsify_a" (Evo-Merging) on LoRA factors: only A is sparsified
    (asymmetric sparsification), by the method's own sparsifier.

    lowrank: A = sum w_i TopMag(A_i), B = sum w_i s_i B_i, delta = B A (cross terms included).
    dense:   delta = sum w_i s_i B_i TopMag(A_i).
    """
    factors = [source.factors(expert, name) for expert in experts]
    used = [(f, w, d) for f, w, d in zip(factors, plan.weights, plan.densities) if f is not None]
    if not used:
        return None
    if recipe.lora_merge == "lowrank":
        A, B = lowrank_lora(used)
        return base + B @ A
    delta = torch.zeros_like(base)
    for f, weight, density in used:
        delta += (weight * f.scaling) * (f.B @ method.presparsify(f.A, density))
    return base + delta


def lowrank_lora(used: list[tuple[LoraFactors, float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    ranks = {f.A.shape[0] for f, _, _ in used}
    if len(ranks) > 1:
        raise ConfigError(f"lora_merge: lowrank needs one LoRA rank across experts, found ranks {sorted(ranks)}")
    return lowrank_lora_merge([f.A for f, _, _ in used], [f.scaling * f.B for f, _, _ in used],
                              [w for _, w, _ in used], [d for _, _, d in used])


def iter_merged(recipe: Recipe, pool: Pool, device: str = "cpu",
                on_tensor: Callable[[str], None] | None = None,
                threads: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, float32 tensor) for every base tensor, in the base's order; untouched tensors
    are the base's. Up to `threads` tensors are merged at once (default MERGE_THREADS on CPU)."""
    check_recipe(recipe, pool)
    source = TensorSource(pool, device)
    threads = threads or (MERGE_THREADS if source.device.type == "cpu" else 1)

    def merged(name: str) -> torch.Tensor:
        tensor = merge_tensor(recipe, name, source)
        if tensor is None:
            return source.base(name)
        if not all_finite(tensor):
            raise EvomergeError(f"merged tensor {name} holds NaN/Inf (recipe {recipe.id})")
        return tensor

    names = pool.tensor_names()
    if threads <= 1:
        for name in names:
            tensor = merged(name)
            if on_tensor:
                on_tensor(name)
            yield name, tensor
        return
    # A tensor's working set is about its size times the experts, so the budget for tensors in
    # flight is the largest tensor alone: small tensors go in pairs, the embeddings go alone, and
    # peak memory stays that of a one-at-a-time merge.
    sizes = {name: math.prod(pool.base.shape(name)) for name in names}
    budget = max(sizes.values(), default=0)
    pool_ = ThreadPoolExecutor(threads, thread_name_prefix="evomerge-merge")
    pending: deque = deque()
    try:
        for name in [*names, None]:
            while pending and (name is None or len(pending) >= threads
                               or sum(sizes[n] for n, _ in pending) + sizes[name] > budget):
                done_name, future = pending.popleft()
                tensor = future.result()
                if on_tensor:
                    on_tensor(done_name)
                yield done_name, tensor
            if name is not None:
                pending.append((name, pool_.submit(merged, name)))
    finally:
        pool_.shutdown(wait=True, cancel_futures=True)


def merge_state_dict(recipe: Recipe, pool: Pool, device: str = "cpu", dtype: str | None = None) -> dict[str, torch.Tensor]:
    """The merged model as a state dict in memory."""
    return {name: tensor.to(_output_dtype(recipe, pool, name, dtype)) for name, tensor in iter_merged(recipe, pool, device)}


def _output_dtype(recipe: Recipe, pool: Pool, name: str, dtype: str | None) -> torch.dtype:
    return resolve_dtype(dtype or recipe.dtype, pool.base.get(name).dtype)


def write_model_dir(recipe: Recipe, pool: Pool, out: Path, device: str = "cpu", dtype: str | None = None,
                    on_tensor: Callable[[str], None] | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Stream the merge into an HF model directory: shards, index, config, tokenizer, recipe.yaml."""
    out = check_output_dir(out)
    with staged_dir(out) as staging:
        _write_shards(recipe, pool, staging, device, dtype, on_tensor, shard_bytes)
        _copy_model_files(pool.base_path, staging, dtype or recipe.dtype)
        _copy_files(pool.tokenizer_path, staging, TOKENIZER_FILES)
        recipe.save(staging / "recipe.yaml")
    return out


def check_output_dir(out: Path) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise EvomergeError(f"{out} exists and is not empty; choose another output directory or remove it")
    return out


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed to `out` on success, removed on any failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        _share(staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _share(staging: Path) -> None:
    """Give the staged tree the modes open() and mkdir() give under the umask: mkdtemp makes the
    directory 0700 and safetensors writes its files 0600, but a model directory is for sharing."""
    umask = os.umask(0o022)  # read it back
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    for path in staging.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _write_shards(recipe, pool, staging, device, dtype, on_tensor, shard_bytes) -> None:
    shard: dict[str, torch.Tensor] = {}
    shard_files: list[list[str]] = []
    size = 0

    def flush():
        nonlocal shard, size
        if shard:
            save_file(shard, str(staging / f"shard-{len(shard_files):05d}.safetensors"), metadata={"format": "pt"})
            shard_files.append(list(shard))
            shard, size = {}, 0

    for name, tensor in iter_merged(recipe, pool, device, on_tensor):
        out_tensor = tensor.to(_output_dtype(recipe, pool, name, dtype)).cpu().contiguous()
        if size and size + out_tensor.nbytes > shard_bytes:
            flush()
        shard[name] = out_tensor
        size += out_tensor.nbytes
    flush()
    _name_shards(staging, shard_files)


def _name_shards(staging: Path, shard_files: list[list[str]]) -> None:
    if len(shard_files) == 1:
        os.replace(staging / "shard-00000.safetensors", staging / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shard_files):
        final = f"model-{i + 1:05d}-of-{len(shard_files):05d}.safetensors"
        os.replace(staging / f"shard-{i:05d}.safetensors", staging / final)
        weight_map.update({name: final for name in names})
    (staging / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def _copy_files(source: Path, staging: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, staging / name)  # contents only: the mode is open()'s, not the source's


def _copy_model_files(base: Path, staging: Path, dtype: str | None) -> None:
    _copy_files(base, staging, MODEL_FILES)
    config = staging / "config.json"
    if dtype and config.is_file():  # say what the shards hold
        data = json.loads(config.read_text())
        canonical = str(resolve_dtype(dtype, torch.float32)).removeprefix("torch.")
        data["torch_dtype" if "torch_dtype" in data else "dtype"] = canonical
        config.write_text(json.dumps(data, indent=2))


def write_adapter_dir(recipe: Recipe, pool: Pool, out: Path, device: str = "cpu") -> Path:
    """A low-rank LoRA merge as a PEFT adapter: A and B merged, scaling folded into B (alpha = r)."""
    if recipe.lora_merge != "lowrank":
        raise ConfigError("only lora_merge: lowrank recipes stay low rank; use write_model_dir for dense merges")
    check_recipe(recipe, pool)
    out = check_output_dir(out)
    source = TensorSource(pool, device)
    first = next(iter(pool.experts.values()))
    tensors, rank, targets = {}, None, set()
    for name in sorted({m for e in pool.experts.values() for m in e.lora_modules}):
        plan = recipe.plan(name)
        used = [(source.factors(e, name), w, d) for e, w, d in zip(recipe.experts, plan.weights, plan.densities)]
        used = [u for u in used if u[0] is not None]
        A, B = lowrank_lora(used)
        rank = A.shape[0]
        module = name.removesuffix(".weight")
        targets.add(module.rsplit(".", 1)[-1])
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.cpu().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.cpu().contiguous()
    config = {key: value for key, value in first.config.items() if key not in ("alpha_pattern", "rank_pattern")}
    config.update({"r": rank, "lora_alpha": rank, "use_rslora": False, "target_modules": sorted(targets),
                   "base_model_name_or_path": base_model_reference(pool.base_path)})
    with staged_dir(out) as staging:
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2))
        _copy_files(pool.tokenizer_path, staging, TOKENIZER_FILES)  # PEFT adapters ship their tokenizer
        recipe.save(staging / "recipe.yaml")
    return out


def base_model_reference(base: Path) -> str:
    """The adapter's base_model_name_or_path: what PEFT passes to from_pretrained, which resolves a
    path against the working directory (not the adapter's). So the pool's base as seen from here:
    relative when it lies below the working directory (the adapter and the pool move together),
    else absolute; never the path baked into the first expert's adapter_config.json, which names
    whatever machine trained that expert."""
    base = Path(base).resolve()
    try:
        return str(base.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(base)


class ResidentSource(TensorSource):
    """The pool's base tensors and task vectors (or LoRA factors) held on the device once.

    The full experts' task vectors of one tensor are stacked into one (experts, numel) float32
    tensor, so a merge linear in the task vectors is one matrix-vector product over it.
    """

    def __init__(self, pool: Pool, device: str):
        super().__init__(pool, device)
        disk = TensorSource(pool, device)
        self.full = [expert for expert, entry in pool.experts.items() if entry.kind == "full"]
        self._base: dict[str, torch.Tensor] = {}
        self._stacked: dict[str, torch.Tensor] = {}
        self._deltas: dict[tuple[str, str], torch.Tensor] = {}
        self._factors: dict[tuple[str, str], LoraFactors] = {}
        self._masks: dict[tuple[str, str], tuple[Callable, float, torch.Tensor]] = {}  # see presparsified
        for name in pool.tensor_names():
            if not pool.touched(name):
                continue
            base = self._base[name] = disk.base(name)
            if self.full:
                stacked = self._stacked[name] = torch.empty((len(self.full), *base.shape), device=self.device)
                for i, expert in enumerate(self.full):
                    torch.sub(pool.experts[expert].files.get(name).to(self.device), base, out=stacked[i])
                    self._deltas[(expert, name)] = stacked[i]
            for expert, entry in pool.experts.items():
                if entry.kind == "lora":
                    found = disk.factors(expert, name)
                    if found is not None:
                        self._factors[(expert, name)] = found

    def base(self, name: str) -> torch.Tensor:
        return self._base[name]

    def delta(self, expert: str, name: str, base: torch.Tensor) -> torch.Tensor | None:
        if (expert, name) in self._deltas:
            return self._deltas[(expert, name)]
        factors = self._factors.get((expert, name))
        return None if factors is None else factors.scaling * (factors.B @ factors.A)

    def factors(self, expert: str, name: str) -> LoraFactors | None:
        return self._factors.get((expert, name))

    def presparsified(self, experts, name, deltas, densities, sparsify):
        """sparsify(tau, density) from a memo of the last (sparsifier, density) per (expert, tensor),
        kept as a bool mask (a quarter of a float32 copy, counted in `nbytes`): Evo-Merging's stage 2
        fixes the densities, so its candidates re-merge without re-sorting any tensor. A sparsified
        task vector keeps all of itself at density 1, so the method then gets densities 1."""
        sparsified = []
        for expert, delta, density in zip(experts, deltas, densities):
            key = (expert, name)
            memo = self._masks.get(key)
            if memo is None or memo[0] is not sparsify or memo[1] != density:
                memo = self._masks[key] = (sparsify, density, sparsify(delta, density) != 0)
            sparsified.append(torch.where(memo[2], delta, 0.0))
        return sparsified, [1.0] * len(sparsified)

    def held(self) -> list[torch.Tensor]:
        """Every resident tensor once (a delta is a view into its stack)."""
        held = list(self._base.values()) + list(self._stacked.values())
        held += [mask for _, _, mask in self._masks.values()]
        return held + [t for f in self._factors.values() for t in (f.A, f.B)]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.held())


class _LinearPlan:
    """A merge that is a * base + sum_t c_t tau_t for every tensor: coefficients per distinct
    TensorPlan (validated once, by the method itself, as check_recipe does), c over the stack."""

    def __init__(self, recipe: Recipe, source: ResidentSource):
        self.recipe, self.source = recipe, source
        self.method = get_method(recipe.method)
        self.position = [source.full.index(expert) for expert in recipe.experts]
        self.shared = None if recipe.overrides else self._coefficients(recipe.plan(""))
        self._cache: dict[tuple, tuple[float, torch.Tensor]] = {}

    @staticmethod
    def applies(recipe: Recipe, source: ResidentSource) -> bool:
        return get_method(recipe.method).linear is not None and all(expert in source.full for expert in recipe.experts)

    def coefficients(self, name: str) -> tuple[float, torch.Tensor]:
        if self.shared is not None:
            return self.shared
        plan = self.recipe.plan(name)
        key = (plan.weights, plan.densities, tuple(sorted(plan.parameters.items())))
        if key not in self._cache:
            self._cache[key] = self._coefficients(plan)
        return self._cache[key]

    def _coefficients(self, plan) -> tuple[float, torch.Tensor]:
        one = torch.zeros(1)  # the method's own checks (domains, linear's zero sum) on a 1-element merge
        self.method.merge(one, [one] * len(plan.weights), list(plan.weights), list(plan.densities),
                          dict(plan.parameters), torch.Generator().manual_seed(0))
        params = self.method._globals(dict(plan.parameters))
        base_scale, scales = self.method.linear([float(w) for w in plan.weights], params)
        c = torch.zeros(len(self.source.full), dtype=torch.float32)
        for position, scale in zip(self.position, scales):
            c[position] += scale
        return base_scale, c.to(self.source.device)

    def merge(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        base_scale, c = self.coefficients(name)
        base, stacked = self.source.base(name), self.source._stacked[name]
        flat_out = None if out is None else out.view(-1)
        result = torch.addmv(base.view(-1), stacked.view(len(c), -1).t(), c, beta=base_scale, out=flat_out)
        return result.view(base.shape)


class ResidentMerger:
    """Re-merge new recipes from tensors held on the device, without reading the disk.

    `apply(recipe, model)` writes the merge into a live torch model's parameters in place, so an
    inference engine built around that model scores the new candidate without a reload.
    Methods that declare themselves linear in the task vectors (linear, task_arithmetic) are one matrix-vector product
    per tensor over the stacked task vectors, written straight into float32 parameters.
    """

    def __init__(self, pool: Pool, device: str = "cpu"):
        self.pool = pool
        self.source = ResidentSource(pool, device)

    def merged(self, recipe: Recipe) -> Iterator[tuple[str, torch.Tensor]]:
        check_recipe(recipe, self.pool)
        linear = _LinearPlan(recipe, self.source) if _LinearPlan.applies(recipe, self.source) else None
        for name in self.source._base:
            yield name, self._merge_one(recipe, name, linear)

    def _merge_one(self, recipe: Recipe, name: str, linear: _LinearPlan | None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        if linear is not None:
            return linear.merge(name, out)
        merged = merge_tensor(recipe, name, self.source)
        return self.source.base(name) if merged is None else merged

    @torch.no_grad()
    def apply(self, recipe: Recipe, model: torch.nn.Module) -> None:
        params = model.state_dict(keep_vars=True)
        missing = [name for name in self.source._base if name not in params]
        if missing:
            raise EvomergeError(f"the live model has no tensor {missing[0]} (is it the pool's architecture?)")
        check_recipe(recipe, self.pool)
        linear = _LinearPlan(recipe, self.source) if _LinearPlan.applies(recipe, self.source) else None
        for name in self.source._base:
            target = params[name].data
            direct = (linear is not None and target.dtype == torch.float32 and target.is_contiguous()
                      and target.device == self.source.device and target.shape == self.source._base[name].shape)
            tensor = self._merge_one(recipe, name, linear, out=target if direct else None)
            if not all_finite(tensor):
                raise EvomergeError(f"merged tensor {name} holds NaN/Inf (recipe {recipe.id})")
            if not direct:
                target.copy_(tensor)
