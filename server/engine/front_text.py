"""Text on the API side of an engine-core process: the core sends token ids only, and each request's
ids become text here (incremental detokenizing, stop strings), by the rules the in-process output
processing (output.py) applies:

- an ending token (the request's `stop_token_ids`, end-of-sequence unless `ignore_eos`, once
  `min_tokens` came before it) ends the request with "stop" and is not text;
- a stop string ends the request at the token that completes it ("stop"; the string and everything
  after it are dropped, tokens after that token too), which the caller then aborts in the core;
- at the end (stop, length, or a grammar's end or dead end) the held-back text is released.
"""
from __future__ import annotations

from server.engine.detokenizer import make_detokenizer
from server.engine.request import GenerationRequest
from server.engine.results import RequestOutput, Usage
from server.engine.stops import StopStringMatcher


class RequestText:
    def __init__(self, tokenizer, view, request: GenerationRequest, eos_token_ids: tuple[int, ...], texts=None):
        """`view`: the tokenizer's `byte_view` (or None), `texts`: its `whole_texts` (or None)."""
        params = request.params
        self.detokenizer = make_detokenizer(tokenizer, request.prompt_token_ids, view, texts)
        self.stops = StopStringMatcher(params.stop)
        self.ending_token_ids = frozenset(params.ending_token_ids(eos_token_ids))
        self.min_tokens = params.min_tokens
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_tokens = 0                 # output tokens seen so far
        self.stopped_by_string = False

    def apply(self, output: RequestOutput, cached_tokens: int = 0) -> RequestOutput:
        """The core's delta (token ids, maybe merged over several steps) with its text; finished with
        "stop" if a stop string completed in it (`stopped_by_string` is then set)."""
        pieces: list[str] = []
        kept = len(output.token_ids)
        for i, token in enumerate(output.token_ids):
            self.num_tokens += 1
            last = i == len(output.token_ids) - 1
            if last and output.finished and token in self.ending_token_ids and self.num_tokens > self.min_tokens:
                continue                    # the core ended the request on it: no text
            text, stopped = self.stops.feed(self.detokenizer.push((token,)))
            pieces.append(text)
            if stopped:
                self.stopped_by_string, kept = True, i + 1
                self.num_tokens -= len(output.token_ids) - kept
                break
        finish_reason, usage = output.finish_reason, output.usage
        if self.stopped_by_string:
            finish_reason = "stop"
            usage = Usage(self.num_prompt_tokens, self.num_tokens, cached_tokens)
        elif output.finished and output.token_ids:
            # the request ended on a token (not by an abort or a failed step): release what was held
            tail, stopped = self.stops.feed(self.detokenizer.flush())
            pieces.append(tail)
            if stopped:
                finish_reason = "stop"
            else:
                pieces.append(self.stops.flush())
        logprobs = output.logprobs[:kept] if output.logprobs is not None else None
        return RequestOutput(output.request_id, "".join(pieces), output.token_ids[:kept], logprobs, finish_reason,
                             output.error, usage)
