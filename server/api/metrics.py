"""Prometheus metrics. `Metrics` is the engine's observer (called on the engine thread) and owns
gauges read from the engine at scrape time. Names are snake_case with units as suffixes."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.engine.outputs import FinishedRequestStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKENS_PER_STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    def __init__(self, prefix: str = "customllm"):
        self.registry = CollectorRegistry()
        r, p = self.registry, prefix
        self.requests_running = Gauge(f"{p}_requests_running", "Requests in the running batch", registry=r)
        self.requests_waiting = Gauge(f"{p}_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_cache_usage = Gauge(f"{p}_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=r)
        self.sessions_active = Gauge(f"{p}_sessions_active", "Sessions holding a pinned cache", registry=r)
        self.session_cached_tokens = Gauge(f"{p}_session_cached_tokens", "Tokens pinned by sessions", registry=r)
        self.engine_alive = Gauge(f"{p}_engine_alive", "1 while the engine loop runs", registry=r)
        self.prefix_queried = Counter(f"{p}_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hit = Counter(f"{p}_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache", registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Generated tokens of finished requests", registry=r)
        self.finished = Counter(f"{p}_requests_finished", "Finished requests", ["finish_reason"], registry=r)
        self.rejected = Counter(f"{p}_requests_rejected", "Requests refused before reaching the engine", ["reason"],
                                registry=r)
        self.http_responses = Counter(f"{p}_http_responses", "HTTP responses by status code", ["code"], registry=r)
        self.preemptions = Counter(f"{p}_preemptions", "Requests preempted for lack of cache blocks", registry=r)
        self.session_evictions = Counter(f"{p}_session_evictions", "Session pins dropped (TTL, caps, pressure)",
                                         registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram(f"{p}_inter_token_latency_seconds", "Time between consecutive tokens", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.e2e = Histogram(f"{p}_e2e_request_latency_seconds", "Arrival to finish", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.queue_time = Histogram(f"{p}_request_queue_time_seconds", "Arrival to first scheduling", registry=r,
                                    buckets=LATENCY_BUCKETS)
        self.tokens_per_step = Histogram(f"{p}_tokens_per_step", "Tokens computed per engine step", registry=r,
                                         buckets=TOKENS_PER_STEP_BUCKETS)

    def bind_engine(self, engine) -> None:
        """Gauges read from the engine at scrape time."""
        self.requests_running.set_function(lambda: engine.num_running)
        self.requests_waiting.set_function(lambda: engine.num_waiting)
        self.kv_cache_usage.set_function(lambda: engine.kv_cache_usage)
        self.sessions_active.set_function(lambda: engine.num_sessions)
        self.session_cached_tokens.set_function(lambda: engine.session_cached_tokens)
        self.engine_alive.set_function(lambda: 1.0 if engine.alive else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- EngineObserver -------------------------------------------------------------------------
    def on_step(self, num_scheduled_tokens: int) -> None:
        self.tokens_per_step.observe(num_scheduled_tokens)

    def on_preemption(self) -> None:
        self.preemptions.inc()

    def on_prefix_cache_query(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queried.inc(queried_tokens)
        self.prefix_hit.inc(hit_tokens)

    def on_request_finished(self, stats: FinishedRequestStats) -> None:
        self.finished.labels(stats.finish_reason).inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.generation_tokens)
        self.e2e.observe(stats.e2e_latency)
        self.queue_time.observe(stats.queue_time)
        if stats.time_to_first_token is not None:
            self.ttft.observe(stats.time_to_first_token)
        for gap in stats.inter_token_latencies:
            self.itl.observe(gap)

    def on_session_evicted(self) -> None:
        self.session_evictions.inc()
