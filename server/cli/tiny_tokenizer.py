"""A small byte-level BPE tokenizer trained in about a second, for benchmarks and tests of the
serving path with a tiny model (`customllm weights init --train-tokenizer N`).

The corpus is the text of this package's own source files, so the result depends only on the
installed version; the tokenizer is GPT-2-style byte-level BPE (every byte is a token, merges on
top), with ChatML's special tokens and chat template, so chat requests and streaming work as with
the built-in model.
"""
from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def corpus_files() -> list[Path]:
    """The package's Python sources, in a fixed order."""
    root = Path(__file__).resolve().parents[2]
    return sorted(p for package in ("server", "model") for p in (root / package).rglob("*.py"))


def train_byte_level_bpe(vocab_size: int, out: Path) -> int:
    """Train a byte-level BPE of exactly `vocab_size` tokens and write `out/tokenizer.json` and
    `out/tokenizer_config.json` (end-of-sequence `<|im_end|>`, the ChatML template). Returns the size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"a byte-level BPE needs at least {MIN_VOCAB} tokens (256 bytes and "
                         f"{len(SPECIAL_TOKENS)} special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [p.read_text(encoding="utf-8") for p in corpus_files()]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    size = tokenizer.get_vocab_size()
    if size != vocab_size:
        raise ValueError(f"the corpus gave only {size} tokens; ask for at most that many")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return size
