"""Prometheus metrics with vLLM's names under the ``ferrum:`` prefix, so existing dashboards work.

Request-level figures (latencies, token counts, disconnects) are recorded by the server as requests
progress; engine state (running/waiting, KV usage, prefix cache, preemptions) is read from the engine
at scrape time. Each server owns its own registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    def __init__(self, server):
        self.server = server

    def collect(self):
        engine = self.server.engine
        if engine is None:
            return
        s = engine.stats()
        model = self.server.model_name
        for name, doc, value in (("num_requests_running", "Requests in the running batch.", s["running"]),
                                 ("num_requests_waiting", "Requests waiting to be scheduled.", s["waiting"]),
                                 ("kv_cache_usage_perc", "Fraction of KV cache blocks in use.", s["kv_usage"])):
            g = GaugeMetricFamily(f"ferrum:{name}", doc, labels=["model_name"])
            g.add_metric([model], value)
            yield g
        for name, doc, value in (("prefix_cache_queries", "Prefix cache lookups.", s["prefix_queries"]),
                                 ("prefix_cache_hits", "Prefix cache lookups that reused blocks.", s["prefix_hits"]),
                                 ("num_preemptions", "Sequences preempted for lack of KV blocks.", s["preemptions"]),
                                 ("spec_decode_num_drafts", "Decode steps of a sequence that carried drafts.",
                                  s["drafts"]),
                                 ("spec_decode_num_draft_tokens", "Draft tokens verified.", s["draft_tokens"]),
                                 ("spec_decode_num_accepted_tokens", "Draft tokens that became output.",
                                  s["accepted_tokens"])):
            c = CounterMetricFamily(f"ferrum:{name}", doc, labels=["model_name"])
            c.add_metric([model], value)
            yield c


class Metrics:
    def __init__(self, server):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter("ferrum:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("ferrum:generation_tokens", "Tokens generated.", labels, registry=r)
        self.requests = Counter("ferrum:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self.disconnects = Counter("ferrum:client_disconnects", "Requests aborted because the client went away.",
                                   labels, registry=r)
        self.ttft = Histogram("ferrum:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("ferrum:inter_token_latency_seconds", "Time between output tokens.", labels,
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("ferrum:e2e_request_latency_seconds", "Request latency, arrival to last token.", labels,
                             buckets=_LATENCY, registry=r)
        self.queue = Histogram("ferrum:request_queue_time_seconds", "Time from arrival to the first engine step.",
                               labels, buckets=_LATENCY, registry=r)
        self.running = Gauge("ferrum:http_requests_in_flight", "HTTP generation requests being served.", labels,
                             registry=r)
        r.register(_EngineCollector(server))

    def render(self) -> bytes:
        return generate_latest(self.registry)
