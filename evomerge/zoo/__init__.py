"""The demo zoo: a base model and a pool of experts built from nothing on a CPU in seconds.

`build_zoo(out, size)` pre-trains a small Llama-architecture model on `copy` (the answer format and
every character, none of the four skills of `evomerge.zoo.tasks`), then for each task one full
fine-tune and one LoRA adapter on that task with the pre-training mix replayed (one batch row in
`expert_replay + 1`). Each expert learns its task and is the best model on it; their task vectors
interfere, so the average of the experts is far from each expert on its own task but better than
the base on the mean: merging is a real, winnable problem. The build checks that last property
(`check_mergeable`) and refuses to write a zoo without it. It scores everything and writes:

    OUT/base/                 config.json, model.safetensors, tokenizer (tokenizer.json + config),
                              generation_config.json
    OUT/full/<task>/          same files as base/
    OUT/lora/<task>/          adapter_config.json + adapter_model.safetensors (peft save_pretrained;
                              base_model_name_or_path is the absolute path of OUT/base)
    OUT/data/<task>/          validation.jsonl, test.jsonl (as committed under evaluators/data/)
    OUT/pool-full.yaml        base: base, experts: {task: full/<task>}  (paths relative to the YAML)
    OUT/pool-lora.yaml        base: base, experts: {task: lora/<task>}
    OUT/scores.json           {"meta": ..., "scores": {model: {task: {"val_loss", "test_acc"}}}}
                              models: base, full/<task>, lora/<task>, and average/full and
                              average/lora (the plain average of each pool's experts)

The zoo is built in a temporary directory beside OUT and renamed into place at the end, so OUT is
either absent or complete. If OUT already holds a complete zoo of the same size and seed it is
reused (its scores are returned); any other existing, non-empty OUT is an error.

The tokenizer is character-level (a `tokenizers` BPE model without merges), loads with
`AutoTokenizer.from_pretrained(dir)` offline and prepends <s> like Llama's.

The package: `tasks` (the synthetic tasks and their data), `model` (tokenizer, model, training,
scoring), `build` (build_zoo and its checks).
"""

from evomerge.zoo.build import (  # noqa: F401 - the zoo's public names, importable from evomerge.zoo
    BASE_COPY_TARGET,
    BASE_EXTRA_ROUNDS,
    LORA_TARGETS,
    MERGEABLE_MARGIN,
    ZOO_FORMAT,
    build_zoo,
    check_mergeable,
    copy_accuracy,
    expert_mix,
    pretrain_base,
    scores_markdown,
)
from evomerge.zoo.model import (  # noqa: F401
    SIZES,
    SPECIAL_TOKENS,
    ZooSize,
    build_model,
    build_tokenizer,
    encode,
    greedy_answers,
    save_model,
    score,
    train,
    val_loss,
)
