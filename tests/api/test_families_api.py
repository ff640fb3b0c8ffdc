"""ShomsherLLM and SmartLLM through real HTTP (uvicorn, the real engine, the seeds' tokenizer formats):
completions answer and stream the same text, Bengali included; a session's second turn is served
from the cache (SmartLLM's with its sliding window releasing blocks as it goes); chat follows each
family's template, or says how to pass one."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from model.config import preset
from model.loading.init_weights import random_model, save_checkpoint
from server.config import EngineConfig
from tests.api_server import InProcessServer
from tests.seed_files import BENGALI, write_bengali_bpe, write_smart_bpe

FAMILIES = {
    # trained here to recite the Bengali lines its tokenizer was built from, so that its answers are
    # real Bengali whose characters span several byte-level tokens
    "shomsher": dict(preset="shomsher-tiny", write_tokenizer=write_bengali_bpe,
                     prompt="আমি বাংলায় গান গাই।<eos>বাংলা", follow_up="<eos>আজকে সকালে"),
    "smart": dict(preset="smart-llm-tiny", write_tokenizer=write_smart_bpe,
                  prompt="<user>What is the capital of France?<assistant>The capital of France is",
                  follow_up="<user>Tell me a joke about a quick brown fox.<assistant>"),
}
BLOCK = 4


def write_checkpoint(directory: Path, spec: dict, tokenizer: Path, recite: list[str] = ()) -> Path:
    """A random checkpoint of the family's tiny preset, as `customllm weights init` writes it; with
    `recite`, first trained (Adam, a few seconds) until greedy decoding reproduces those texts."""
    vocab_size = Tokenizer.from_file(str(tokenizer)).get_vocab_size()
    config = preset(spec["preset"]).replace(vocab_size=vocab_size)
    torch.manual_seed(0)
    model = random_model(config, seed=3, std=0.2, dtype=torch.float32)
    if recite:
        ids = torch.tensor([[i for text in recite for i in Tokenizer.from_file(str(tokenizer)).encode(text).ids]])
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(600):
            logits = model.forward_full(ids[:, :-1])[0]                        # [T-1, V]
            loss = F.cross_entropy(logits, ids[0, 1:])
            learned = bool((logits.argmax(-1) == ids[0, 1:]).all()) and loss.item() < 0.05
            if learned:
                break
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        assert learned, f"the tiny model did not learn its lines (loss {loss.item():.3f})"
    save_checkpoint(model, directory, {"preset": spec["preset"], "vocab_size": vocab_size})
    return directory


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    name, spec = request.param, FAMILIES[request.param]
    directory = tmp_path_factory.mktemp(name)
    tokenizer = spec["write_tokenizer"](directory / "tokenizer.json")
    checkpoint = write_checkpoint(directory / "checkpoint", spec, tokenizer,
                                  recite=BENGALI * 2 if name == "shomsher" else ())
    engine_config = EngineConfig(kv_cache_memory_gib=0.002, block_size=BLOCK)
    with InProcessServer(checkpoint, engine_config=engine_config, tokenizer=tokenizer) as server:
        yield name, spec, server
    server.settle()


def completion(server, prompt: str, max_tokens: int = 24, **extra) -> dict:
    body = {"model": "checkpoint", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60,
                          headers={"X-Session-ID": extra["session_id"]} if "session_id" in extra else None)
    assert response.status_code == 200, response.text
    return response.json()


def streamed_pieces(server, prompt: str, max_tokens: int = 24) -> tuple[list[str], str | None]:
    body = {"model": "checkpoint", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    pieces, finish_reason = [], None
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[len("data: "):])["choices"][0]
            pieces.append(choice["text"])
            finish_reason = choice.get("finish_reason") or finish_reason
    return pieces, finish_reason


def test_completion_answers_and_the_stream_carries_the_same_text(family):
    name, spec, server = family
    answer = completion(server, spec["prompt"])
    text = answer["choices"][0]["text"]
    assert answer["usage"]["completion_tokens"] == 24 and answer["choices"][0]["finish_reason"] == "length"
    pieces, finish_reason = streamed_pieces(server, spec["prompt"])
    assert "".join(pieces) == text and finish_reason == "length"
    assert sum(1 for piece in pieces if piece) >= 2, "the answer came in one piece, not streamed"
    if name == "shomsher":
        # the trained model recites its next line; byte-level tokens end inside Bengali characters,
        # and no streamed piece may carry half of one
        assert text.startswith(" ভাষা খুব সুন্দর।"), text
        assert "\ufffd" not in text and not any("\ufffd" in piece for piece in pieces)
    server.settle()


def test_shomsher_stops_at_eos(family):
    name, spec, server = family
    if name != "shomsher":
        pytest.skip("ShomsherLLM's <eos> (id 0)")
    body = {"model": "checkpoint", "prompt": "আমি বাংলায় গান গাই।<eos>বাংলা ভাষা খুব", "max_tokens": 24, "temperature": 0}
    answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    assert answer["choices"][0] == {**answer["choices"][0], "text": " সুন্দর।", "finish_reason": "stop"}
    server.settle()


def test_a_session_second_turn_is_served_from_the_cache(family):
    name, spec, server = family
    session = {"session_id": f"{name}-chat"}
    first = completion(server, spec["prompt"], max_tokens=24, ignore_eos=False, **session)
    history = spec["prompt"] + first["choices"][0]["text"] + spec["follow_up"]
    second = completion(server, history, max_tokens=12, ignore_eos=False, **session)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= BLOCK and cached % BLOCK == 0
    if name == "shomsher":      # and the answer from the cached prefix is still the line it learned
        assert second["choices"][0]["text"].startswith(" বৃষ্টি হয়েছে!"), (first, history, second)
    sessions = httpx.get(f"{server.url}/v1/sessions", timeout=10).json()["data"]
    assert [s["id"] for s in sessions] == [f"{name}-chat"] and sessions[0]["num_tokens"] > 0
    server.settle()
    if name == "smart":         # its window (8 tokens) slid past whole blocks, which went back to the pool
        assert server.engine.kv.num_window_released_blocks > 0


def test_chat_follows_the_family_template_or_says_how_to_pass_one(family):
    name, _, server = family
    body = {"model": "checkpoint", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    if name == "shomsher":      # the seed has no chat format
        assert response.status_code == 400
        error = response.json()["error"]
        assert "--chat-template FILE" in error["message"] and error["code"] == "no_chat_template"
    else:
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    server.settle()
