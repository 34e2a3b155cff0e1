"""The daemon's Prometheus metrics (`GET /metrics`), in a registry of its own.

A registry per service, not prometheus-client's global one: the tests run
many daemons, and nothing another library registers globally leaks in.
Counters and the histogram are updated where operations end
(CriudService._observed); the gauges are read when scraped, from the
objects that own what they count.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

# Small checkpoints and restores take tens of ms here; big ones, seconds to minutes.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
# A small tree is frozen for a few ms; 1 GiB for about a second here.
FROZEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The daemon's collectors; each gauge reads its count from a callable when scraped."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.operations = Counter(
            "criud_operations",
            "Checkpoints and restores that ended, by kind, outcome and problem code",
            ["kind", "outcome", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "criud_operation_duration_seconds",
            "How long operations took, start to end, by kind",
            ["kind"],
            buckets=BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "criud_operations_in_flight", "Operations running now", ["kind"], registry=r
        )
        self.frozen = Histogram(
            "criud_frozen_seconds",
            "How long checkpointed trees were frozen (criu's frozen_time)",
            buckets=FROZEN_BUCKETS,
            registry=r,
        )
        # Counter adds the _total suffix.
        self.bytes_written = Counter(
            "criud_checkpoint_bytes_written",
            "Bytes of images checkpoints wrote (the sealed images dir of each done checkpoint)",
            registry=r,
        )
        self.bytes_read = Counter(
            "criud_restore_bytes_read",
            "Bytes of images restores read (the size of each checkpoint restored)",
            registry=r,
        )
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=r).set_function(read)
        # process_open_fds, process_resident_memory_bytes, cpu, start time: the daemon's own.
        ProcessCollector(registry=r)

    def started(self, kind: str) -> None:
        """An operation of kind began."""
        self.in_flight.labels(kind).inc()

    def ended(self, kind: str, code: str | None, seconds: float) -> None:
        """An operation of kind ended: code None if it succeeded, else its problem's code."""
        self.in_flight.labels(kind).dec()
        outcome = "ok" if code is None else "error"
        self.operations.labels(kind, outcome, code or "").inc()
        self.duration.labels(kind).observe(seconds)

    def checkpointed(self, size_bytes: int | None, stats: dict[str, int] | None) -> None:
        """A checkpoint is done: its images' size, and criu's stats-dump counters."""
        self.bytes_written.inc(size_bytes or 0)
        frozen_us = (stats or {}).get("frozen_time_us")
        if frozen_us is not None:
            self.frozen.observe(frozen_us / 1e6)

    def restored(self, size_bytes: int | None) -> None:
        """A restore is done: the size of the checkpoint it read."""
        self.bytes_read.inc(size_bytes or 0)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
