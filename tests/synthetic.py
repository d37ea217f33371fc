"""Small random Llama pools built in a test's tmp dir in well under a second (no training).

For mechanics (file formats, validation, streaming). Behaviour on real specialized experts is tested
on the tiny demo zoo (the `tiny_zoo` fixture).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)


def make_base(path: Path, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, **overrides}))
    model.save_pretrained(path)
    return model


def make_full_expert(base: LlamaForCausalLM, path: Path, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A full 'fine-tune': the base plus a seeded random perturbation. Returns its task vector."""
    generator = torch.Generator().manual_seed(seed)
    expert = LlamaForCausalLM(base.config)
    expert.load_state_dict(base.state_dict())
    deltas = {}
    with torch.no_grad():
        for name, param in expert.named_parameters():
            deltas[name] = torch.randn(param.shape, generator=generator) * scale
            param.add_(deltas[name])
    expert.save_pretrained(path)
    return deltas


def make_lora_expert(base_path: Path, path: Path, seed: int, r: int = 4, alpha: int = 8, rslora: bool = False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base_path)
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "up_proj"])
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(path)
    return peft_model


def make_pool(root: Path, n_experts: int = 3, lora: bool = False) -> dict:
    base = make_base(root / "base")
    experts = {}
    for i in range(n_experts):
        path = root / f"expert{i}"
        if lora:
            make_lora_expert(root / "base", path, seed=100 + i)
        else:
            make_full_expert(base, path, seed=100 + i)
        experts[f"expert{i}"] = str(path)
    return {"base": str(root / "base"), "experts": experts}
