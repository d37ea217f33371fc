"""Benchmark inputs for bench_merge.py: a random-init Llama base and experts by seeded perturbation.

Written once per (size, dtype, number of experts) under WORK/models and reused: a directory holds a
`done` marker only when it is complete. Experts are base + N(0, scale^2) on every tensor (each
expert its own torch.Generator seed), stored in the same dtype as the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

SIZES = {
    # name: Llama config; params counted by n_params()
    "110m": dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12),
    "42m": dict(vocab_size=16000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8),
    "5m": dict(vocab_size=4000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=4),
    "1m": dict(vocab_size=2000, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4),
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
SCALE = 1e-3  # expert perturbation std (the base's init std is 0.02)


def llama_config(size: str) -> LlamaConfig:
    return LlamaConfig(**SIZES[size], max_position_embeddings=512, tie_word_embeddings=False)


def n_params(path: Path) -> int:
    return json.loads((path / "done").read_text())["params"]


def build_pool(work: Path, size: str, dtype: str, n_experts: int, log=print) -> dict:
    """{base, experts: {expertI: path}}, building what is missing (base seed 0, expert i seed 1000+i)."""
    root = Path(work) / "models" / f"{size}-{dtype}"
    base = root / "base"
    if not (base / "done").is_file():
        log(f"building base {size} ({dtype}) in {base}")
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(size)).to(DTYPES[dtype])
        model.save_pretrained(base, safe_serialization=True)
        params = sum(p.numel() for p in model.state_dict().values())
        (base / "done").write_text(json.dumps({"params": params}))
        del model
    from safetensors import safe_open

    experts = {}
    for i in range(n_experts):
        path = root / f"expert{i}"
        experts[f"expert{i}"] = str(path)
        if (path / "done").is_file():
            continue
        log(f"building expert{i} in {path}")
        path.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        with safe_open(str(base / "model.safetensors"), "pt") as handle:
            for name in handle.keys():
                t = handle.get_tensor(name)
                noise = torch.randn(t.shape, generator=generator) * SCALE
                tensors[name] = (t.float() + noise).to(t.dtype)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text((base / "config.json").read_text())
        (path / "done").write_text((base / "done").read_text())
        del tensors
    return {"base": str(base), "experts": experts}
