"""The daemon's Prometheus metrics (`GET /metrics`), in a registry of its own.

A registry per service, not prometheus-client's global one: the tests run
many daemons, and nothing another library registers globally leaks in.
Counters and the histograms are updated where operations end
(CriudService._observed); the gauges are read when scraped, from the
objects that own what they count.

The counts are kept here in plain dicts (updated and scraped on the event
loop only, so without locks) and handed to prometheus_client's metric
families when scraped: prometheus_client is imported on the first
scrape, not at start-up, so a daemon no one scrapes keeps its 1.3 MiB
(bench/memory_map.py).  The exposition is what prometheus_client's own
Counter, Gauge and Histogram give for the same counts (_total, _created,
_bucket, _count, _sum; tests/unit/daemon/test_metrics.py compares them).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# Small checkpoints and restores take tens of ms here; big ones, seconds to minutes.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
# A small tree is frozen for a few ms; 1 GiB for about a second here.
FROZEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Count:
    """One counter's value and when it was first touched (its _created)."""

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()


class _Hist:
    """One histogram: a count per bucket (not cumulative), the sum, its creation time."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        # One more than the bounds: +Inf's.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, v: float) -> None:
        # The first bucket whose bound is >= v: prometheus' "le".
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v

    def cumulative(self, go: Callable[[float], str]) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((go(bound), total))
        return out


class Metrics:
    """The daemon's collectors; each gauge reads its count from a callable when scraped."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self.gauges = gauges
        # (kind, outcome, code) -> count; kind -> duration; kind -> running now.
        self.operations: dict[tuple[str, str, str], _Count] = {}
        self.duration: dict[str, _Hist] = {}
        self.in_flight: dict[str, float] = {}
        self.frozen = _Hist(FROZEN_BUCKETS)
        self.bytes_written = _Count()
        self.bytes_read = _Count()
        self._registry: CollectorRegistry | None = None

    def started(self, kind: str) -> None:
        """An operation of kind began."""
        self.in_flight[kind] = self.in_flight.get(kind, 0) + 1

    def ended(self, kind: str, code: str | None, seconds: float) -> None:
        """An operation of kind ended: code None if it succeeded, else its problem's code."""
        self.in_flight[kind] = self.in_flight.get(kind, 0) - 1
        key = (kind, "ok" if code is None else "error", code or "")
        self.operations.setdefault(key, _Count()).value += 1
        self.duration.setdefault(kind, _Hist(BUCKETS)).observe(seconds)

    def checkpointed(self, size_bytes: int | None, stats: dict[str, int] | None) -> None:
        """A checkpoint is done: its images' size, and criu's stats-dump counters."""
        self.bytes_written.value += size_bytes or 0
        frozen_us = (stats or {}).get("frozen_time_us")
        if frozen_us is not None:
            self.frozen.observe(frozen_us / 1e6)

    def restored(self, size_bytes: int | None) -> None:
        """A restore is done: the size of the checkpoint it read."""
        self.bytes_read.value += size_bytes or 0

    def render(self) -> tuple[bytes, str]:
        """The text exposition format, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry()), CONTENT_TYPE_LATEST

    def registry(self) -> CollectorRegistry:
        """The registry scrapes read (made, with prometheus_client, on the first one)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry, ProcessCollector

            r = CollectorRegistry()
            r.register(_Families(self))
            # process_open_fds, process_resident_memory_bytes, cpu, start time: the daemon's own.
            ProcessCollector(registry=r)
            self._registry = r
        return self._registry


class _Families:
    """The counts of a Metrics as prometheus_client's metric families, read at each scrape."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self.m
        ops = CounterMetricFamily(
            "criud_operations",
            "Checkpoints and restores that ended, by kind, outcome and problem code",
            labels=["kind", "outcome", "code"],
        )
        for labels, c in m.operations.items():
            ops.add_metric(labels, c.value, created=c.created)
        yield ops
        yield _histogram(
            "criud_operation_duration_seconds",
            "How long operations took, start to end, by kind",
            ["kind"],
            {(k,): h for k, h in m.duration.items()},
        )
        running = GaugeMetricFamily(
            "criud_operations_in_flight", "Operations running now", labels=["kind"]
        )
        for kind, n in m.in_flight.items():
            running.add_metric([kind], n)
        yield running
        yield _histogram(
            "criud_frozen_seconds",
            "How long checkpointed trees were frozen (criu's frozen_time)",
            [],
            {(): m.frozen},
        )
        for name, doc, c in (
            (
                "criud_checkpoint_bytes_written",
                "Bytes of images checkpoints wrote (the sealed images dir of each done checkpoint)",
                m.bytes_written,
            ),
            (
                "criud_restore_bytes_read",
                "Bytes of images restores read (the size of each checkpoint restored)",
                m.bytes_read,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=c.value, created=c.created)
        for name, (doc, read) in m.gauges.items():
            yield GaugeMetricFamily(name, doc, value=read())


def _histogram(name: str, doc: str, by: Sequence[str], hs: dict[tuple[str, ...], _Hist]) -> Any:
    """A histogram family as prometheus_client's Histogram shows it (its _created included)."""
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.samples import Sample
    from prometheus_client.utils import floatToGoString

    fam = HistogramMetricFamily(name, doc, labels=by)
    for labels, h in hs.items():
        fam.add_metric(labels, h.cumulative(floatToGoString), h.sum)
        created = dict(zip(by, labels, strict=True))
        fam.samples.append(Sample(f"{name}_created", created, h.created))
    return fam
