"""The waiting queue, served fairly across tenants.

Tenants take turns. A tenant whose queue was empty joins the turn order ahead of the tenants that
have already been served and still wait (behind other newcomers), and a tenant that was served goes
to the back. So a tenant with a thousand queued requests and one with a single request alternate,
and a tenant that sends one request at a time is served next every time: one tenant's flood delays
another by at most one request. Within a tenant, lower `priority` comes first (vLLM's convention),
then arrival order.

A preempted request goes back ahead of its tenant's requests of the same priority, and its tenant
to the very front of the turn order, so it resumes next, as it did in the plain FIFO queue this
replaces; a request that yielded its slot to another tenant (the scheduler's fair share) keeps its
tenant's place in the turn order instead.
"""
from __future__ import annotations

import bisect
import itertools
from collections import deque
from typing import Iterator

from server.engine.sequence import Sequence

Key = tuple[int, int]   # (priority, arrival order)


class WaitingQueue:
    def __init__(self):
        self._queues: dict[str, list[tuple[Key, Sequence]]] = {}   # tenant → its requests, sorted by key
        self._fresh: deque[str] = deque()        # tenants not served since their queue was empty
        self._served: deque[str] = deque()       # tenants served, still waiting, least recently served first
        self._order = itertools.count()
        self._keys: dict[int, Key] = {}          # id(seq) → its key

    def __len__(self) -> int:
        return len(self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __contains__(self, seq: Sequence) -> bool:
        return id(seq) in self._keys

    def __iter__(self) -> Iterator[Sequence]:
        """Every waiting request, in the order the scheduler would take them if all fit."""
        queues = {tenant: [seq for _, seq in queue] for tenant, queue in self._queues.items()}
        fresh, served = deque(self._fresh), deque(self._served)
        while fresh or served:
            tenant = fresh.popleft() if fresh else served.popleft()
            yield queues[tenant].pop(0)
            if queues[tenant]:
                served.append(tenant)

    def count(self, tenant: str) -> int:
        return len(self._queues.get(tenant, ()))

    def append(self, seq: Sequence) -> None:
        """A new request: behind its tenant's requests of the same or a lower priority value."""
        self._insert(seq, (seq.request.priority, next(self._order)))
        if len(self._queues[seq.request.tenant]) == 1:
            self._fresh.append(seq.request.tenant)

    def appendleft(self, seq: Sequence, resume_next: bool = True) -> None:
        """A preempted request: first of its tenant's of its priority, and its tenant's turn comes next
        (`resume_next`), or, for a request that yielded its slot to another tenant, where its tenant's
        turn already was (the back of the order if it had nothing else waiting)."""
        tenant = seq.request.tenant
        first = min((key[1] for key, _ in self._queues.get(tenant, ())), default=0)
        had_turn = tenant in self._queues
        self._insert(seq, (seq.request.priority, first - 1))
        if resume_next:
            self._leave_turns(tenant)
            self._fresh.appendleft(tenant)
        elif not had_turn:
            self._served.append(tenant)

    def tenants(self) -> list[str]:
        """The tenants with requests waiting, in turn order."""
        return list(self._fresh) + list(self._served)

    def peek(self) -> Sequence | None:
        """The request the scheduler should try next."""
        tenant = self._next_tenant()
        return None if tenant is None else self._queues[tenant][0][1]

    def pop_head(self) -> Sequence:
        """Take `peek()`'s request; its tenant goes to the back of the turn order."""
        tenant = self._next_tenant()
        assert tenant is not None, "the waiting queue is empty"
        (self._fresh if self._fresh else self._served).popleft()
        _, seq = self._queues[tenant].pop(0)
        del self._keys[id(seq)]
        if self._queues[tenant]:
            self._served.append(tenant)
        else:
            del self._queues[tenant]
        return seq

    def remove(self, seq: Sequence) -> None:
        tenant = seq.request.tenant
        key = self._keys.pop(id(seq))
        queue = self._queues[tenant]
        queue.pop(bisect.bisect_left(queue, key, key=lambda item: item[0]))
        if not queue:
            del self._queues[tenant]
            self._leave_turns(tenant)

    def _next_tenant(self) -> str | None:
        if self._fresh:
            return self._fresh[0]
        return self._served[0] if self._served else None

    def _insert(self, seq: Sequence, key: Key) -> None:
        self._keys[id(seq)] = key
        bisect.insort(self._queues.setdefault(seq.request.tenant, []), (key, seq), key=lambda item: item[0])

    def _leave_turns(self, tenant: str) -> None:
        for turns in (self._fresh, self._served):
            if tenant in turns:
                turns.remove(tenant)
