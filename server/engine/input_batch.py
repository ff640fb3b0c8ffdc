"""The persistent batch: the step inputs of running requests kept in preallocated buffers.

Rebuilding a step's index tensors from Python lists costs a few microseconds per sequence (a tensor
per block table, per range of positions); with hundreds of sequences decoding, that is most of a
small model's step. So every running request that decodes gets a row of buffers that live as long
as it runs:

- `tokens[row]`, `positions[row]`: the token it computes next and its position, written when the
  token is sampled (all rows of a plain decode step at once, `advance_rows`), or, for a row new to
  the batch or one whose request moved on otherwise, when it is gathered;
- `block_tables[row]` (padded with -1) and `num_blocks[row]`: its block table, of which only the
  entries added since the last step are written (a new block every `block_size` tokens);
- `sampling[row]`: temperature, top-k, top-p and min-p, written once when the row joins.

A step in which every sequence computes one known token (decode, or the last token of a prompt;
with speculative decoding also its draft tokens, one entry each) gathers its rows (`gather`) and
hands the runner the arrays `PagedBatch.decode` takes; other steps (prefill chunks) are built from `SequenceChunk`s as before. A row is released when its request
finishes or is preempted (its blocks are then freed and later re-allocated, so a row that comes
back starts afresh); a row whose request's table was replaced is refilled. Models with a sliding
window (whose tables lose entries behind the window) always take the chunk path.

Only the engine thread touches it.
"""
from __future__ import annotations

import numpy as np
import torch

from server.engine.sampler import sampling_row
from server.engine.sequence import Sequence


class PersistentBatch:
    def __init__(self, max_rows: int, max_blocks_per_row: int, vocab_size: int):
        self.max_rows = max_rows
        self.vocab_size = vocab_size
        self.tokens = np.zeros(max_rows, dtype=np.int64)
        self.positions = np.full(max_rows, -1, dtype=np.int64)          # -1: nothing written yet
        self.block_tables = np.full((max_rows, max_blocks_per_row), -1, dtype=np.int64)
        self.num_blocks = [0] * max_rows                                 # entries written per row
        self.sampling = torch.zeros(max_rows, 4, dtype=torch.float32)
        self._tables_of: list[list[int] | None] = [None] * max_rows   # the block_ids list each row mirrors
        self._row_of: dict[int, int] = {}                                # id(seq) -> row
        self._seq_of: list[Sequence | None] = [None] * max_rows
        self._free = list(range(max_rows - 1, -1, -1))

    @property
    def num_rows(self) -> int:
        return len(self._row_of)

    def row_of(self, seq: Sequence) -> int | None:
        return self._row_of.get(id(seq))

    # ---- rows joining and leaving ---------------------------------------------------------------
    def _join(self, seq: Sequence) -> int | None:
        if not self._free:
            return None
        row = self._free.pop()
        self._row_of[id(seq)] = row
        self._seq_of[row] = seq
        self.sampling[row] = torch.tensor(sampling_row(seq.request.params, self.vocab_size))
        self._fill_table(row, seq.blocks.block_ids)
        return row

    def _fill_table(self, row: int, block_ids: list[int]) -> None:
        n = len(block_ids)
        if n > self.block_tables.shape[1]:
            grown = np.full((self.max_rows, max(n, 2 * self.block_tables.shape[1])), -1, dtype=np.int64)
            grown[:, :self.block_tables.shape[1]] = self.block_tables
            self.block_tables = grown
        self.block_tables[row, :n] = block_ids
        self.block_tables[row, n:] = -1
        self.num_blocks[row] = n
        self._tables_of[row] = block_ids

    def release(self, seq: Sequence) -> None:
        """The request finished or was preempted: its row is free again."""
        row = self._row_of.get(id(seq))
        if row is None or self._seq_of[row] is not seq:
            return
        del self._row_of[id(seq)]
        self._clear(row)

    def _clear(self, row: int) -> None:
        self._seq_of[row] = None
        self._tables_of[row] = None
        self.positions[row] = -1
        self.num_blocks[row] = 0
        self.block_tables[row] = -1
        self._free.append(row)

    # ---- the step -------------------------------------------------------------------------------
    def _sync(self, seq: Sequence, start: int, token_known: bool = True) -> int | None:
        """The row of `seq`, up to date for computing position `start` (its token too, when known)."""
        row = self._sync_table(seq)
        if row is None:
            return None
        if not token_known:
            self.positions[row] = start
        elif self.positions[row] != start:
            self._write_token(row, seq, start)
        return row

    def _sync_table(self, seq: Sequence) -> int | None:
        """The row of `seq` (joining now if it has none) with its block table up to date."""
        row = self._row_of.get(id(seq))
        if row is not None and self._seq_of[row] is not seq:      # a stale entry: start afresh
            del self._row_of[id(seq)]
            self._clear(row)
            row = None
        if row is None:
            return self._join(seq)
        block_ids = seq.blocks.block_ids
        if block_ids is not self._tables_of[row]:
            self._fill_table(row, block_ids)
        else:
            have, n = self.num_blocks[row], len(block_ids)
            if n != have:
                if n < have or n > self.block_tables.shape[1]:
                    self._fill_table(row, block_ids)
                else:
                    self.block_tables[row, have:n] = block_ids[have:n]
                    self.num_blocks[row] = n
        return row

    def _write_token(self, row: int, seq: Sequence, start: int) -> None:
        prompt = seq.request.prompt_token_ids
        self.tokens[row] = prompt[start] if start < len(prompt) else seq.output_token_ids[start - len(prompt)]
        self.positions[row] = start

    def gather(self, chunks) -> tuple[np.ndarray, ...] | None:
        """For scheduled chunks (`.seq`, `.start`, `.draft_token_ids`) of one known token each:
        (token_ids [T], positions [T], block tables [T, MB], rows [B]) as new int64 arrays, or None
        when the rows ran out. Without drafts T = B. A chunk with k drafts (speculative decoding)
        takes 1 + k entries: its known token and the drafts at the positions after it, each entry
        with the row's block table, so the step stays one query per entry (each entry sees the
        cache up to its own position, its predecessors' rows written in the same layer first)."""
        rows, starts, width = [], [], 0
        row_of, seq_of, tables_of, num_blocks = self._row_of, self._seq_of, self._tables_of, self.num_blocks
        for chunk in chunks:
            seq = chunk.seq
            row = row_of.get(id(seq))
            block_ids = seq.blocks.block_ids
            # the common case (a row that mirrors its request's table already) without a call
            if row is None or seq_of[row] is not seq or block_ids is not tables_of[row] \
                    or len(block_ids) != num_blocks[row]:
                row = self._sync_table(seq)
                if row is None:
                    return None
            rows.append(row)
            starts.append(chunk.start)
            if num_blocks[row] > width:
                width = num_blocks[row]
        index = np.array(rows, dtype=np.int64)
        # rows whose next token `advance` did not write (new to the batch, or moved on otherwise)
        for i in np.flatnonzero(self.positions[index] != np.array(starts, dtype=np.int64)).tolist():
            self._write_token(rows[i], chunks[i].seq, starts[i])
        if not any(chunk.draft_token_ids for chunk in chunks):
            return self.tokens[index], self.positions[index], self.block_tables[index, :width], index
        counts = np.array([1 + len(chunk.draft_token_ids) for chunk in chunks], dtype=np.int64)  # [B]
        firsts = np.cumsum(counts) - counts                                                       # [B]
        entries = np.repeat(index, counts)                                                        # [T]
        token_ids = self.tokens[entries]
        for chunk, first in zip(chunks, firsts.tolist()):
            if chunk.draft_token_ids:
                token_ids[first + 1:first + 1 + len(chunk.draft_token_ids)] = chunk.draft_token_ids
        positions = self.positions[entries] + (np.arange(len(entries)) - np.repeat(firsts, counts))
        return token_ids, positions, self.block_tables[entries, :width], index

    def gather_ahead(self, seqs: list[Sequence]) -> tuple[np.ndarray, ...] | None:
        """For a step planned before the tokens it computes are sampled (server/engine/overlap.py):
        each request computes position `num_tokens` (the token being sampled now). (positions [B],
        block tables [B, MB], rows [B]) as new arrays, or None when the rows ran out; the rows'
        `tokens` are left as they are (the caller supplies the step's token ids)."""
        rows = []
        for seq in seqs:
            row = self._sync(seq, seq.num_tokens, token_known=False)
            if row is None:
                return None
            rows.append(row)
        index = np.array(rows, dtype=np.int64)
        width = max(self.num_blocks[row] for row in rows)
        return self.positions[index], self.block_tables[index, :width], index

    def advance(self, seq: Sequence, token: int) -> None:
        """Tokens were appended to `seq`, `token` the last (its position is the request's last): it
        is computed next."""
        row = self._row_of.get(id(seq))
        if row is not None:
            self.tokens[row] = token
            self.positions[row] = seq.num_tokens - 1

    def advance_rows(self, rows: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> None:
        """`advance` of many rows at once: row `rows[i]` computes `tokens[i]` at `positions[i]` next
        (each request's new last token and position)."""
        self.tokens[rows] = tokens
        self.positions[rows] = positions
