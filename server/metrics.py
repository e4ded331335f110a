"""Prometheus collectors for one server (a dedicated CollectorRegistry, so tests can run several servers).

Label cardinality is bounded: `tenant` comes from the tenants file (a fixed set); `adapter` keeps its
own value for the first `max_adapter_labels` adapter names seen *per tenant* (so one tenant's many
names never push another tenant's adapters into "other") and is "other" after that; the base model is
"base". A series of tenant t names an adapter only when t owns it or it is shared: another tenant's
private adapter (an admin using `alice/secret`) is "other". /metrics binds loopback unless the operator
passes --metrics-host. Engine gauges (running/waiting sequences, batch, KV, resident adapters) are read from
`Engine.stats()` at scrape time, and so are the per-tenant fairness counters (the scheduler's
`WaitingQueue.snapshot()`: VTC counter, service, tokens in/out, waiting sequences), and the prefix cache's
(cached blocks, evictions, per tenant prompt tokens computed vs served from the cache).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# seconds: from sub-millisecond (tiny models, cached prefixes) to minutes (long generations on CPU)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BASE_LABEL = "base"
OTHER_LABEL = "other"
UNAUTHENTICATED_LABEL = "unauthenticated"
UNRESOLVED_LABEL = "unresolved"  # a request naming an adapter that was not found / not allowed


class AdapterLabels:
    """Bounded adapter label values: per tenant, the first `limit` names seen keep their own label."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, adapter: str, tenant: str = "", shared: bool = True) -> str:
        if not adapter:
            return BASE_LABEL
        if adapter in (UNRESOLVED_LABEL, OTHER_LABEL):
            return adapter
        if not shared and adapter.partition("/")[0] != tenant:  # never another tenant's private name
            return OTHER_LABEL
        with self._lock:
            seen = self._seen.setdefault(tenant, set())
            if adapter in seen:
                return adapter
            if len(seen) < self.limit:
                seen.add(adapter)
                return adapter
        return OTHER_LABEL


class EngineCollector:
    """Scrape-time gauges from a `() -> EngineStats` callable."""

    def __init__(self, stats: Callable[[], object]) -> None:
        self.stats = stats

    def describe(self):
        return []

    def collect(self):
        s = self.stats()
        gauges = {
            "switchboard_running_sequences": ("sequences in the running batch", s.running),
            "switchboard_waiting_sequences": ("sequences waiting to be scheduled", s.waiting),
            "switchboard_batch_size": ("sequences in the last engine step", s.batch_size),
            "switchboard_batch_tokens": ("tokens computed in the last engine step", s.batch_tokens),
            "switchboard_kv_blocks_used": ("KV-cache blocks held by sequences", s.kv_blocks_used),
            "switchboard_kv_blocks_total": ("KV-cache blocks in all", s.kv_blocks_total),
            "switchboard_kv_usage_ratio": ("fraction of KV-cache blocks in use",
                                           s.kv_blocks_used / max(1, s.kv_blocks_total)),
            "switchboard_adapters_resident": ("adapters in device slots", s.adapters_resident),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("switchboard_engine_steps", "engine steps run", value=s.steps)
        yield CounterMetricFamily("switchboard_preemptions", "sequences preempted (KV space or fair share)",
                                  value=s.preemptions)
        yield CounterMetricFamily("switchboard_fair_preemptions",
                                  "sequences preempted so that a tenant under its share of the batch could start",
                                  value=s.fair_preemptions)
        yield from prefix_cache_families(s)


def prefix_cache_families(s) -> list:
    """The prefix cache's series from EngineStats: cached blocks, evictions, and per tenant (a fixed set) the
    prompt tokens computed and those served from the cache."""
    p = s.prefix
    out = [GaugeMetricFamily("switchboard_prefix_cache_blocks", "KV blocks the prefix cache holds for reuse",
                             value=p.cached_blocks),
           CounterMetricFamily("switchboard_prefix_cache_evictions", "cached KV blocks evicted for other content",
                               value=p.evictions)]
    computed = CounterMetricFamily("switchboard_prompt_tokens_computed",
                                   "prompt tokens computed at admission (not served from the prefix cache; a "
                                   "re-admission after preemption counts the context it recomputes)",
                                   labels=["tenant"])
    cached = CounterMetricFamily("switchboard_prompt_tokens_cached", "prompt tokens served from the prefix cache",
                                 labels=["tenant"])
    for tenant, (n_computed, n_cached) in sorted(p.tokens.items()):
        computed.add_metric([tenant], n_computed)
        cached.add_metric([tenant], n_cached)
    return [*out, computed, cached]


class FairnessCollector:
    """Scrape-time per-tenant series from a `() -> {tenant: TenantService}` callable (tenants: a fixed set)."""

    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self.snapshot = snapshot

    def describe(self):
        return []

    def collect(self):
        snap = self.snapshot()
        families = (
            (CounterMetricFamily, "switchboard_tenant_service", "weighted tokens served (w_in*prompt + w_out*output)",
             "service"),
            (GaugeMetricFamily, "switchboard_tenant_vtc_counter", "the tenant's virtual token counter (VTC)",
             "counter"),
            (CounterMetricFamily, "switchboard_tenant_scheduled_prompt_tokens", "prompt tokens admitted",
             "prompt_tokens"),
            (CounterMetricFamily, "switchboard_tenant_scheduled_output_tokens", "tokens generated",
             "generated_tokens"),
            (GaugeMetricFamily, "switchboard_tenant_waiting_sequences", "sequences waiting", "waiting"),
        )
        for cls, name, doc, attr in families:
            family = cls(name, doc, labels=["tenant"])
            for tenant, s in snap.items():
                family.add_metric([tenant], getattr(s, attr))
            yield family


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], object] | None = None, max_adapter_labels: int = 32,
                 fairness: Callable[[], dict] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.adapter_label = AdapterLabels(max_adapter_labels)
        r = self.registry
        ta = ["tenant", "adapter"]
        self.requests = Counter("switchboard_requests", "finished requests by gRPC status", ta + ["status"], registry=r)
        self.in_flight = Gauge("switchboard_requests_in_flight", "requests being served", ["tenant"], registry=r)
        self.queue_time = Histogram("switchboard_queue_seconds", "arrival -> first scheduled", ta,
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("switchboard_time_to_first_token_seconds", "arrival -> first token", ta,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("switchboard_time_per_output_token_seconds",
                              "(last token - first token) / (output tokens - 1), per request", ta,
                              buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("switchboard_e2e_latency_seconds", "arrival -> last token", ta,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("switchboard_prompt_tokens", "prompt tokens of served requests", ta, registry=r)
        self.generated_tokens = Counter("switchboard_generated_tokens", "tokens generated", ta, registry=r)
        self.throttled = Counter("switchboard_throttled_requests", "requests refused over a tenant quota",
                                 ["tenant", "limit"], registry=r)
        if engine_stats is not None:
            r.register(EngineCollector(engine_stats))
        if fairness is not None:
            r.register(FairnessCollector(fairness))
        self._http = None

    def labels(self, tenant: str, adapter: str, shared: bool = True) -> tuple[str, str]:
        return tenant, self.adapter_label(adapter, tenant, shared)

    def observe_request(
        self, tenant: str, adapter: str, status: str, *, prompt_tokens: int = 0, completion_tokens: int = 0,
        queue_s: float | None = None, ttft_s: float | None = None, total_s: float | None = None,
        shared: bool = True,
    ) -> None:
        """One finished request (any status); timings only for those that ran. `shared`: whether `adapter`
        ("owner/name") is shared; a private one of another owner than `tenant` is labelled "other"."""
        t, a = self.labels(tenant, adapter, shared)
        self.requests.labels(t, a, status).inc()
        if prompt_tokens:
            self.prompt_tokens.labels(t, a).inc(prompt_tokens)
        if completion_tokens:
            self.generated_tokens.labels(t, a).inc(completion_tokens)
        if queue_s is not None:
            self.queue_time.labels(t, a).observe(queue_s)
        if ttft_s is not None:
            self.ttft.labels(t, a).observe(ttft_s)
        if total_s is not None and status == "OK":
            self.e2e.labels(t, a).observe(total_s)
            if ttft_s is not None and completion_tokens > 1:
                self.tpot.labels(t, a).observe((total_s - ttft_s) / (completion_tokens - 1))

    def observe_tokens(self, tenant: str, adapter: str, prompt_tokens: int, completion_tokens: int,
                       shared: bool = True) -> None:
        """Tokens of a request counted after observe_request (a cancelled one's last events come later)."""
        t, a = self.labels(tenant, adapter, shared)
        if prompt_tokens:
            self.prompt_tokens.labels(t, a).inc(prompt_tokens)
        if completion_tokens:
            self.generated_tokens.labels(t, a).inc(completion_tokens)

    def observe_throttled(self, tenant: str, limit: str) -> None:
        self.throttled.labels(tenant, limit).inc()

    def observe_unauthenticated(self, method: str) -> None:
        self.requests.labels(UNAUTHENTICATED_LABEL, OTHER_LABEL, "UNAUTHENTICATED").inc()

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (useful with port 0)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
