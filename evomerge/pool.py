"""Pool: a base model and its experts on disk, read lazily one tensor at a time.

Experts are either full HF checkpoints (safetensors, single file or sharded with an index) or
PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors). Tensors are memory-mapped
through safetensors' safe_open, so a merge streamed to disk never holds whole models in memory.

`Pool.validate()` checks, before any compute, that every expert fits the base and reports each
problem on one line naming the expert and the tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from evomerge.errors import PoolError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
MAX_REPORTED_PROBLEMS = 20
# Tensors read at once by the NaN/Inf scan: reading is the cost, and two or four reads in flight keep
# a disk (or the page cache) busy while one tensor is summed.
VALUE_CHECK_THREADS = min(4, os.cpu_count() or 1)


class SafetensorsFiles:
    """Tensor name -> file for a set of safetensors files, with open handles cached (mmap)."""

    def __init__(self, where: Path, files_by_name: dict[str, Path]):
        self.where = where
        self.files_by_name = files_by_name
        self._handles: dict[Path, Any] = {}

    @classmethod
    def open_model_dir(cls, path: Path) -> "SafetensorsFiles":
        path = Path(path)
        if not path.is_dir():
            raise PoolError(f"{path}: no such model directory")
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as error:
                raise PoolError(f"{index}: not a safetensors index ({error})") from None
            files = {name: path / file for name, file in weight_map.items()}
            for file in sorted(set(files.values())):
                if not file.is_file():
                    raise PoolError(f"{index}: shard {file.name} is missing")
            return cls(path, files)
        if (path / SINGLE_FILE).is_file():
            return cls.open_file(path / SINGLE_FILE)
        raise PoolError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")

    @classmethod
    def open_file(cls, file: Path) -> "SafetensorsFiles":
        handle = _safe_open(file)
        files = cls(file.parent, {name: file for name in handle.keys()})
        files._handles[file] = handle
        return files

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = _safe_open(file)
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self.files_by_name)

    def __contains__(self, name: str) -> bool:
        return name in self.files_by_name

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.files_by_name[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        file = self.files_by_name[name]
        try:
            return self._handle(file).get_tensor(name)
        except Exception as error:  # a truncated file fails here, on first touch of the bytes
            raise PoolError(f"{file}: tensor {name} is unreadable ({error})") from None

    def __getstate__(self):  # handles are not picklable; reopen lazily in the new process
        return {"where": self.where, "files_by_name": self.files_by_name, "_handles": {}}


def _safe_open(file: Path):
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as error:
        raise PoolError(f"{file}: unreadable or truncated safetensors ({error})") from None
    return handle


def _read_config(path: Path) -> dict[str, Any]:
    config = path / "config.json"
    if not config.is_file():
        return {}
    try:
        return json.loads(config.read_text())
    except ValueError as error:
        raise PoolError(f"{config}: invalid JSON ({error})") from None


def count_layers(path: Path) -> int | None:
    """A model directory's decoder layer count (config.json's num_hidden_layers, else the largest
    `.layers.N.` index in its tensor names + 1); None when it has neither."""
    path = Path(path)
    layers = _read_config(path).get("num_hidden_layers") if path.is_dir() else None
    if layers:
        return int(layers)
    try:
        names = SafetensorsFiles.open_model_dir(path).names()
    except PoolError:
        return None
    indices = [int(m.group(1)) for n in names if (m := re.search(r"\.layers\.(\d+)\.", n))]
    return max(indices) + 1 if indices else None


@dataclass
class LoraFactors:
    """One LoRA-adapted module: delta W = scaling * B @ A."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float


@dataclass
class Expert:
    name: str
    path: Path
    kind: str  # "full" or "lora"
    files: SafetensorsFiles
    config: dict[str, Any] = field(default_factory=dict)
    # LoRA only: base tensor name -> (A key, B key), and per-module scaling
    lora_modules: dict[str, tuple[str, str]] = field(default_factory=dict)

    def lora_scaling(self, base_name: str, rank: int) -> float:
        module = base_name.removesuffix(".weight")
        alpha = self.config.get("lora_alpha", 8)
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.search(pattern, module):
                alpha = value
        if self.config.get("use_rslora"):
            return alpha / math.sqrt(rank)
        return alpha / rank

    def factors(self, base_name: str) -> LoraFactors | None:
        if base_name not in self.lora_modules:
            return None
        key_a, key_b = self.lora_modules[base_name]
        A, B = self.files.get(key_a), self.files.get(key_b)
        return LoraFactors(A=A, B=B, scaling=self.lora_scaling(base_name, A.shape[0]))


def _lora_modules(files: SafetensorsFiles, where: Path) -> dict[str, tuple[str, str]]:
    pairs: dict[str, dict[str, str]] = {}
    for key in files.names():
        found = LORA_KEY.match(key)
        if not found:
            raise PoolError(f"{where}: tensor {key} is not a LoRA factor (expected *.lora_A.weight / *.lora_B.weight)")
        module = found.group("module").removeprefix(PEFT_PREFIX)
        pairs.setdefault(module + ".weight", {})[found.group("factor")] = key
    modules = {}
    for base_name, factors in pairs.items():
        if set(factors) != {"A", "B"}:
            missing = "lora_B" if "A" in factors else "lora_A"
            raise PoolError(f"{where}: module {base_name.removesuffix('.weight')} has no {missing} tensor")
        modules[base_name] = (factors["A"], factors["B"])
    return modules


def open_expert(name: str, path: Path) -> Expert:
    path = Path(path)
    if not path.exists():
        raise PoolError(f"expert {name}: {path} does not exist")
    if (path / ADAPTER_CONFIG).is_file():
        try:
            config = json.loads((path / ADAPTER_CONFIG).read_text())
        except ValueError as error:
            raise PoolError(f"expert {name}: {path / ADAPTER_CONFIG} is not valid JSON ({error})") from None
        if config.get("peft_type", "LORA") != "LORA":
            raise PoolError(f"expert {name}: peft_type {config.get('peft_type')} is not supported (LORA only)")
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise PoolError(f"expert {name}: {weights} is missing")
        files = SafetensorsFiles.open_file(weights)
        return Expert(name, path, "lora", files, config, _lora_modules(files, weights))
    return Expert(name, path, "full", SafetensorsFiles.open_model_dir(path), _read_config(path))


class Pool:
    """A base and named experts; lazy per-tensor access to base tensors, task vectors and factors."""

    def __init__(self, base: Path, experts: dict[str, Path], tokenizer: Path | None = None):
        if not experts:
            raise PoolError("the pool has no experts")
        self.base_path = Path(base)
        # Whose tokenizer files a merged model gets (mergekit's tokenizer_source); the base's by default.
        self.tokenizer_path = Path(tokenizer) if tokenizer is not None else self.base_path
        self.base = SafetensorsFiles.open_model_dir(self.base_path)
        if tokenizer is not None and not self.tokenizer_path.is_dir():
            raise PoolError(f"tokenizer source {self.tokenizer_path}: no such model directory")
        self.base_config = _read_config(self.base_path)
        self.experts = {name: open_expert(name, path) for name, path in experts.items()}

    # ---- access ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.experts)

    @property
    def kinds(self) -> set[str]:
        return {expert.kind for expert in self.experts.values()}

    def tensor_names(self) -> list[str]:
        return self.base.names()

    def n_layers(self) -> int:
        return count_layers(self.base_path) or 1

    def base_tensor(self, name: str) -> torch.Tensor:
        return self.base.get(name)

    def task_vector(self, expert: str, name: str, base: torch.Tensor | None = None) -> torch.Tensor | None:
        """theta_expert - theta_base in float32 (dense scaling * B @ A for LoRA); None if untouched."""
        entry = self.experts[expert]
        if entry.kind == "lora":
            factors = entry.factors(name)
            if factors is None:
                return None
            return factors.scaling * (factors.B.float() @ factors.A.float())
        base = self.base.get(name).float() if base is None else base
        # one kernel, on base's device: the stored dtype is promoted to float32 by the subtraction
        return torch.sub(entry.files.get(name).to(base.device), base.float())

    def lora_factors(self, expert: str, name: str) -> LoraFactors | None:
        return self.experts[expert].factors(name)

    def touched(self, name: str) -> bool:
        """Does any expert change this tensor? (LoRA experts only touch their target modules.)"""
        return any(e.kind == "full" or name in e.lora_modules for e in self.experts.values())

    # ---- validation -----------------------------------------------------------------------
    def problems(self, check_values: bool = True) -> Iterator[str]:
        """Every problem, one line each: the structure first (names, shapes, config) from headers
        alone; then, only if the structure is sound and `check_values`, NaN/Inf in any tensor."""
        base_names = set(self.base.names())
        structural = False
        for name, expert in self.experts.items():
            check = self._full_problems if expert.kind == "full" else self._lora_problems
            for problem in check(name, expert, base_names):
                structural = True
                yield problem
        if check_values and not structural:
            yield from self._value_problems()

    def _full_problems(self, name: str, expert: Expert, base_names: set[str]) -> Iterator[str]:
        for key in ("model_type", "architectures"):
            if key in expert.config and key in self.base_config and expert.config[key] != self.base_config[key]:
                yield f"expert {name}: architecture mismatch ({key} {expert.config[key]} vs base {self.base_config[key]})"
        vocab_e, vocab_b = expert.config.get("vocab_size"), self.base_config.get("vocab_size")
        if vocab_e and vocab_b and vocab_e != vocab_b:
            yield f"expert {name}: vocabulary size {vocab_e} differs from the base's {vocab_b}"
        expert_names = set(expert.files.names())
        for missing in sorted(base_names - expert_names):
            yield f"expert {name}: tensor {missing} is missing (the base has it)"
        for extra in sorted(expert_names - base_names):
            yield f"expert {name}: tensor {extra} is not in the base"
        for tensor in sorted(base_names & expert_names):
            got, want = expert.files.shape(tensor), self.base.shape(tensor)
            if got != want:
                kind = "vocabulary size mismatch" if "embed" in tensor or "lm_head" in tensor else "shape mismatch"
                yield f"expert {name}: tensor {tensor} {kind}: {list(got)} vs base {list(want)}"

    def _lora_problems(self, name: str, expert: Expert, base_names: set[str]) -> Iterator[str]:
        for base_name, (key_a, key_b) in sorted(expert.lora_modules.items()):
            if base_name not in base_names:
                yield f"expert {name}: LoRA target {base_name.removesuffix('.weight')} is not in the base"
                continue
            out_features, in_features = self.base.shape(base_name)[:2]
            shape_a, shape_b = expert.files.shape(key_a), expert.files.shape(key_b)
            if shape_a[1] != in_features or shape_b[0] != out_features or shape_a[0] != shape_b[1]:
                yield (f"expert {name}: LoRA factors of {base_name} have shapes A {list(shape_a)} B {list(shape_b)}, "
                       f"which do not fit the base's {[out_features, in_features]}")

    def _value_problems(self) -> Iterator[str]:
        """NaN/Inf in the base or any expert: every tensor read once, VALUE_CHECK_THREADS at a time
        (memory: that many tensors), and a tensor already found finite in this process (same file,
        size and mtime) is not read again, so a search's later checks cost nothing."""
        checks = [("the base", name, self.base) for name in self.base.names()]
        for name, expert in self.experts.items():
            checks += [(f"expert {name}", tensor, expert.files) for tensor in expert.files.names()]
        threads = ThreadPoolExecutor(VALUE_CHECK_THREADS, thread_name_prefix="evomerge-check")
        try:
            for problem in threads.map(lambda check: _nonfinite(*check), checks):
                if problem:
                    yield problem
        finally:  # a caller that has seen enough problems stops here: skip the reads not started
            threads.shutdown(wait=True, cancel_futures=True)

    def validate(self, check_values: bool = True) -> "Pool":
        problems = []
        for problem in self.problems(check_values):
            problems.append(problem)
            if len(problems) > MAX_REPORTED_PROBLEMS:
                break
        if len(problems) == 1:
            raise PoolError(problems[0])
        if problems:
            shown = "\n  ".join(problems[:MAX_REPORTED_PROBLEMS])
            raise PoolError(f"the pool has {len(problems)}{'+' if len(problems) > MAX_REPORTED_PROBLEMS else ''} problems:\n  {shown}")
        return self


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf: the sum (one read, no mask) is finite when every entry is; check exactly if not
    (a float16 sum may overflow). The sum in the tensor's own dtype: for bfloat16 it runs ~12x
    faster than one accumulated into a float32 result, and a mask (isfinite) ~20x slower."""
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


_FINITE: set[tuple[str, int, int, str]] = set()  # (file, size, mtime_ns, tensor) found finite here


def _nonfinite(owner: str, tensor: str, files: SafetensorsFiles) -> str | None:
    """The problem line for a tensor holding NaN/Inf, else None."""
    file = files.files_by_name[tensor]
    stat = file.stat()
    key = (str(file), stat.st_size, stat.st_mtime_ns, tensor)
    if key in _FINITE:
        return None
    values = files.get(tensor)
    if all_finite(values):
        _FINITE.add(key)
        return None
    bad = (~torch.isfinite(values)).sum().item()
    return f"{owner}: tensor {tensor} holds {bad} NaN/Inf value(s)"
