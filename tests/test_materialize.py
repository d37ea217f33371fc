"""materialize: the same merge through every sink, against hand formulas and PEFT itself."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from evomerge.config import load_merge_config, open_pool
from evomerge.errors import ConfigError, EvomergeError
from evomerge.materialize import ResidentMerger, check_recipe, merge_state_dict, write_adapter_dir, write_model_dir
from evomerge.mergekit_yaml import recipe_to_mergekit
from evomerge.poolspec import parse_pool_spec
from evomerge.recipe import Recipe
from tests.synthetic import make_pool


@pytest.fixture(scope="module")
def full_pool(tmp_path_factory):
    spec = make_pool(tmp_path_factory.mktemp("full"), n_experts=3)
    return spec, open_pool(spec).validate()


@pytest.fixture(scope="module")
def lora_pool(tmp_path_factory):
    spec = make_pool(tmp_path_factory.mktemp("lora"), n_experts=3, lora=True)
    return spec, open_pool(spec).validate()


def recipe(method, weights=(0.5, -0.3, 0.8), densities=(1.0, 1.0, 1.0), **kwargs):
    experts = {f"expert{i}": {"weight": w, "density": d} for i, (w, d) in enumerate(zip(weights, densities))}
    return Recipe(method=method, experts=experts, **kwargs)


def test_task_arithmetic_is_base_plus_weighted_task_vectors(full_pool):
    _, pool = full_pool
    merged = merge_state_dict(recipe("task_arithmetic", parameters={"lambda": 0.7}), pool)
    name = "model.layers.1.self_attn.o_proj.weight"
    expected = pool.base_tensor(name) + 0.7 * sum(
        w * pool.task_vector(f"expert{i}", name) for i, w in enumerate((0.5, -0.3, 0.8)))
    torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=0)


def test_evo_merging_keeps_top_magnitude_entries(full_pool):
    _, pool = full_pool
    only = Recipe(method="evo_merging", experts={"expert0": {"weight": 1.0, "density": 0.25},
                                                 "expert1": {"weight": 0.0}, "expert2": {"weight": 0.0}})
    merged = merge_state_dict(only, pool)
    name = "model.layers.0.mlp.gate_proj.weight"
    delta = merged[name] - pool.base_tensor(name)
    assert (delta != 0).sum().item() == round(0.25 * delta.numel())
    tau = pool.task_vector("expert0", name)
    kept = delta != 0
    assert tau.abs()[kept].min() >= tau.abs()[~kept].max()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "evo_merging", "della"])
def test_resident_remerge_equals_streamed_merge(full_pool, method):
    spec, pool = full_pool
    r = recipe(method, densities=(0.6, 0.5, 0.7), seed=3)
    streamed = merge_state_dict(r, pool)
    model = AutoModelForCausalLM.from_pretrained(spec["base"])
    merger = ResidentMerger(pool)
    merger.apply(recipe("linear"), model)  # something else first: apply must overwrite it all
    merger.apply(r, model)
    live = model.state_dict()
    for name, tensor in streamed.items():
        torch.testing.assert_close(live[name], tensor, atol=1e-6, rtol=0)


def test_dare_masks_depend_on_seed_only(full_pool):
    _, pool = full_pool
    a = merge_state_dict(recipe("dare_ties", densities=(0.5,) * 3, seed=1), pool)
    b = merge_state_dict(recipe("dare_ties", densities=(0.5,) * 3, seed=1), pool)
    c = merge_state_dict(recipe("dare_ties", densities=(0.5,) * 3, seed=2), pool)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])


def test_model_dir_loads_in_transformers_with_the_merged_tensors(full_pool, tmp_path):
    spec, pool = full_pool
    r = recipe("ties", densities=(0.5, 0.5, 0.5))
    out = write_model_dir(r, pool, tmp_path / "merged", shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()  # small shards: an index was written
    assert Recipe.from_yaml((out / "recipe.yaml").read_text()) == r
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in merge_state_dict(r, pool).items():
        torch.testing.assert_close(loaded[name], tensor)


def test_model_dir_dtype(full_pool, tmp_path):
    _, pool = full_pool
    out = write_model_dir(recipe("linear"), pool, tmp_path / "bf16", dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_failed_merge_leaves_nothing_behind(full_pool, tmp_path):
    _, pool = full_pool
    bad = Recipe(method="task_arithmetic", experts={"nobody": {}})
    with pytest.raises(ConfigError, match="recipe names expert 'nobody'"):
        write_model_dir(bad, pool, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(full_pool, tmp_path):
    _, pool = full_pool
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(EvomergeError, match="exists and is not empty"):
        write_model_dir(recipe("linear"), pool, tmp_path / "out")


def test_nan_merge_is_an_error_not_a_model(full_pool, tmp_path):
    _, pool = full_pool
    with pytest.raises(EvomergeError, match="NaN"):
        write_model_dir(recipe("task_arithmetic", weights=(1e36, 1e36, 1e36), parameters={"lambda": 1e6}), pool, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["dense", "lowrank"])
def test_lora_evo_merging_sparsifies_a_only(lora_pool, mode):
    spec, pool = lora_pool
    r = recipe("evo_merging", densities=(0.5, 0.7, 1.0), lora_merge=mode)
    merged = merge_state_dict(r, pool)
    name = "model.layers.0.self_attn.q_proj.weight"
    factors = [pool.lora_factors(f"expert{i}", name) for i in range(3)]
    from evomerge.methods import topmag

    weights, densities = (0.5, -0.3, 0.8), (0.5, 0.7, 1.0)
    if mode == "dense":
        delta = sum(w * f.scaling * f.B @ topmag(f.A, d) for f, w, d in zip(factors, weights, densities))
    else:
        A = sum(w * topmag(f.A, d) for f, w, d in zip(factors, weights, densities))
        B = sum(w * f.scaling * f.B for f, w in zip(factors, weights))
        delta = B @ A
    torch.testing.assert_close(merged[name], pool.base_tensor(name) + delta, atol=1e-5, rtol=1e-5)
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(merged[untouched], pool.base_tensor(untouched))


def test_lowrank_adapter_loads_in_peft_and_matches(lora_pool, tmp_path):
    from peft import PeftModel

    spec, pool = lora_pool
    r = recipe("evo_merging", densities=(0.5, 0.7, 1.0), lora_merge="lowrank")
    out = write_adapter_dir(r, pool, tmp_path / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spec["base"]), out).merge_and_unload()
    live = model.state_dict()
    for name, tensor in merge_state_dict(r, pool).items():
        torch.testing.assert_close(live[name], tensor, atol=1e-5, rtol=1e-5)


def test_resident_lora_pool(lora_pool):
    spec, pool = lora_pool
    r = recipe("evo_merging", densities=(0.5, 0.7, 1.0))
    model = AutoModelForCausalLM.from_pretrained(spec["base"])
    ResidentMerger(pool).apply(r, model)
    for name, tensor in merge_state_dict(r, pool).items():
        torch.testing.assert_close(model.state_dict()[name], tensor, atol=1e-6, rtol=0)


def test_mergekit_yaml_round_trip(full_pool, tmp_path, monkeypatch):
    spec, pool = full_pool
    r = recipe("ties", densities=(0.5, 0.6, 0.7), parameters={"lambda": 0.9})
    mergekit = recipe_to_mergekit(r, parse_pool_spec(spec))
    assert mergekit["merge_method"] == "ties" and mergekit["models"][1]["parameters"] == {"weight": -0.3, "density": 0.6}
    config = tmp_path / "mk.yaml"
    config.write_text(yaml.safe_dump(mergekit))
    monkeypatch.chdir(tmp_path)
    read_back, read_spec = load_merge_config(config)
    assert list(read_back.experts.values()) == list(r.experts.values())
    assert read_back.parameters == r.parameters and read_spec.base == Path(spec["base"]).resolve()


def test_mergekit_filters_become_overrides(full_pool, tmp_path, monkeypatch):
    spec, _ = full_pool
    config = tmp_path / "mk.yaml"
    config.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": spec["base"], "dtype": "float16",
        "models": [{"model": spec["experts"]["expert0"],
                    "parameters": {"weight": [{"filter": "self_attn", "value": 0.2}, {"value": 0.9}]}}]}))
    r, _ = load_merge_config(config)
    assert r.dtype == "float16"
    assert r.plan("model.layers.0.self_attn.q_proj.weight").weights == (0.2,)
    assert r.plan("model.layers.0.mlp.up_proj.weight").weights == (0.9,)


def test_mergekit_method_without_equivalent_is_refused(tmp_path):
    config = tmp_path / "mk.yaml"
    config.write_text("merge_method: nuslerp\nbase_model: a\nmodels: [{model: b}]\n")
    with pytest.raises(ConfigError, match="merge_method 'nuslerp' has no evomerge equivalent"):
        load_merge_config(config)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_merge_writes_model_and_summary(full_pool, tmp_path):
    spec, _ = full_pool
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"pool": spec, "recipe": recipe("ties").model_dump(mode="json")}))
    done = run_cli("merge", str(config), "-o", str(tmp_path / "out"), "--dtype", "float16")
    assert done.returncode == 0, done.stderr
    assert "merged 3 experts with ties" in done.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_cli_merge_bad_config_is_one_line(tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text("pool: {base: nowhere, experts: {a: alsonowhere}}\nrecipe: {method: ties, experts: {a: {}}}\n")
    done = run_cli("merge", str(config), "-o", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no such model directory" in done.stderr
    assert not (tmp_path / "out").exists()


def test_evomerge_only_flags_are_not_exported_to_mergekit(full_pool):
    spec, _ = full_pool
    with pytest.raises(ConfigError, match="normalize_abs is evomerge's own"):
        recipe_to_mergekit(recipe("ties", parameters={"normalize_abs": True}), parse_pool_spec(spec))


def test_mergekit_out_dtype_is_the_output_dtype(tmp_path):
    config = tmp_path / "mk.yaml"
    config.write_text("merge_method: linear\nbase_model: a\nmodels: [{model: b}]\ndtype: float32\nout_dtype: bfloat16\n")
    r, _ = load_merge_config(config)
    assert r.dtype == "bfloat16"


def test_resident_evo_merging_memo_follows_the_densities(full_pool):
    """Evo-Merging's stage 2 keeps densities fixed, so the resident source memoizes TopMag; every
    re-merge must still equal a fresh merge: the same densities again, then one expert's density
    changed (its memo is stale), then another's, then back to the first densities."""
    spec, pool = full_pool
    model = AutoModelForCausalLM.from_pretrained(spec["base"])
    merger = ResidentMerger(pool)
    steps = [((0.5, -0.3, 0.8), (0.6, 0.3, 0.9)), ((1.2, 0.1, -0.7), (0.6, 0.3, 0.9)),
             ((1.2, 0.1, -0.7), (0.6, 0.8, 0.9)), ((0.5, -0.3, 0.8), (0.2, 0.8, 0.9)),
             ((0.5, -0.3, 0.8), (0.6, 0.3, 0.9))]
    for weights, densities in steps:
        r = recipe("evo_merging", weights=weights, densities=densities)
        merger.apply(r, model)
        live = model.state_dict()
        for name, tensor in merge_state_dict(r, pool).items():
            assert torch.equal(live[name], tensor), (densities, name)


def test_the_resident_memo_holds_masks_and_counts_them(full_pool):
    """The memo of a presparsifying method (Evo-Merging) keeps one bool mask per expert and tensor,
    a quarter of a float32 copy, and the resident memory it reports includes them."""
    spec, pool = full_pool
    model = AutoModelForCausalLM.from_pretrained(spec["base"])
    merger = ResidentMerger(pool)
    before = merger.source.nbytes()
    merger.apply(recipe("evo_merging", weights=(0.5, -0.3, 0.8), densities=(0.6, 0.3, 0.9)), model)
    touched = [name for name in pool.tensor_names() if pool.touched(name)]
    entries = sum(merger.source.base(name).numel() for name in touched)
    assert merger.source.nbytes() - before == entries * len(pool.names)  # one byte per entry and expert
    merger.apply(recipe("task_arithmetic", weights=(0.5, -0.3, 0.8)), model)  # linear: no memo grows
    assert merger.source.nbytes() - before == entries * len(pool.names)


def test_a_method_is_merged_by_what_it_declares_not_by_its_name(full_pool):
    """Copies of task_arithmetic and evo_merging under new names take the same resident paths (the
    one-pass linear merge; the presparsifier's memo) and equal the originals' merges: no method name
    is special-cased in materialize."""
    import dataclasses

    from evomerge.materialize import _LinearPlan
    from evomerge.methods import METHODS, get_method

    spec, pool = full_pool
    model = AutoModelForCausalLM.from_pretrained(spec["base"])
    copies = {"ta_copy": ("task_arithmetic", (1.0, 1.0, 1.0)), "evo_copy": ("evo_merging", (0.6, 0.3, 0.9))}
    for name, (original, _) in copies.items():
        METHODS.register(name, dataclasses.replace(get_method(original), name=name))
    try:
        merger = ResidentMerger(pool)
        for name, (original, densities) in copies.items():
            r = recipe(name, densities=densities)
            assert _LinearPlan.applies(r, merger.source) == (original == "task_arithmetic")
            merger.apply(r, model)
            live = model.state_dict()
            for tensor_name, tensor in merge_state_dict(recipe(original, densities=densities), pool).items():
                # the one-pass merge sums in another order than the streamed one: equal to float32 rounding
                torch.testing.assert_close(live[tensor_name], tensor, atol=1e-6, rtol=0, msg=f"{name} {tensor_name}")
        assert merger.source._masks, "the presparsifying copy was not memoized"
    finally:
        for name in copies:
            METHODS._entries.pop(name, None)


def save_tokenizer(path: Path) -> None:
    """A real (word-level) tokenizer over the synthetic models' 64-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(path)


def test_lowrank_adapter_has_the_tokenizer_and_a_base_path_peft_can_load(lora_pool, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    spec, pool = lora_pool
    root = Path(spec["base"]).parent
    save_tokenizer(root / "base")
    monkeypatch.chdir(root)  # the pool lies below the working directory: the path is relative to it
    out = write_adapter_dir(recipe("evo_merging", densities=(0.5, 0.7, 1.0), lora_merge="lowrank"), pool, root / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base"  # not the path baked into the experts' configs
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (root / "base" / name).read_bytes()
    model = AutoPeftModelForCausalLM.from_pretrained(out)  # PEFT finds the base from here
    assert model.peft_config["default"].r == 4
    monkeypatch.chdir(tmp_path)  # outside: the absolute path
    other = write_adapter_dir(recipe("evo_merging", lora_merge="lowrank"), pool, tmp_path / "adapter")
    assert json.loads((other / "adapter_config.json").read_text())["base_model_name_or_path"] == str(Path(spec["base"]).resolve())


def test_written_files_get_the_modes_open_gives(full_pool, tmp_path):
    import os
    import stat

    from evomerge.run import atomic_write

    spec, pool = full_pool
    old = os.umask(0o022)
    try:
        out = write_model_dir(recipe("task_arithmetic"), pool, tmp_path / "merged")
        atomic_write(tmp_path / "config.yaml", b"a: 1\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for file in [*out.iterdir(), tmp_path / "config.yaml"]:
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file.name


def test_cli_merge_counts_the_experts_the_recipe_uses(full_pool, tmp_path):
    spec, _ = full_pool
    config = tmp_path / "merge.yaml"
    r = Recipe(method="ties", experts={"expert0": {"weight": 0.5}, "expert2": {"weight": 0.0}, "expert1": {"weight": 0.7}})
    config.write_text(yaml.safe_dump({"pool": spec, "recipe": r.model_dump(mode="json")}))
    done = run_cli("merge", str(config), "-o", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "merged 2 experts with ties" in done.stderr
    assert "1 of the pool's 3 unused (weight 0 or not in the recipe): expert2" in " ".join(done.stderr.split())


# ---- check_recipe: every override validated before the merge ------------------------------------


@pytest.mark.parametrize("override, message", [
    ({"layers": [1, 2], "experts": {"expert1": {"density": 1.5}}},
     r"overrides\[1\]\.experts\.expert1\.density=1\.5 is outside \[0\.0, 1\.0\]"),
    ({"modules": "mlp", "experts": {"nobody": {"weight": 0.5}}},
     r"overrides\[1\]\.experts\.nobody: expert 'nobody' is not one of the recipe's experts"),
    ({"modules": "attention", "parameters": {"lamda": 0.5}},
     r"overrides\[1\]: unknown parameter 'lamda' for merge method 'ties'; did you mean 'lambda'"),
    ({"layers": [0, 1], "parameters": {"lambda": float("nan")}}, r"overrides\[1\]: .*lambda must be finite"),
])
def test_check_recipe_refuses_a_bad_override_naming_its_index_and_key(full_pool, tmp_path, override, message):
    """A bad value in an override that matches only some tensors (not the default plan) is refused
    before any tensor is merged, naming the override and the key; nothing is written."""
    _, pool = full_pool
    fine = {"layers": [0, 1], "experts": {"expert0": {"density": 0.3}}}
    bad = recipe("ties", densities=(0.5, 0.5, 0.5), overrides=[fine, override])
    with pytest.raises(ConfigError, match=message) as raised:
        check_recipe(bad, pool)
    assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match=message):
        write_model_dir(bad, pool, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_check_recipe_refuses_overrides_that_fail_only_combined(full_pool):
    """Each override alone is fine; a tensor both match gets weights summing to 0 under linear's
    normalize: refused up front, naming both overrides and the tensor."""
    _, pool = full_pool
    both = Recipe(method="linear", experts={"expert0": {"weight": 1.0}, "expert1": {"weight": 1.0}}, overrides=[
        {"modules": "mlp", "experts": {"expert0": {"weight": 0.0}}},
        {"layers": [1, 2], "experts": {"expert1": {"weight": 0.0}}}])
    with pytest.raises(ConfigError, match=r"overrides\[0, 1\] combined on tensor model\.layers\.1\.mlp\..*sum to 0"):
        check_recipe(both, pool)
    check_recipe(both.model_copy(update={"overrides": both.overrides[:1]}), pool)  # each alone passes
    check_recipe(both.model_copy(update={"overrides": both.overrides[1:]}), pool)


def test_resident_merger_refuses_a_bad_override_before_writing_a_tensor(full_pool):
    """A worker's in-place swap: the live model keeps its weights when an override is out of domain."""
    spec, pool = full_pool
    model = AutoModelForCausalLM.from_pretrained(spec["base"])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    bad = recipe("ties", overrides=[{"layers": [1, 2], "experts": {"expert2": {"density": 1.5}}}])
    with pytest.raises(ConfigError, match=r"overrides\[0\]\.experts\.expert2\.density"):
        ResidentMerger(pool).apply(bad, model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_cli_merge_refuses_a_bad_override_in_one_line(full_pool, tmp_path):
    spec, _ = full_pool
    bad = recipe("ties", overrides=[{"modules": "mlp", "experts": {"expert0": {"density": 1.5}}}])
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"pool": spec, "recipe": bad.model_dump(mode="json")}))
    done = run_cli("merge", str(config), "-o", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert "overrides[0].experts.expert0.density=1.5" in done.stderr
    assert not (tmp_path / "out").exists()
