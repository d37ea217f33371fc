"""sinks: where a merge goes, and how it is written.

A state dict in memory (`merge_state_dict`), an HF model directory (`write_model_dir`: safetensors
shards and their index, config, tokenizer, recipe.yaml), a PEFT adapter directory for LoRA merges
that stay low rank (`write_adapter_dir`). Directories are written to a temporary directory beside
the output, then renamed (`staged_dir`); `check_output_dir` refuses a non-empty one; the output
dtype is the caller's, else the recipe's, else the base tensor's (`resolve_dtype`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from evomerge.errors import ConfigError, EvomergeError
from evomerge.materialize.check import check_recipe
from evomerge.materialize.sources import TensorSource, iter_merged, lowrank_lora
from evomerge.pool import Pool
from evomerge.recipe import Recipe

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODEL_FILES = ("config.json", "generation_config.json")  # from the base
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")  # from pool.tokenizer_path
SHARD_BYTES = 2 * 1024**3


def resolve_dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; available: float32, float16, bfloat16")
    return DTYPES[name]


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
