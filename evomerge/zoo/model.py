"""The demo zoo's models: the character-level tokenizer, the Llama-architecture model of each
size, and how they are trained and scored (validation loss, greedy exact match)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.zoo.tasks import ALPHABET, train_records

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3

@dataclass(frozen=True)
class ZooSize:
    """Model shape and training schedule of one zoo size."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    batch: int
    base_steps: int
    base_lr: float
    full_steps: int
    full_lr: float
    lora_steps: int
    lora_lr: float
    expert_replay: int  # own-task batch rows per pre-training row while fine-tuning an expert


SIZES = {
    "tiny": ZooSize(hidden=64, layers=2, heads=2, intermediate=128, batch=64,
                    base_steps=400, base_lr=3e-3, full_steps=80, full_lr=2e-3,
                    lora_steps=80, lora_lr=1e-2, expert_replay=2),
    "small": ZooSize(hidden=128, layers=4, heads=4, intermediate=256, batch=64,
                     base_steps=500, base_lr=3e-3, full_steps=150, full_lr=1e-3,
                     lora_steps=150, lora_lr=1e-2, expert_replay=2),
}


# ---- tokenizer ------------------------------------------------------------------------------


def build_tokenizer():
    """A character-level fast tokenizer: one token per character of ALPHABET, <s> prepended."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *ALPHABET])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()  # join characters as they are (no spaces in between)
    backend.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )


_CHAR_IDS = {c: i for i, c in enumerate(ALPHABET, start=len(SPECIAL_TOKENS))}


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without specials: one per character (what the tokenizer gives, faster)."""
    return [_CHAR_IDS[c] for c in text]


# ---- model ----------------------------------------------------------------------------------


def build_model(size: ZooSize, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def save_model(model, tokenizer, path: Path) -> None:
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("\n")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


# ---- training -------------------------------------------------------------------------------


def _batch(tokenizer, records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [<s> question answer \\n </s>] ids and labels (-100 except answer, \\n, </s>)."""
    rows, labels = [], []
    for r in records:
        q = [tokenizer.bos_token_id, *encode(tokenizer, r["question"])]
        a = [*encode(tokenizer, r["answer"] + "\n"), tokenizer.eos_token_id]
        rows.append(q + a)
        labels.append([-100] * len(q) + a)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    for i, (row, label) in enumerate(zip(rows, labels)):
        ids[i, : len(row)] = torch.tensor(row)
        lab[i, : len(label)] = torch.tensor(label)
    return ids, lab


def _loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Right padding under a causal mask never changes the logits of the real tokens: no mask needed.
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def train(model, tokenizer, tasks: list[str], steps: int, lr: float, batch: int, stream: str,
          on_step=None) -> None:
    """AdamW with warmup and cosine decay on the answer tokens of `tasks` (repeat a name to weigh it)."""
    streams = {task: train_records(task, stream) for task in tasks}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    for step in range(steps):
        records = [next(streams[tasks[i % len(tasks)]]) for i in range(batch)]
        loss = _loss(model, *_batch(tokenizer, records))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step:
            on_step()
    model.eval()


# ---- scoring --------------------------------------------------------------------------------


@torch.no_grad()
def val_loss(model, tokenizer, records: list[dict], batch: int = 200) -> float:
    """Mean teacher-forced cross-entropy (nats per token) of the answer tokens given <s> question."""
    total, count = 0.0, 0
    for i in range(0, len(records), batch):
        chunk = records[i : i + batch]
        rows = [[tokenizer.bos_token_id, *encode(tokenizer, r["question"])] for r in chunk]
        answers = [encode(tokenizer, r["answer"]) for r in chunk]
        ids, labels = _batch(tokenizer, chunk)
        for j, (q, a) in enumerate(zip(rows, answers)):  # answer tokens only (not \n, </s>)
            labels[j, len(q) + len(a) :] = -100
        logits = model(input_ids=ids).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
            reduction="sum",
        )
        total += ce.item()
        count += int((labels[:, 1:] != -100).sum())
    return total / count


@torch.no_grad()
def greedy_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 10) -> list[str]:
    """Greedy continuation of each question up to (not including) the first newline or </s>."""
    newline = tokenizer.convert_tokens_to_ids("\n")
    by_length: dict[int, list[int]] = {}
    encoded = [[tokenizer.bos_token_id, *encode(tokenizer, q)] for q in questions]
    for i, ids in enumerate(encoded):  # same length -> one batch without padding
        by_length.setdefault(len(ids), []).append(i)
    out = [""] * len(questions)
    for indices in by_length.values():
        ids = torch.tensor([encoded[i] for i in indices])
        start = ids.shape[1]
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if bool(((ids[:, start:] == newline) | (ids[:, start:] == tokenizer.eos_token_id)).any(1).all()):
                break
        for row, i in zip(ids[:, start:].tolist(), indices):
            stop = next((k for k, t in enumerate(row) if t in (newline, tokenizer.eos_token_id)), len(row))
            out[i] = tokenizer.decode(row[:stop], skip_special_tokens=True)
    return out


def score(model, tokenizer, splits: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, float]]:
    """Per task: validation loss and greedy exact-match accuracy on the test split."""
    result = {}
    for task, data in splits.items():
        preds = greedy_answers(model, tokenizer, [r["question"] for r in data["test"]])
        acc = sum(p == r["answer"] for p, r in zip(preds, data["test"])) / len(data["test"])
        result[task] = {"val_loss": round(val_loss(model, tokenizer, data["validation"]), 4),
                        "test_acc": round(acc, 4)}
    return result
