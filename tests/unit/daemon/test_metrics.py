"""criud.daemon.metrics: the exposition prometheus_client's own collectors give, built on scrape."""

from __future__ import annotations

import re
import subprocess
import sys

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from criud.daemon.metrics import BUCKETS, FROZEN_BUCKETS, Metrics

GAUGES = {"criud_fd_handles": ("fd handles held", lambda: 3.0)}


def _reference() -> CollectorRegistry:
    """The same counts through prometheus_client's Counter, Gauge and Histogram."""
    r = CollectorRegistry()
    ops = Counter(
        "criud_operations",
        "Checkpoints and restores that ended, by kind, outcome and problem code",
        ["kind", "outcome", "code"],
        registry=r,
    )
    duration = Histogram(
        "criud_operation_duration_seconds",
        "How long operations took, start to end, by kind",
        ["kind"],
        buckets=BUCKETS,
        registry=r,
    )
    running = Gauge("criud_operations_in_flight", "Operations running now", ["kind"], registry=r)
    frozen = Histogram(
        "criud_frozen_seconds",
        "How long checkpointed trees were frozen (criu's frozen_time)",
        buckets=FROZEN_BUCKETS,
        registry=r,
    )
    written = Counter(
        "criud_checkpoint_bytes_written",
        "Bytes of images checkpoints wrote (the sealed images dir of each done checkpoint)",
        registry=r,
    )
    read = Counter(
        "criud_restore_bytes_read",
        "Bytes of images restores read (the size of each checkpoint restored)",
        registry=r,
    )
    for name, (doc, f) in GAUGES.items():
        Gauge(name, doc, registry=r).set_function(f)
    for kind, code, took in _OPS:
        running.labels(kind).inc()
        running.labels(kind).dec()
        ops.labels(kind, "ok" if code is None else "error", code or "").inc()
        duration.labels(kind).observe(took)
    running.labels("restore").inc()
    frozen.observe(0.0042)
    frozen.observe(0.01)
    written.inc(180_000)
    read.inc(4096)
    return r


# Bounds exactly (0.01, 0.05), between them, past the last (+Inf only).
_OPS = [
    ("checkpoint", None, 0.01),
    ("checkpoint", None, 0.03),
    ("restore", "checkpoint_not_found", 0.05),
    ("restore", None, 4000.0),
]


def _ours() -> Metrics:
    m = Metrics(GAUGES)
    for kind, code, took in _OPS:
        m.started(kind)
        m.ended(kind, code, took)
    m.started("restore")
    m.checkpointed(180_000, {"frozen_time_us": 4200})
    m.checkpointed(0, {"frozen_time_us": 10_000})
    m.restored(4096)
    return m


def _without_times(text: str) -> str:
    """The exposition without _created values (times) and the process's own figures."""
    lines = [ln for ln in text.splitlines() if not ln.startswith(("process_", "# HELP process_"))]
    lines = [ln for ln in lines if not ln.startswith("# TYPE process_")]
    return "\n".join(re.sub(r"^(\S+_created(\{.*\})?) .*$", r"\1 T", ln) for ln in lines)


def test_the_exposition_is_prometheus_clients_own() -> None:
    body, ctype = _ours().render()
    assert ctype == CONTENT_TYPE_LATEST
    want = generate_latest(_reference()).decode()
    assert _without_times(body.decode()) == _without_times(want)
    # The daemon's own figures are there too.
    assert "process_resident_memory_bytes" in body.decode()


def test_an_empty_daemon_has_its_families() -> None:
    text = Metrics(GAUGES).render()[0].decode()
    assert "criud_frozen_seconds_count 0.0" in text
    assert "criud_checkpoint_bytes_written_total 0.0" in text
    assert "# TYPE criud_operations_total counter" in text


def test_prometheus_client_is_imported_on_the_first_scrape_only() -> None:
    code = (
        "import sys; from criud.daemon.metrics import Metrics; m = Metrics({}); "
        "m.started('checkpoint'); m.ended('checkpoint', None, 0.1); "
        "print('prometheus_client' in sys.modules); m.render(); "
        "print('prometheus_client' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
