"""The demo zoo as a user meets it: files load with plain transformers/peft, experts specialize."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.zoo import LORA_TARGETS, build_tokenizer, build_zoo, check_mergeable, encode, score
from evomerge.zoo.tasks import N_EVAL, TASKS, eval_splits, stale_data, train_records

REPO = Path(__file__).resolve().parents[1]


# ---- fast: data and tokenizer ---------------------------------------------------------------


def test_committed_data_matches_generator():
    stale = stale_data(REPO / "evaluators" / "data")
    assert not stale, f"regenerate with `python -m evomerge.zoo.tasks evaluators/data`: {stale}"


def test_splits_are_distinct_and_training_data_is_held_out():
    for task in TASKS:
        splits = eval_splits(task)
        questions = [r["question"] for split in splits.values() for r in split]
        assert len(questions) == len(set(questions)) == 2 * N_EVAL
        stream = train_records(task, "test")
        train = {next(stream)["question"] for _ in range(2000)}
        assert not train & set(questions)
        for r in splits["test"]:
            assert r["question"].endswith(" =") and r["answer"].startswith(" ")
            assert "\n" not in r["question"] + r["answer"]


def test_tokenizer_is_character_level_and_prepends_bos(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "reverse abcd = dcba\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1:] == encode(tok, text)
    assert len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    # question and answer tokenized apart give the same tokens as the line at once
    for task in TASKS:
        r = eval_splits(task)["validation"][0]
        joint = tok(r["question"] + r["answer"])["input_ids"]
        assert joint == tok(r["question"])["input_ids"] + tok(r["answer"], add_special_tokens=False)["input_ids"]
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.unk_token == "<unk>"


# ---- slow: the tiny zoo ---------------------------------------------------------------------


@pytest.mark.slow
def test_layout_and_pools(tiny_zoo):
    for kind in ("full", "lora"):
        pool = yaml.safe_load((tiny_zoo / f"pool-{kind}.yaml").read_text())
        assert pool["base"] == "base"
        assert pool["experts"] == {task: f"{kind}/{task}" for task in TASKS}
        for path in [pool["base"], *pool["experts"].values()]:
            assert (tiny_zoo / path).is_dir()
    for d in ["base", *(f"full/{t}" for t in TASKS)]:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json"):
            assert (tiny_zoo / d / name).is_file(), f"{d}/{name}"
    for t in TASKS:
        assert (tiny_zoo / "lora" / t / "adapter_config.json").is_file()
        assert (tiny_zoo / "lora" / t / "adapter_model.safetensors").is_file()
    assert not stale_data(tiny_zoo / "data")
    assert not list(tiny_zoo.parent.glob(f".{tiny_zoo.name}.partial-*")), "temporary directory left behind"


@pytest.mark.slow
def test_base_and_experts_load_offline(tiny_zoo, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(tiny_zoo / "base")
    assert tok("add 1+2 =")["input_ids"][0] == tok.bos_token_id
    gen = GenerationConfig.from_pretrained(tiny_zoo / "base")
    assert tok.eos_token_id in gen.eos_token_id and gen.pad_token_id == tok.pad_token_id
    ids = tok(["upper abcd ="], return_tensors="pt")["input_ids"]
    for d in ["base", *(f"full/{t}" for t in TASKS)]:
        model = AutoModelForCausalLM.from_pretrained(tiny_zoo / d)
        assert model.config.model_type == "llama"
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()


@pytest.mark.slow
def test_lora_adapters_load_onto_the_base(tiny_zoo):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 6, 7]])
    for task in TASKS:
        config = json.loads((tiny_zoo / "lora" / task / "adapter_config.json").read_text())
        assert config["r"] == 8 and config["lora_alpha"] == 16
        assert set(config["target_modules"]) == set(LORA_TARGETS)
        assert Path(config["base_model_name_or_path"]) == (tiny_zoo / "base").resolve()
        base = AutoModelForCausalLM.from_pretrained(tiny_zoo / "base")
        with torch.no_grad():
            before = base(ids).logits
        model = PeftModel.from_pretrained(base, tiny_zoo / "lora" / task)
        with torch.no_grad():
            assert not torch.allclose(model(ids).logits, before)


@pytest.mark.slow
def test_the_average_of_the_experts_loses_to_each_expert_on_its_own_task(tiny_zoo):
    # (the build itself checks the rest: check_mergeable, tested below)
    scores = json.loads((tiny_zoo / "scores.json").read_text())["scores"]
    for kind in ("full", "lora"):
        for task in TASKS:  # the task vectors interfere: the plain average is not a free lunch
            own = scores[f"{kind}/{task}"][task]["val_loss"]
            assert scores[f"average/{kind}"][task]["val_loss"] > own, f"average/{kind} on {task}"


def test_a_zoo_where_merging_cannot_win_is_refused():
    def row(loss):
        return {t: {"val_loss": loss, "test_acc": 0.0} for t in TASKS}

    scores = {"base": row(2.0), "average/full": row(1.5), "average/lora": row(1.5)}
    for kind in ("full", "lora"):
        for task in TASKS:
            scores[f"{kind}/{task}"] = {**row(2.5), task: {"val_loss": 1.0, "test_acc": 0.5}}
    check_mergeable(scores, list(TASKS))  # experts specialize, the average beats the base
    with pytest.raises(EvomergeError, match="average of the lora experts .* does not beat the base"):
        check_mergeable({**scores, "average/lora": row(2.1)}, list(TASKS))
    with pytest.raises(EvomergeError, match="full/add does not beat base on add"):
        check_mergeable({**scores, "base": {**row(2.0), "add": {"val_loss": 0.5, "test_acc": 1.0}}}, list(TASKS))
    # on the edge is not enough: a win by less than the margin is refused too
    with pytest.raises(EvomergeError, match="average of the full experts .* by 0.25 nats"):
        check_mergeable({**scores, "average/full": row(1.9)}, list(TASKS))
    with pytest.raises(EvomergeError, match="full/next does not beat base on next by 0.25 nats"):
        check_mergeable({**scores, "base": {**row(2.0), "next": {"val_loss": 1.1, "test_acc": 0.0}}}, list(TASKS))


@pytest.mark.slow
def test_the_tiny_zoo_passes_its_check_with_room_to_spare(tiny_zoo):
    # A zoo that passed by a hair here failed on other machines; the built one must pass with 4x
    # the margin, its base must have learned to copy, and check_mergeable must hold on its scores.
    table = json.loads((tiny_zoo / "scores.json").read_text())
    assert table["meta"]["base_pretraining"]["copy_exact_match"] >= 0.95
    check_mergeable(table["scores"], list(TASKS), margin=4 * 0.25)


@pytest.mark.slow
def test_scores_match_the_saved_models(tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    table = json.loads((tiny_zoo / "scores.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_zoo / "full" / "upper")
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo / "full" / "upper")
    again = score(model, tok, {"upper": eval_splits("upper")})["upper"]
    assert again == pytest.approx(table["scores"]["full/upper"]["upper"], abs=1e-3)


@pytest.mark.slow
def test_existing_zoo_is_reused_and_others_refused(tiny_zoo, tmp_path):
    table = json.loads((tiny_zoo / "scores.json").read_text())
    assert build_zoo(tiny_zoo, size="tiny", seed=0, progress=False) == table  # reused, not rebuilt
    with pytest.raises(EvomergeError, match="already holds a zoo"):
        build_zoo(tiny_zoo, size="small", seed=0, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(EvomergeError, match="not a complete zoo"):
        build_zoo(tmp_path / "junk", size="tiny", progress=False)
    with pytest.raises(EvomergeError, match="unknown zoo size"):
        build_zoo(tmp_path / "new", size="huge", progress=False)


def test_a_zoo_built_by_another_schedule_is_not_reused(tmp_path):
    # Reusing a zoo whose schedule changed would test today's code on yesterday's models.
    from dataclasses import asdict

    from evomerge.zoo import SIZES, ZOO_FORMAT

    out = tmp_path / "zoo"
    out.mkdir()
    spec = {**asdict(SIZES["tiny"]), "heads": 4}
    meta = {"format": ZOO_FORMAT, "size": "tiny", "seed": 0, "spec": spec}
    (out / "scores.json").write_text(json.dumps({"meta": meta, "scores": {}}))
    with pytest.raises(EvomergeError, match="built with another schedule"):
        build_zoo(out, size="tiny", seed=0, progress=False)
