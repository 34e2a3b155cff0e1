"""GET /metrics after a real checkpoint and restore, read by prometheus-client's own parser."""

from __future__ import annotations

import os

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from criud.api.client import CriudClientError
from tests.integration.helpers import (
    Daemon,
    Procs,
    checkpoint_hello,
    kill_restore,
    restore_into_pipe,
)
from tests.integration.sse import SseReader


def scrape(daemon: Daemon) -> dict[str, list[Sample]]:
    """The metrics, by family name, as Prometheus would read them."""
    conn = daemon.client
    status, text = conn.request("GET", "/metrics")
    assert status == 200
    return {f.name: f.samples for f in text_string_to_metric_families(str(text))}


def value(fams: dict[str, list[Sample]], name: str, **labels: str) -> float:
    family = name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    family = family.removesuffix("_bucket")
    hits = [
        s.value
        for s in fams.get(family, [])
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(hits)


def test_metrics_after_a_checkpoint_and_restore(daemon: Daemon, procs: Procs) -> None:
    c = daemon.client
    before = scrape(daemon)
    ck, key = checkpoint_hello(c, procs)
    r, rd = restore_into_pipe(c, procs, ck["id"], key)
    try:
        with pytest.raises(CriudClientError):
            c.restore("no-such-checkpoint")
        during = scrape(daemon)
        assert value(during, "criud_restores_running") >= 1
    finally:
        os.close(rd)
        kill_restore(c, r["id"])
        c.delete(ck["id"])
    after = scrape(daemon)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("criud_operations_total", kind="checkpoint", outcome="ok", code="") == 1
    assert grew("criud_operations_total", kind="restore", outcome="ok", code="") == 1
    assert (
        grew("criud_operations_total", kind="restore", outcome="error", code="checkpoint_not_found")
        == 1
    )
    assert grew("criud_operation_duration_seconds_count", kind="checkpoint") == 1
    assert grew("criud_operation_duration_seconds_count", kind="restore") == 2
    assert 0 < grew("criud_operation_duration_seconds_sum", kind="checkpoint") < 60
    assert value(after, "criud_operations_in_flight", kind="checkpoint") == 0
    assert value(after, "criud_restores_running") == value(before, "criud_restores_running")
    # The daemon's own fds and memory, read from /proc/self.
    assert value(after, "process_open_fds") == pytest.approx(daemon.fd_count(), abs=8)
    assert value(after, "process_resident_memory_bytes") > 10 << 20


def test_fd_handles_and_event_readers_are_counted(daemon: Daemon) -> None:
    r, w = os.pipe()
    try:
        h = daemon.client.send_fds([r, w], ttl_s=60)
        ev = SseReader(daemon.socket)
        try:
            fams = scrape(daemon)
            assert value(fams, "criud_fd_handles") >= 1
            assert value(fams, "criud_fd_handle_fds") >= 2
            assert value(fams, "criud_event_subscribers") >= 1
        finally:
            ev.close()
            daemon.client.delete_fd_handle(h["handle"])
    finally:
        os.close(r)
        os.close(w)
