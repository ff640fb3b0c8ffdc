"""Shared steps: how one step's tokens are divided while tenants compete.

Where a step's cost grows with its rows (a CPU: on this project's 2-core machine a decode step of the
built-in model costs 15 ms at 1 row, 21 ms at 4, 39 ms at 8, 51 ms at 16), a tenant with one stream
beside another tenant's flood of 64 decodes each of its tokens in a 64-row step: ten times slower than
alone, however fairly slots and the waiting queue are shared. So while requests of two or more tenants
are in the engine, a step computes at most

    cap = max(fair_step_tokens, number of tenants × the lightest tenant's requests)

tokens, divided equally across the tenants (a tenant's part goes to its requests that advanced least
recently, so all of a flood's requests take turns); what a tenant leaves unused goes first to waiting
requests (admission), then to any running request. A tenant whose last request ended less than
LINGER_S ago still counts (with no requests, so the cap is `fair_step_tokens`): its next request then
finds short steps instead of one of the flood's full ones in flight. While the lightest tenants'
requests are all computing their prompts, the cap is PREFILL_BOOST times larger. Tenants with
balanced loads (`cap` at or above the step's ordinary token budget) share the step as before: the cap
only bites when one tenant is light, and then it trades the heavy tenant's throughput for the light
one's latency. Off (0) on CUDA, where
a step of 64 rows costs about what a step of one does.

Plain Python over counts and lists, no tensors; the scheduler (server/engine/scheduler.py) calls it.
"""
from __future__ import annotations

from collections import Counter

from server.engine.sequence import Sequence


# A tenant whose last request just ended still competes this long: the next request of a conversation or
# an agent's loop usually follows at once, and it would otherwise wait for a whole step of the others'
# full batch (hundreds of milliseconds on a CPU) before its first token.
LINGER_S = 1.0


def shared_step_cap(tenant_requests: Counter, fair_step_tokens: int, num_lingering: int = 0) -> int | None:
    """The token cap of a step while tenants compete, or None when steps are not shared (the policy
    off, or fewer than two tenants with requests or lingering). `tenant_requests`: tenant → its
    requests in the engine (running or waiting), no zero counts; `num_lingering`: tenants without
    requests that still compete (LINGER_S), as if with none."""
    num_tenants = len(tenant_requests) + num_lingering
    if fair_step_tokens <= 0 or num_tenants < 2:
        return None
    lightest = 0 if num_lingering else min(tenant_requests.values())
    return max(fair_step_tokens, num_tenants * lightest)


# While the lightest tenants' requests are all in their prompts (none decoding), the cap protects no
# one's time per token: it is this many times larger, so a light tenant's prompt takes a step or two
# instead of one of every cap's worth of tokens (its time to first token beside a flood).
PREFILL_BOOST = 4


def lightest_tenants_prefill_only(tenant_requests: Counter, groups: dict[str, list[Sequence]],
                                  waiting_count) -> bool:
    """Whether the tenants with the fewest requests have a prompt to compute and no request decoding
    (`groups`: running requests by tenant; `waiting_count(tenant)`: its waiting requests)."""
    fewest = min(tenant_requests.values())
    prefilling = False
    for tenant, count in tenant_requests.items():
        if count != fewest:
            continue
        for seq in groups.get(tenant, ()):
            if seq.num_tokens - seq.num_computed_tokens == 1:
                return False                # decoding: its time per token is what the cap protects
            prefilling = True
        prefilling = prefilling or waiting_count(tenant) > 0
    return prefilling


def tenant_parts(tenants: list[str], cap: int, turn: int) -> list[tuple[str, int]]:
    """`cap` tokens divided equally across `tenants` (in the order given), starting at `turn` (so the
    remainder of the division rotates): [(tenant, its tokens)] in serving order."""
    n = len(tenants)
    start = turn % n
    order = tenants[start:] + tenants[:start]
    share, extra = divmod(cap, n)
    return [(tenant, share + (1 if i < extra else 0)) for i, tenant in enumerate(order)]


def requests_by_tenant(running: list[Sequence]) -> dict[str, list[Sequence]]:
    """The running requests of each tenant, least recently advanced by a shared step first (those
    never advanced by one oldest first)."""
    groups: dict[str, list[Sequence]] = {}
    for seq in running:
        groups.setdefault(seq.request.tenant, []).append(seq)
    for seqs in groups.values():
        seqs.sort(key=lambda s: s.last_shared_turn)         # stable: running order among equals
    return groups
