"""
Prometheus metrics of one mmgun process, in a registry of its own (so tests and
several services in one process never collide), served at GET /metrics.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
ENDPOINTS = ("/", "/send", "/status", "/healthz", "/metrics")
#: The Mailgun v3 endpoints, labelled by their pattern (a label per domain would grow without bound).
V3_ENDPOINTS = {"messages": "/v3/{domain}/messages", "messages.mime": "/v3/{domain}/messages.mime"}


def endpoint_label(path: str) -> str:
    """The endpoint label of a request's path: itself for the JSON API, the pattern for v3, else "other"."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v3/"):
        segments = path.split("/")
        if len(segments) == 4 and segments[2]:
            return V3_ENDPOINTS.get(segments[3], "other")
    return "other"


class QueueCollector(Collector):
    """Queue depth and age as last read from the store (refreshed by a timer, never on scrape)."""

    def __init__(self) -> None:
        self.depth: dict[str, float] = {}
        self.oldest_age = 0.0
        self.envelopes = 0.0

    def collect(self) -> Iterable[Any]:
        depth = GaugeMetricFamily("mmgun_queue_recipients", "Unfinished recipients in the queue, by status", labels=["status"])
        for status in ("queued", "deferred"):
            depth.add_metric([status], self.depth.get(status, 0.0))
        yield depth
        yield GaugeMetricFamily("mmgun_queue_envelopes", "Unfinished envelopes in the queue", value=self.envelopes)
        yield GaugeMetricFamily("mmgun_queue_oldest_age_seconds", "Age of the oldest unfinished envelope", value=self.oldest_age)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.accepted = Counter("mmgun_submissions_accepted", "Submissions queued", registry=r)
        self.rejected = Counter("mmgun_submissions_rejected", "Submissions refused, by reason", ["reason"], registry=r)
        self.recipients = Counter("mmgun_recipients", "Recipient delivery outcomes, by status", ["status"], registry=r)
        self.smtp_replies = Counter("mmgun_smtp_replies", "SMTP replies from mail exchangers, by class", ["class"], registry=r)
        self.delivery_latency = Histogram(
            "mmgun_delivery_latency_seconds", "From submission to the MX's acceptance", buckets=LATENCY_BUCKETS, registry=r
        )
        self.http_latency = Histogram(
            "mmgun_http_request_duration_seconds", "HTTP request latency", ["endpoint", "code"], buckets=HTTP_BUCKETS, registry=r
        )
        self.destination_backoffs = Counter(
            "mmgun_destination_backoffs",
            "Destination back-offs (issue 18): a recipient domain paused, an MX's concurrency changed while lowered",
            ["kind"],
            registry=r,
        )
        self.queue = QueueCollector()
        r.register(self.queue)

        # labels() validates and locks on every call; the children are looked up once.
        self._http: dict[tuple[str, int], Any] = {}
        self._recipients: dict[str, Any] = {}
        self._replies: dict[str, Any] = {}

    def http_request(self, path: bytes, code: int, seconds: float) -> None:
        endpoint = path.decode("ascii", "replace")
        key = (endpoint_label(endpoint), code)
        child = self._http.get(key)
        if child is None:
            child = self._http[key] = self.http_latency.labels(key[0], str(code))
        child.observe(seconds)

    def destination_backoff(self, kind: str) -> None:
        """A domain paused (kind "domain") or an MX's concurrency lowered or raised short of its maximum ("mx")."""
        self.destination_backoffs.labels(kind).inc()

    def smtp_reply(self, code: int) -> None:
        cls = f"{code // 100}xx"
        child = self._replies.get(cls)
        if child is None:
            child = self._replies[cls] = self.smtp_replies.labels(cls)
        child.inc()

    def recipient(self, status: str, latency: float | None) -> None:
        child = self._recipients.get(status)
        if child is None:
            child = self._recipients[status] = self.recipients.labels(status)
        child.inc()
        if status == "sent" and latency is not None:
            self.delivery_latency.observe(latency)
