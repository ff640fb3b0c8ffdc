"""Prometheus metrics. `Metrics` is the engine's observer (called on the engine thread) and owns
gauges read from the engine at scrape time. Names are snake_case with units as suffixes; every
series carries a `model_name` label (vLLM's convention), set when the engine is bound ("" while the
model loads). No `*_created` series are exported."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from server.engine.results import FinishedRequestStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKENS_PER_STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
MODEL = ("model_name",)

disable_created_metrics()


class Metrics:
    def __init__(self, prefix: str = "customllm"):
        self.registry = CollectorRegistry()
        self.model_name = ""
        r, p = self.registry, prefix

        def gauge(name, text):
            return Gauge(f"{p}_{name}", text, MODEL, registry=r)

        def counter(name, text, labels=()):
            return Counter(f"{p}_{name}", text, MODEL + tuple(labels), registry=r)

        def histogram(name, text, buckets, labels=()):
            return Histogram(f"{p}_{name}", text, MODEL + tuple(labels), registry=r, buckets=buckets)

        self.requests_running = gauge("requests_running", "Requests in the running batch")
        self.requests_waiting = gauge("requests_waiting", "Requests waiting to be scheduled")
        self.kv_cache_usage = gauge("kv_cache_usage_ratio", "Fraction of KV-cache blocks in use")
        self.sessions_active = gauge("sessions_active", "Sessions holding a pinned cache")
        self.session_cached_tokens = gauge("session_cached_tokens", "Tokens pinned by sessions")
        self.engine_alive = gauge("engine_alive", "1 while the engine loop runs")
        self.prefix_queried = counter("prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache")
        self.prefix_hit = counter("prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests")
        self.finished = counter("requests_finished", "Finished requests", ["finish_reason"])
        self.rejected = counter("requests_rejected", "Requests refused before reaching the engine", ["reason"])
        self.http_responses = counter("http_responses", "HTTP responses by status code", ["code"])
        self.preemptions = counter("preemptions", "Requests preempted for lack of cache blocks")
        self.shared_steps = counter("shared_steps", "Steps divided across competing API keys (--fair-step-tokens)")
        self.session_evictions = counter("session_evictions", "Session pins dropped (TTL, caps, pressure)")
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token", LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens", LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish", LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduling", LATENCY_BUCKETS)
        self.tokens_per_step = histogram("tokens_per_step", "Tokens computed per engine step", TOKENS_PER_STEP_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt length of finished requests",
                                               LENGTH_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Generated length of finished requests", LENGTH_BUCKETS)
        # prompt-lookup speculation (--num-speculative-tokens), as vLLM's spec_decode counters
        self.spec_drafts = counter("spec_decode_num_drafts", "Requests' draft sequences verified")
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens verified")
        self.spec_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted")
        # cache tiers below the pool (--kv-disk-dir, --kv-host-gib); `tier` is host or disk
        self.tier_hits = counter("kv_tier_hit_blocks", "Cache blocks restored from a tier", ["tier"])
        self.tier_misses = counter("kv_tier_misses", "Pool misses whose next block no tier held")
        self.tier_read = counter("kv_tier_read_bytes", "Bytes of cache blocks read from disk", ["tier"])
        self.tier_written = counter("kv_tier_written_bytes", "Bytes of cache blocks and sessions written", ["tier"])
        self.tier_invalid = counter("kv_tier_invalid_files", "Tier files skipped as invalid", ["tier", "reason"])
        self.tier_write_errors = counter("kv_tier_write_errors", "Tier write failures (writing then stops)",
                                         ["tier"])
        self.tier_dropped = counter("kv_tier_dropped_writes", "Blocks not written: queue or tier full", ["tier"])
        self.tier_restore = histogram("kv_tier_restore_seconds", "Time to read a restored run of blocks",
                                      LATENCY_BUCKETS)
        self.tier_bytes_used = Gauge(f"{p}_kv_tier_used_bytes", "Bytes a tier holds", MODEL + ("tier",), registry=r)

    def bind_engine(self, engine) -> None:
        """Gauges read from the engine at scrape time, under the engine's model name."""
        self.model_name = engine.model_name
        name = self.model_name
        self.requests_running.labels(name).set_function(lambda: engine.num_running)
        self.requests_waiting.labels(name).set_function(lambda: engine.num_waiting)
        self.kv_cache_usage.labels(name).set_function(lambda: engine.kv_cache_usage)
        self.sessions_active.labels(name).set_function(lambda: engine.num_sessions)
        self.session_cached_tokens.labels(name).set_function(lambda: engine.session_cached_tokens)
        self.engine_alive.labels(name).set_function(lambda: 1.0 if engine.alive else 0.0)
        for tier in ("host", "disk"):
            self.tier_bytes_used.labels(name, tier).set_function(lambda tier=tier: engine.kv.tier_bytes_used(tier))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- HTTP layer -----------------------------------------------------------------------------
    def on_http_response(self, status: int) -> None:
        self.http_responses.labels(self.model_name, str(status)).inc()

    def on_rejected(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    # ---- EngineObserver -------------------------------------------------------------------------
    def on_step(self, num_scheduled_tokens: int, shared: bool = False) -> None:
        self.tokens_per_step.labels(self.model_name).observe(num_scheduled_tokens)
        if shared:
            self.shared_steps.labels(self.model_name).inc()

    def on_preemption(self) -> None:
        self.preemptions.labels(self.model_name).inc()

    def on_prefix_cache_query(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queried.labels(self.model_name).inc(queried_tokens)
        self.prefix_hit.labels(self.model_name).inc(hit_tokens)

    def on_request_finished(self, stats: FinishedRequestStats) -> None:
        name = self.model_name
        self.finished.labels(name, stats.finish_reason).inc()
        self.prompt_tokens.labels(name).inc(stats.prompt_tokens)
        self.generation_tokens.labels(name).inc(stats.generation_tokens)
        self.request_prompt_tokens.labels(name).observe(stats.prompt_tokens)
        self.request_generation_tokens.labels(name).observe(stats.generation_tokens)
        self.e2e.labels(name).observe(stats.e2e_latency)
        self.queue_time.labels(name).observe(stats.queue_time)
        if stats.time_to_first_token is not None:
            self.ttft.labels(name).observe(stats.time_to_first_token)
        itl = self.itl.labels(name)
        for gap in stats.inter_token_latencies:
            itl.observe(gap)

    def on_session_evicted(self) -> None:
        self.session_evictions.labels(self.model_name).inc()

    def on_spec_decode(self, num_drafts: int, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        name = self.model_name
        self.spec_drafts.labels(name).inc(num_drafts)
        self.spec_draft_tokens.labels(name).inc(num_draft_tokens)
        self.spec_accepted_tokens.labels(name).inc(num_accepted_tokens)

    def on_tier_event(self, tier: str, event: str, amount: float = 1.0, reason: str = "") -> None:
        """From the cache tiers' threads (model/cache/tiers.py, disk_tier.py)."""
        name = self.model_name
        if event == "hit_blocks":
            self.tier_hits.labels(name, tier).inc(amount)
        elif event == "misses":
            self.tier_misses.labels(name).inc(amount)
        elif event == "read_bytes":
            self.tier_read.labels(name, tier).inc(amount)
        elif event == "written_bytes":
            self.tier_written.labels(name, tier).inc(amount)
        elif event == "restore_seconds":
            self.tier_restore.labels(name).observe(amount)
        elif event == "invalid_files":
            self.tier_invalid.labels(name, tier, reason).inc(amount)
        elif event == "write_error":
            self.tier_write_errors.labels(name, tier).inc(amount)
        elif event == "dropped_writes":
            self.tier_dropped.labels(name, tier).inc(amount)
