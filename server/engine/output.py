"""Output processing: what each sampled token means for its request's stream.

A token is appended, timed and decoded incrementally (`detokenizer.py`, never a broken character);
the text goes through the request's stop-string matcher (`stops.py`, which holds back what may
still become a stop string). The request ends with "stop" on one of its ending tokens (its
`stop_token_ids`, and the model's end-of-sequence ids unless `ignore_eos`) once `min_tokens` came
before it (the sampler masks those ids until then), or on a stop string; and with "length" at
`max_tokens` or the model's context. A constrained request's grammar state advances on every token
but its ending ones; the request ends with "stop" as soon as its grammar is complete (nothing may
follow: no extra step for the end-of-sequence token), and with "error" if its grammar reached a dead
end (no token of the vocabulary continues it). Its grammar state gets the request's budget
(`max_tokens`, within the context) and steers the document to completion before it (the wrap-up,
grammar.py). At the end, the held-back text is released and the
last output carries the usage; the observer gets the request's timings.
"""
from __future__ import annotations

import time

from server.engine.detokenizer import byte_view, make_detokenizer, whole_texts
from server.engine.results import EngineObserver, FinishedRequestStats, RequestOutput, TokenLogprob, Usage
from server.engine.sequence import Sequence
from server.engine.stops import StopStringMatcher

_new_tuple = tuple.__new__


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_context: int, observer: EngineObserver,
                 detokenize: bool = True):
        self.tokenizer = tokenizer
        # off: outputs carry token ids only (text "", stop strings not matched), for an API process
        # that detokenizes them itself (front_text.py)
        self.detokenize = detokenize
        self.eos_token_ids = eos_token_ids
        self.max_context = max_context
        self.observer = observer
        # each token's bytes, when decoding is their concatenation: detokenizing then costs O(new bytes)
        self.byte_view = byte_view(tokenizer)
        self.byte_texts = whole_texts(self.byte_view) if self.byte_view is not None and detokenize else None

    def start(self, seq: Sequence) -> None:
        """Give a new request its detokenizer, stop-string matcher, ending token ids and grammar state."""
        if self.detokenize:
            seq.detokenizer = make_detokenizer(self.tokenizer, seq.prompt_token_ids, self.byte_view, self.byte_texts)
            seq.stop_matcher = StopStringMatcher(seq.request.params.stop)
        seq.ending_token_ids = frozenset(seq.request.params.ending_token_ids(self.eos_token_ids))
        if seq.request.params.grammar is not None:
            budget = min(seq.request.params.max_tokens, self.max_context - len(seq.prompt_token_ids))
            seq.grammar = seq.request.params.grammar.start(budget)     # wraps up within it (grammar.py)

    def append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None,
                     now: float | None = None) -> RequestOutput | None:
        """Append a sampled token (`now`: the step's time, read once for all its tokens). A delta that
        does not end the request is emitted here (None comes back); the last one comes back, with its
        finish reason, for the caller to `finish` with."""
        request = seq.request
        params = request.params
        output_ids = seq.output_token_ids
        output_ids.append(token)
        seq.record_token_time(now)
        finish_reason = None
        text, stopped_by_string = "", False
        grammar = seq.grammar
        if token in seq.ending_token_ids and len(output_ids) > params.min_tokens:
            finish_reason = "stop"
        else:
            if grammar is not None:
                grammar.advance(token)
            if self.detokenize:
                text = seq.detokenizer.push((token,))
                if seq.stop_matcher.stops:      # (without stop strings the matcher passes text through)
                    text, stopped_by_string = seq.stop_matcher.feed(text)
                    if stopped_by_string:
                        finish_reason = "stop"
        if grammar is not None and grammar.error:
            finish_reason = "error"             # a dead end: even the end-of-sequence it allowed is no answer
        elif grammar is not None and grammar.done and finish_reason is None:
            finish_reason = "stop"
        if finish_reason is None and (len(output_ids) >= params.max_tokens
                                      or len(request.prompt_token_ids) + len(output_ids) >= self.max_context):
            finish_reason = "length"
        if finish_reason is not None and not stopped_by_string and self.detokenize:
            # release what was held back: an incomplete character, a possible stop-string prefix
            tail, stopped_by_string = seq.stop_matcher.feed(seq.detokenizer.flush())
            text += tail
            if stopped_by_string:
                finish_reason = "stop"
            else:
                text += seq.stop_matcher.flush()
        logprobs = (logprob,) if params.logprobs is not None and logprob is not None else None
        error = grammar.error if grammar is not None and finish_reason == "error" else None
        # RequestOutput(request_id, text, token_ids, logprobs, finish_reason, error, usage), made without
        # the named tuple's Python-level __new__ (once per request and step)
        delta = _new_tuple(RequestOutput, (request.request_id, text, (token,), logprobs, finish_reason, error, None))
        if finish_reason is None:
            seq.emit(delta)
            return None
        return delta

    def finish(self, seq: Sequence, reason: str, error: str | None = None, last: RequestOutput | None = None) -> None:
        """Send the request's last output (`last`'s text, token and logprobs, if any) with its usage,
        and report its timings."""
        seq.finish_reason = reason
        cached = seq.num_cached_prompt_tokens or 0
        usage = Usage(len(seq.prompt_token_ids), len(seq.output_token_ids), cached)
        text, token_ids, logprobs = (last.text, last.token_ids, last.logprobs) if last is not None else ("", (), None)
        error = error or (last.error if last is not None else None)
        seq.emit(RequestOutput(seq.request_id, text, token_ids, logprobs, reason, error, usage))
        now = time.monotonic()
        arrival = seq.request.arrival_time
        self.observer.on_request_finished(FinishedRequestStats(
            finish_reason=reason, prompt_tokens=usage.prompt_tokens, generation_tokens=usage.completion_tokens,
            cached_tokens=cached, queue_time=(seq.first_scheduled_time or now) - arrival,
            time_to_first_token=None if seq.first_token_time is None else seq.first_token_time - arrival,
            inter_token_latencies=tuple(seq.inter_token_latencies), e2e_latency=now - arrival))
