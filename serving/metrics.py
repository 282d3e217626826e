"""The engine's counters, gauges and histograms, exported in Prometheus' text format at /metrics."""

from __future__ import annotations

import collections

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


class EngineMetrics:
    def __init__(self, max_num_seqs: int, max_model_len: int):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("glmops_requests_running", "requests holding a KV-cache slot", registry=r)
        self.waiting = Gauge("glmops_requests_waiting", "requests queued for a slot", registry=r)
        self.finished = Counter("glmops_requests_finished", "requests that ran to a stop or their length",
                                registry=r)
        self.cancelled = Counter("glmops_requests_cancelled", "requests whose client went away", registry=r)
        self.rejected = Counter("glmops_requests_rejected", "requests refused because the queue was full (429)",
                                registry=r)
        self.generated = Counter("glmops_generated_tokens", "tokens generated", registry=r)
        self.prefilled = Counter("glmops_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.ttft = Histogram("glmops_time_to_first_token_seconds", "from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("glmops_time_per_output_token_seconds", "between two tokens of one stream",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.kv_used = Gauge("glmops_kv_cache_used_tokens", "tokens held in the KV cache", registry=r)
        capacity = Gauge("glmops_kv_cache_capacity_tokens", "tokens the KV cache can hold", registry=r)
        capacity.set(max_num_seqs * max_model_len)
        self.adapter_loads = Counter("glmops_adapter_loads", "adapters copied into a slot of the adapter pool",
                                     registry=r)
        self.adapter_load_time = Histogram("glmops_adapter_load_seconds", "reading an adapter and copying it into "
                                           "a slot", buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_hits = Counter("glmops_adapter_hits", "requests whose adapter was in a slot already",
                                    registry=r)
        self.adapter_evictions = Counter("glmops_adapter_evictions", "adapters evicted to free a slot", registry=r)
        self.prefix_lookups = Counter("glmops_prefix_cache_lookups", "admitted requests looked up in the prefix "
                                      "cache (KV kept from finished requests)", registry=r)
        self.prefix_hits = Counter("glmops_prefix_cache_hits", "admitted requests that started from a kept prefix",
                                   registry=r)
        self.prefix_tokens_saved = Counter("glmops_prefix_cache_tokens_saved", "prompt tokens not prefilled because "
                                           "their KV was kept", registry=r)
        self.prefix_evictions = Counter("glmops_prefix_cache_evictions", "kept prefixes overwritten for a request "
                                        "that needed their slot", registry=r)
        self._steps: collections.deque[float] = collections.deque(maxlen=64)

    def step(self, seconds: float, decoded: int, prefilled: int) -> None:
        if decoded:
            self._steps.append(seconds)
        self.prefilled.inc(prefilled)

    def adapter(self, what: str, seconds: float | None = None) -> None:
        """The adapter pool's events: loads (with their time), hits, evictions."""
        if what == "loads":
            self.adapter_loads.inc()
            self.adapter_load_time.observe(seconds or 0.0)
        elif what == "hits":
            self.adapter_hits.inc()
        elif what == "evictions":
            self.adapter_evictions.inc()

    def recent_step_seconds(self) -> float | None:
        return sum(self._steps) / len(self._steps) if self._steps else None

    def text(self) -> str:
        return generate_latest(self.registry).decode()
