"""One flat batch of tokens from many sequences: the index tensors every layer shares in one step.

The runner describes a step as a list of `SequenceChunk`s: each sequence contributes the tokens it
computes this step (a prefill chunk that may start after a cached prefix, or one decode token).
`PagedBatch.build` turns that into index tensors shared by every layer:

- `slot_mapping` [T]: the flat cache slot each new token's row is written to;
- `context_slots` [B, K]: the flat slots of each sequence's context, new tokens included (its whole
  context, or with a sliding window only the part the window reaches: key k at key_start[b] + k);
- `query_index` [B, Q] / `query_valid` [B, Q]: where each sequence's new tokens sit in the flat batch;
- `attn_mask` [B, Q, K]: causal (and sliding-window) visibility, True = may attend.

A cache layer is one tensor of rows, `[num_slots, row_width]` with `slot = block * block_size + offset`.
Each layer writes its new rows first, then gathers the context (model/layers/attention.py), so one
code path serves prefill chunks, prefix-cache hits and decode alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SequenceChunk:
    """The tokens one sequence computes in this step.

    `block_table` lists the cache blocks of positions 0.. (start_pos + len(token_ids) - 1); entries of
    blocks released by a sliding window may be -1 (never read: the mask hides them).
    """

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    needs_logits: bool = True

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


def _prompts_from_position_0(starts: torch.Tensor, lens: torch.Tensor, flat_starts: torch.Tensor,
                             window: int | None, max_q: int) -> tuple[torch.Tensor | None, int]:
    """(prompt_starts, leading_decodes) of a step with chunks starting at `starts` [B] of `lens` [B]
    tokens: every chunk a prompt from position 0 → (row bounds [B + 1], 0); D leading one-token
    chunks, then only prompts from position 0 → (their row bounds counted from row D [B - D + 1], D);
    else (None, 0). Never with a window, nor in a decode-only step."""
    if window is not None or max_q == 1:
        return None, 0
    if not starts.any():
        return torch.cat([flat_starts, lens.sum().view(1)]), 0
    decodes = int(torch.cumprod(lens == 1, 0).sum())                    # the leading one-token chunks
    if decodes == 0 or starts[decodes:].any():
        return None, 0
    prompt_rows = flat_starts[decodes:] - decodes                       # [B - D]
    return torch.cat([prompt_rows, (lens.sum() - decodes).view(1)]), decodes


@dataclass
class PagedBatch:
    token_ids: torch.Tensor      # [T] int64
    positions: torch.Tensor      # [T] int64, absolute
    slot_mapping: torch.Tensor   # [T] int64
    # the gather path's fields; None in a batch built with_gather=False (decode kernels read the
    # block tables instead)
    query_index: torch.Tensor | None    # [B, Q] int64 into the flat batch (pads point at 0)
    query_valid: torch.Tensor | None    # [B, Q] bool
    context_slots: torch.Tensor | None  # [B, K] int64 (pads point at slot 0)
    attn_mask: torch.Tensor | None      # [B, Q, K] bool, True = may attend
    logits_index: torch.Tensor   # [N] int64: flat tokens whose logits are returned
    is_decode_only: bool         # every sequence contributes exactly one token
    block_tables: torch.Tensor   # [B, MB] int64 block ids (-1: none or released), for kernels
    context_lens: torch.Tensor   # [B] int64: positions 0 .. len-1 known after this step
    block_size: int
    window: int | None           # a query at p sees keys p-W .. p (None: the whole past)
    max_position: int            # the largest position in the batch, known on the host
    # one sequence's first chunk with no window: attn_mask is plain causal (Q = K), so fused attention
    # may take is_causal instead (no mask read, the tiles above the diagonal skipped)
    plain_causal: bool = False
    # every chunk a prompt from position 0 with no window: each attends to its own tokens only, rows
    # prompt_starts[b] .. prompt_starts[b + 1] - 1 of the step ([B + 1] int64); else None. With
    # leading_decodes D > 0 (a continuous-batching step: running sequences' one-token decodes, then
    # new prompts) the first D chunks are single tokens, each reading its context from the cache, and
    # prompt_starts covers the rows after them, counted from row D.
    prompt_starts: torch.Tensor | None = None
    leading_decodes: int = 0

    def to(self, device: torch.device | str) -> "PagedBatch":
        """This batch with its tensors on `device` (the same object when they are there already): a
        batch built on the host by one thread, moved by the thread that runs it."""
        if self.token_ids.device == torch.device(device):
            return self
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=True)
                                            for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    @staticmethod
    def build(chunks: list[SequenceChunk], block_size: int, device: torch.device | str = "cpu",
              window: int | None = None, with_gather: bool = True) -> "PagedBatch":
        """`window` W: a query at position p sees keys p-W .. p (None: the whole causal past).
        `with_gather=False` leaves out the gather path's index tensors and mask, for a step whose
        attention runs in kernels that read the block tables (decode kernels, CUDA graphs)."""
        assert chunks, "a step needs at least one sequence"
        lengths = [len(c.token_ids) for c in chunks]
        assert all(n > 0 for n in lengths), "every chunk computes at least one token"
        max_blocks = max(len(c.block_table) for c in chunks)
        for c in chunks:
            assert len(c.block_table) * block_size >= c.context_len, "block table too short"
        token_ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long)
        tables = torch.full((len(chunks), max_blocks), -1, dtype=torch.long)
        for i, c in enumerate(chunks):
            tables[i, : len(c.block_table)] = torch.tensor(c.block_table, dtype=torch.long)
        starts = torch.tensor([c.start_pos for c in chunks])                        # [B]
        lens = torch.tensor(lengths)                                                # [B]
        needs = torch.tensor([c.needs_logits for c in chunks])
        return PagedBatch.from_host_tensors(token_ids, starts, lens, tables, needs, block_size, device,
                                            window=window, with_gather=with_gather)

    @staticmethod
    def from_host_tensors(token_ids: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, tables: torch.Tensor,
                          needs: torch.Tensor, block_size: int, device: torch.device | str = "cpu",
                          window: int | None = None, with_gather: bool = True) -> "PagedBatch":
        """`build` from its inputs as CPU tensors: token_ids [T] (the chunks' tokens one after the
        other), starts [B] (each chunk's first position), lens [B] (its token count, at least 1),
        tables [B, MB] (block tables padded with -1, covering each chunk's last position), needs [B]
        bool (whether it returns logits)."""
        num_seqs, max_blocks = tables.shape
        max_q = int(lens.max())
        flat_starts = torch.cumsum(lens, 0) - lens                                  # [B]
        if max_q == 1:
            seq_of_token = torch.arange(num_seqs)                                   # [T]
            positions = starts.clone()
        else:
            seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), lens)    # [T]
            positions = starts[seq_of_token] + torch.arange(len(token_ids)) - flat_starts[seq_of_token]
        slot_mapping = (tables[seq_of_token, positions // block_size] * block_size
                        + positions % block_size)                                   # [T]
        assert bool((slot_mapping >= 0).all()), "a new token has no cache block"

        ends = starts + lens                                                        # [B]
        logits_index = (flat_starts + lens - 1)[needs]
        put = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        prompt_starts, leading_decodes = _prompts_from_position_0(starts, lens, flat_starts, window, max_q)
        kernel_fields = dict(is_decode_only=max_q == 1, block_tables=put(tables), context_lens=put(ends),
                             block_size=block_size, window=window, max_position=int(ends.max()) - 1,
                             prompt_starts=None if prompt_starts is None else put(prompt_starts),
                             leading_decodes=leading_decodes)
        if not with_gather:
            return PagedBatch(put(token_ids), put(positions), put(slot_mapping), None, None, None, None,
                              put(logits_index), **kernel_fields)

        q_offsets = torch.arange(max_q)                                             # [Q]
        query_valid = q_offsets[None, :] < lens[:, None]                            # [B, Q]
        query_index = torch.where(query_valid, flat_starts[:, None] + q_offsets, 0)
        query_pos = torch.where(query_valid, starts[:, None] + q_offsets, 0)        # [B, Q]

        # Keys: sequence b's key k sits at position key_start[b] + k. Without a window key_start is 0
        # (K = the longest context); with window W it is the first query's p - W, so K spans about
        # W + the longest chunk however long the contexts grow.
        if window is None:
            key_start = torch.zeros(num_seqs, dtype=torch.long)                     # [B]
        else:
            key_start = (starts - window).clamp_min(0)                              # [B]
        num_keys = int((ends - key_start).max())
        key_pos = key_start[:, None] + torch.arange(num_keys)                       # [B, K]
        key_blocks = tables.gather(1, (key_pos // block_size).clamp_max(max_blocks - 1))  # [B, K]
        context_slots = (key_blocks * block_size + key_pos % block_size).clamp_min(0)
        mask = key_pos[:, None, :] <= query_pos[:, :, None]                         # [B, Q, K]
        if window is not None:
            mask &= key_pos[:, None, :] >= query_pos[:, :, None] - window
        mask &= (key_blocks >= 0)[:, None, :]
        mask[:, :, 0] |= ~query_valid                                               # pads see key 0

        return PagedBatch(put(token_ids), put(positions), put(slot_mapping), put(query_index),
                          put(query_valid), put(context_slots), put(mask), put(logits_index), **kernel_fields,
                          plain_causal=num_seqs == 1 and int(starts[0]) == 0 and window is None)

    @staticmethod
    def decode(token_ids: np.ndarray, positions: np.ndarray, tables: np.ndarray, needs: np.ndarray,
               block_size: int, device: torch.device | str = "cpu", window: int | None = None,
               with_gather: bool = True) -> "PagedBatch":
        """`build` of a step in which every sequence computes one token, from host arrays (int64
        token_ids [B], positions [B], tables [B, MB] padded with -1; bool needs [B]), computed with
        numpy: the same tensors `build` gives, for a fraction of its per-step cost. The persistent
        batch (server/engine/input_batch.py) keeps these arrays."""
        num_seqs, max_blocks = tables.shape
        rows = np.arange(num_seqs)
        slot_mapping = tables[rows, positions // block_size] * block_size + positions % block_size
        assert (slot_mapping >= 0).all(), "a new token has no cache block"
        ends = positions + 1
        if torch.device(device).type == "cpu":      # the arrays' own memory (`.to` would return the same tensor)
            put = torch.from_numpy
        else:
            put = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
        kernel_fields = dict(is_decode_only=True, block_tables=put(tables), context_lens=put(ends),
                             block_size=block_size, window=window, max_position=int(positions.max()))
        head = (put(token_ids), put(positions), put(slot_mapping))
        logits_index = put(rows[needs])
        if not with_gather:
            return PagedBatch(*head, None, None, None, None, logits_index, **kernel_fields)
        query_index = rows[:, None].copy()                                           # [B, 1]
        query_valid = np.ones((num_seqs, 1), dtype=bool)
        key_start = np.zeros(num_seqs, dtype=np.int64) if window is None else np.maximum(positions - window, 0)
        num_keys = int((ends - key_start).max())
        key_pos = key_start[:, None] + np.arange(num_keys)                            # [B, K]
        key_blocks = np.take_along_axis(tables, np.minimum(key_pos // block_size, max_blocks - 1), 1)
        context_slots = np.maximum(key_blocks * block_size + key_pos % block_size, 0)
        mask = key_pos <= positions[:, None]                                          # [B, K]
        if window is not None:
            mask &= key_pos >= (positions - window)[:, None]
        mask &= key_blocks >= 0
        return PagedBatch(*head, put(query_index), put(query_valid), put(context_slots), put(np.ascontiguousarray(mask[:, None, :])),
                          logits_index, **kernel_fields, plain_causal=num_seqs == 1 and int(positions[0]) == 0
                          and window is None)

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

