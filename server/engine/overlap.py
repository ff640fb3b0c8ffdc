"""Overlapped decode steps: the host plans step N+1 and finishes step N while the device runs.

Without it every step is `schedule → build inputs → forward → sample → update outputs`, all in
series: on a GPU the device idles while Python schedules, builds the batch and detokenizes. With it
(`--overlap-steps`), a run of plain decode steps is pipelined one step deep:

    host:    plan N+1 | wait for N | launch N+1 | update outputs of N | plan N+2 | wait for N+1 | ...
    device:  ........ forward + sample N ......| ..... forward + sample N+1 .............| ...

The forward and the sampling run on one worker thread (the "device"; on CUDA it launches kernels,
on the CPU it computes); they release the GIL, so the engine thread's host work runs meanwhile and
a step takes about max(host, device) instead of their sum.

Step N+1 is planned before N's tokens are known: each running request computes, in N+1, the position
of the token N is sampling, so its cache blocks are allocated and its batch row is written with the
position and block table only; the worker fills in the token ids from N's samples when it starts N+1
(sampled ids consumed one step late). A request that ends in step N (an end-of-sequence token, a stop
string, an abort) has already been launched in N+1: that step computes the cache row of N's real
token, and the token it samples is dropped, so outputs are exactly those of the steps in series. A
request known to end in N (its `max_tokens`) is not planned into N+1 at all.

Only steps the pipeline can plan ahead are overlapped: every running request decodes one token, none
wants a logits processor that reads its previous tokens (penalties, `min_tokens`, a grammar, a logit
bias), speculates, or has a sliding window, nobody waits for admission, and the blocks fit without
preempting anyone. Anything else lets the in-flight step finish and takes the ordinary step (which
may start a new pipeline), so admissions, preemption and fairness stay the scheduler's.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from server.engine.sampler import NO_TOKEN
from server.engine.sequence import Sequence, SequenceStatus

log = logging.getLogger("customllm.engine")


def overlappable(seq: Sequence) -> bool:
    """Whether a request's next token can be sampled before its previous one is known."""
    params = seq.request.params
    return not params.wants_logits_processors and not params.speculative


@dataclass
class InFlightStep:
    seqs: list[Sequence]            # one row each, in batch order
    future: Future                  # → [(token, logprob, error)] per row (`EngineCore.sample_rows`)


class StepPipeline:
    """The overlapped steps of one `EngineCore` (which it reads and updates under the core's lock)."""

    def __init__(self, core, num_threads: int | None = None):
        self.core = core
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="customllm-device", initializer=self._init_worker,
                                         initargs=(num_threads or torch.get_num_threads(), core.device))
        self.in_flight: InFlightStep | None = None
        self.num_launched = 0           # steps handed to the worker
        self.num_planned_ahead = 0      # of which planned while the one before was in flight

    @staticmethod
    def _init_worker(num_threads: int, device: torch.device) -> None:
        """The worker's intra-op threads and current CUDA device are its own settings: the engine's."""
        torch.set_num_threads(num_threads)
        if device.type == "cuda":
            torch.cuda.set_device(device)

    # ---- starting -------------------------------------------------------------------------------
    def can_start(self, chunks) -> bool:
        """Whether an ordinary step's chunks can be the first of a pipeline: every chunk decodes one
        known token of an overlappable request (the persistent batch then gathers them)."""
        return all(c.num_tokens == 1 and not c.draft_token_ids and c.completes_prompt and overlappable(c.seq)
                   for c in chunks)

    def start(self, chunks, inputs) -> None:
        """Launch a step of known tokens (`inputs`: the persistent batch's gather of `chunks`)."""
        token_ids, positions, tables, rows = inputs
        self.in_flight = self._launch([c.seq for c in chunks], token_ids, positions, tables, rows, None, None)

    # ---- one pipelined step ---------------------------------------------------------------------
    def advance(self) -> bool:
        """Plan and launch the next step if it can be planned ahead, then finish the one in flight.
        False if the step in flight failed (its requests then finish with an error)."""
        current = self.in_flight
        following = None
        with self.core.lock:
            planned = self._plan_next(current)
        if planned is not None:
            following = self._launch(*planned, previous=current)
            self.num_planned_ahead += 1
        try:
            sampled = current.future.result()
        except Exception as exc:  # noqa: BLE001 - fail the step's requests, keep serving
            log.exception("engine step failed: %s", exc)
            self.in_flight = None
            failed = current.seqs
            if following is not None:
                self._wait_quietly(following)
                failed = failed + following.seqs
            with self.core.lock:
                for seq in failed:
                    self.core.finish(seq, "error", error=f"internal error during generation: {exc}")
            return False
        self.in_flight = following
        self._update(current, sampled)
        return True

    def discard(self) -> None:
        """Wait for the step in flight and drop its tokens (every request is being failed)."""
        if self.in_flight is not None:
            self._wait_quietly(self.in_flight)
            self.in_flight = None

    def close(self) -> None:
        self.discard()
        self.worker.shutdown(wait=True)

    # ---- internals ------------------------------------------------------------------------------
    def _plan_next(self, current: InFlightStep):
        """The inputs of the step after `current` (caller holds the core's lock), or None when it
        cannot be planned ahead: (seqs, token_ids placeholder, positions, tables, rows, source) where
        `source[i]` is the row of `current` whose sampled token is input i."""
        core, scheduler = self.core, self.core.scheduler
        if scheduler.waiting or core.batch is None or scheduler.shared_step_cap() is not None:
            return None                     # (a shared step picks its requests: the ordinary step plans it)
        in_current = {id(seq): i for i, seq in enumerate(current.seqs)}
        running = scheduler.running
        if len(running) > scheduler.max_num_batched_tokens:
            return None
        seqs, source = [], []
        for seq in running:
            i = in_current.get(id(seq))
            if i is None or not overlappable(seq):
                return None                 # it did not decode in `current`: the ordinary step plans it
            if len(seq.output_token_ids) + 1 >= seq.request.params.max_tokens or seq.num_tokens + 1 >= core.max_context:
                continue                    # `current` gives its last token
            seqs.append(seq)
            source.append(i)
        if not seqs:
            return None
        for seq in seqs:                    # the token `current` samples goes to position num_tokens
            if not core.kv.allocate(seq.blocks, seq.num_tokens, 1):
                return None                 # short of blocks: the ordinary step preempts
        ahead = core.batch.gather_ahead(seqs)
        if ahead is None:
            return None
        positions, tables, rows = ahead
        return seqs, np.zeros(len(seqs), dtype=np.int64), positions, tables, rows, np.array(source, dtype=np.int64)

    def _launch(self, seqs: list[Sequence], token_ids: np.ndarray, positions: np.ndarray, tables: np.ndarray,
                rows: np.ndarray, source: np.ndarray | None, previous: InFlightStep | None) -> InFlightStep:
        """Build the step's batch on the host and hand forward + sampling to the worker; with
        `previous`, its input tokens are `previous`'s samples at `source` (taken when it starts)."""
        core = self.core
        runner = core.runner
        # built on the host here; the worker moves it to the device, queued behind the step it runs
        host_batch = runner.build_decode_batch(token_ids, positions, tables, np.ones(len(seqs), dtype=bool),
                                               on_host=True)
        table = core.batch.sampling[torch.from_numpy(rows)]                          # [B, 4]
        sampling_rows = [s.sampling_row for s in seqs]                              # made at admission
        previous_future = previous.future if previous is not None else None

        def forward_and_sample() -> list[tuple[int, object, str | None]]:
            batch = host_batch.to(runner.device)
            if previous_future is not None:
                # a failed previous step fails this one too (its requests are failed with it)
                previous_ids = np.array([token for token, _, _ in previous_future.result()], dtype=np.int64)  # [B_prev]
                inputs = previous_ids[source]                                                  # [B]
                inputs[inputs == NO_TOKEN] = 0      # a row that sampled nothing is failed; its result is dropped
                batch.token_ids = torch.from_numpy(inputs).to(runner.device, non_blocking=True)
            logits = runner.execute_batch(batch)                                      # [B, V]
            return core.sample_rows(logits, sampling_rows, table, plain=True)

        self.num_launched += 1
        return InFlightStep(seqs, self.worker.submit(forward_and_sample))

    def _update(self, step: InFlightStep, sampled: list[tuple[int, object, str | None]]) -> None:
        """Give a finished step's tokens to its requests; those that ended meanwhile drop theirs."""
        core = self.core
        core.observer.on_step(len(step.seqs))
        now = time.monotonic()
        with core.lock:
            for seq, (token, logprob, error) in zip(step.seqs, sampled):
                if seq.status is not SequenceStatus.RUNNING or core.requests.get(seq.request_id) is not seq:
                    continue                # ended (or was preempted) after this step was launched
                seq.num_computed_tokens = seq.num_tokens
                core.scheduler.register_full_blocks(seq)
                if error is None:
                    core.append_token(seq, token, logprob, now)      # the ordinary step's one-token path
                else:
                    core.append_tokens(seq, [], [logprob], error, now)

    @staticmethod
    def _wait_quietly(step: InFlightStep) -> None:
        try:
            step.future.result()
        except Exception:  # noqa: BLE001 - its requests are failed by the caller
            pass
