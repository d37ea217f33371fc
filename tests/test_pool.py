"""Pool: reading full and LoRA experts, and one clear line for each way a pool can be broken."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.config import open_pool
from evomerge.errors import PoolError
from tests.synthetic import make_base, make_full_expert, make_lora_expert, make_pool


def test_full_expert_task_vector_is_expert_minus_base(tmp_path):
    base = make_base(tmp_path / "base")
    deltas = make_full_expert(base, tmp_path / "a", seed=1)
    pool = open_pool({"base": tmp_path / "base", "experts": {"a": tmp_path / "a"}}).validate()
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(pool.task_vector("a", name), deltas[name], atol=1e-6, rtol=0)


def test_sharded_checkpoint_reads_the_same_tensors(tmp_path):
    base = make_base(tmp_path / "base")
    make_full_expert(base, tmp_path / "a", seed=1)
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    pool = open_pool({"base": tmp_path / "base", "experts": {"a": tmp_path / "a", "s": tmp_path / "sharded"}}).validate()
    for name in pool.tensor_names():
        assert torch.equal(pool.task_vector("a", name), pool.task_vector("s", name))


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_delta_matches_peft_merge(tmp_path, rslora):
    """Our dense delta (scaling * B @ A) equals what PEFT itself merges into the base."""
    make_base(tmp_path / "base")
    peft_model = make_lora_expert(tmp_path / "base", tmp_path / "lora", seed=3, r=4, alpha=8, rslora=rslora)
    merged = peft_model.merge_and_unload().state_dict()
    pool = open_pool({"base": tmp_path / "base", "experts": {"l": tmp_path / "lora"}}).validate()
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = merged[name] - pool.base_tensor(name)
    torch.testing.assert_close(pool.task_vector("l", name), expected, atol=1e-6, rtol=1e-5)
    factors = pool.lora_factors("l", name)
    assert factors.scaling == pytest.approx(8 / math.sqrt(4) if rslora else 8 / 4)
    assert pool.lora_factors("l", "model.layers.1.self_attn.k_proj.weight") is None  # not a target


def _rewrite(path: Path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


BROKEN = {
    "missing": (lambda t: t.pop("model.norm.weight"), "expert a: tensor model.norm.weight is missing"),
    "extra": (lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)), "expert a: tensor model.extra.weight is not in the base"),
    "shape": (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 3)),
              "expert a: tensor model.layers.0.mlp.up_proj.weight shape mismatch"),
    "nan": (lambda t: t["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), float("nan")),
            "expert a: tensor model.layers.1.mlp.down_proj.weight holds 1 NaN/Inf"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_full_expert_is_named_with_its_tensor(tmp_path, case):
    base = make_base(tmp_path / "base")
    make_full_expert(base, tmp_path / "a", seed=1)
    edit, message = BROKEN[case]
    _rewrite(tmp_path / "a", edit)
    with pytest.raises(PoolError, match=message.replace("(", r"\(")):
        open_pool({"base": tmp_path / "base", "experts": {"a": tmp_path / "a"}}).validate()


def test_vocabulary_mismatch(tmp_path):
    make_base(tmp_path / "base")
    make_base(tmp_path / "a", vocab_size=80)
    with pytest.raises(PoolError, match="expert a: vocabulary size 80 differs from the base's 64"):
        open_pool({"base": tmp_path / "base", "experts": {"a": tmp_path / "a"}}).validate()


def test_architecture_mismatch(tmp_path):
    make_base(tmp_path / "base")
    make_base(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["model_type"] = "mistral"
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(PoolError, match="expert a: architecture mismatch"):
        open_pool({"base": tmp_path / "base", "experts": {"a": tmp_path / "a"}}).validate()


def test_truncated_safetensors(tmp_path):
    base = make_base(tmp_path / "base")
    make_full_expert(base, tmp_path / "a", seed=1)
    file = tmp_path / "a" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(PoolError, match=r"a/model.safetensors: unreadable or truncated safetensors"):
        open_pool({"base": tmp_path / "base", "experts": {"a": tmp_path / "a"}})


def test_lora_target_absent_from_base(tmp_path):
    make_base(tmp_path / "base")
    make_lora_expert(tmp_path / "base", tmp_path / "lora", seed=3)
    file = tmp_path / "lora" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key.replace("q_proj", "qq_proj")] = tensors[key].clone()
    tensors[key.replace("q_proj", "qq_proj").replace("lora_A", "lora_B")] = tensors[key.replace("lora_A", "lora_B")].clone()
    save_file(tensors, file)
    with pytest.raises(PoolError, match=r"expert l: LoRA target .*qq_proj is not in the base"):
        open_pool({"base": tmp_path / "base", "experts": {"l": tmp_path / "lora"}}).validate()


def test_missing_expert_path(tmp_path):
    make_base(tmp_path / "base")
    with pytest.raises(PoolError, match="expert x: .*does not exist"):
        open_pool({"base": tmp_path / "base", "experts": {"x": tmp_path / "nope"}})


def test_several_problems_are_all_reported(tmp_path):
    spec = make_pool(tmp_path, n_experts=2)
    for path in spec["experts"].values():
        _rewrite(Path(path), lambda t: t.pop("model.norm.weight"))
    with pytest.raises(PoolError) as error:
        open_pool(spec).validate()
    lines = str(error.value).splitlines()
    assert lines[0] == "the pool has 2 problems:"
    assert "expert expert0" in lines[1] and "expert expert1" in lines[2]


def test_nan_in_the_base_is_found(tmp_path):
    base = make_base(tmp_path / "base")
    make_full_expert(base, tmp_path / "a", seed=1)
    _rewrite(tmp_path / "base", lambda t: t["model.norm.weight"].__setitem__(3, float("inf")))
    with pytest.raises(PoolError, match="the base: tensor model.norm.weight holds 1 NaN/Inf"):
        open_pool({"base": tmp_path / "base", "experts": {"a": tmp_path / "a"}}).validate()


def test_nan_in_a_lora_factor_is_found(tmp_path):
    make_base(tmp_path / "base")
    make_lora_expert(tmp_path / "base", tmp_path / "lora", seed=3)
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(PoolError, match=f"expert l: tensor {key} holds 1 NaN/Inf"):
        open_pool({"base": tmp_path / "base", "experts": {"l": tmp_path / "lora"}}).validate()


def test_value_check_is_redone_when_a_file_changes(tmp_path):
    """Tensors found finite are remembered per (file, size, mtime): a second validate reads nothing,
    and a rewritten expert is read again."""
    base = make_base(tmp_path / "base")
    make_full_expert(base, tmp_path / "a", seed=1)
    spec = {"base": tmp_path / "base", "experts": {"a": tmp_path / "a"}}
    open_pool(spec).validate()
    open_pool(spec).validate()
    _rewrite(tmp_path / "a", lambda t: t["model.layers.0.mlp.up_proj.weight"].__setitem__((1, 1), float("nan")))
    with pytest.raises(PoolError, match="expert a: tensor model.layers.0.mlp.up_proj.weight holds 1 NaN/Inf"):
        open_pool(spec).validate()


def test_float16_values_whose_sum_overflows_are_finite(tmp_path):
    base = make_base(tmp_path / "base")
    make_full_expert(base, tmp_path / "a", seed=1)
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite(tmp_path / "a", lambda t: t.__setitem__(name, torch.full_like(t[name], 60000.0, dtype=torch.float16)))
    assert torch.isinf(torch.full((32, 16), 60000.0, dtype=torch.float16).sum())  # what a float16 sum would say
    open_pool({"base": tmp_path / "base", "experts": {"a": tmp_path / "a"}}).validate()
