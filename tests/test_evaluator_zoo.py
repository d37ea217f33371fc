"""Helpers for the evaluator tests: a tiny random Llama + a real `tokenizers` tokenizer on disk,
and small JSONL tasks. (Used until/unless the shared `tiny_zoo` fixture is available; texts use
only the zoo tokenizer's characters: letters, digits, space, newline, "=", "+".)"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = "zero one two three four five six seven eight nine ten plus minus times is what the answer".split()


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        records.append({"question": f"what is {WORDS[a]} plus {WORDS[b]}", "answer": str(a + b)})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A 2-layer random LlamaForCausalLM with a byte-level BPE tokenizer that adds BOS."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [f"{r['question']} {r['answer']}\n" for r in make_records(400, seed)] + [" ".join(WORDS)]
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties in greedy decoding
        model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(directory)
    return directory
