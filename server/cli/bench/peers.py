"""Peers measured in the same invocation on the same GGUF weights: Hugging Face transformers
(`generate`, and `generate_batch` continuous batching where the installed version has it) and
llama-cpp-python, in process for `bench engine` (each returns decode tokens/s, or raises ImportError
when not installed); the servers `bench serve` starts itself are in `server_processes.py`."""
from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import torch

log = logging.getLogger("customllm.bench")


def _random_prompts(batch_size: int, context_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(context_len)] for _ in range(batch_size)]


class TransformersPeer:
    """The same GGUF loaded by transformers (dequantised; float32 on the CPU, bfloat16 on CUDA)."""

    name = "transformers"

    def __init__(self, gguf_path: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                          dtype=dtype).eval().to(self.device)
        self.vocab = self.model.config.vocab_size

    @torch.inference_mode()
    def _generate(self, ids: torch.Tensor, new_tokens: int) -> float:
        ids = ids.to(self.device)
        started = time.perf_counter()
        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def decode_tokens_per_s(self, batch_size: int, context_len: int, output_len: int) -> float:
        """Decode rate of `generate`: (time for output_len tokens − time for 1) over output_len − 1 steps."""
        ids = torch.tensor(_random_prompts(batch_size, context_len, self.vocab, seed=batch_size))
        self._generate(ids, 2)  # warm-up
        one = self._generate(ids, 1)
        full = self._generate(ids, output_len)
        return batch_size * (output_len - 1) / max(full - one, 1e-9)

    def continuous_batching_tokens_per_s(self, batch_size: int, context_len: int, output_len: int) -> float | None:
        """Output tokens/s of `generate_batch` (prefill included), or None where unavailable."""
        if not hasattr(self.model, "generate_batch"):
            return None
        from transformers import GenerationConfig
        prompts = _random_prompts(batch_size, context_len, self.vocab, seed=batch_size)
        config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
        started = time.perf_counter()
        outputs = self.model.generate_batch(prompts, generation_config=config, progress_bar=False)
        elapsed = time.perf_counter() - started
        produced = sum(len(o.generated_tokens) for o in outputs.values())
        return produced / elapsed


class LlamaCppPeer:
    """llama.cpp through llama-cpp-python on the same GGUF, single stream."""

    name = "llama-cpp-python"

    def __init__(self, gguf_path: Path, context: int, threads: int):
        from llama_cpp import Llama
        self.llm = Llama(model_path=str(gguf_path), n_ctx=context, n_threads=threads, n_batch=512,
                         verbose=False, logits_all=False)
        self.vocab = self.llm.n_vocab()

    def decode_tokens_per_s(self, context_len: int, output_len: int) -> float:
        prompt = _random_prompts(1, context_len, self.vocab, seed=1)[0]
        self.llm.reset()
        stamps = []
        for _ in self.llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) >= output_len:
                break
        return (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)
