"""Migration daemon to daemon: two daemons, each its own "host" in its own network namespace.

The namespaces (names unique per run) are joined by a veth pair with a
private /30; each daemon serves TCP on its side's address with a token of
its own.  The daemons, and the workloads each "host" runs, enter their
namespace with `nsenter --net` (not `ip netns exec`, which also unshares the
mount namespace: criu would then see the tree in a mount namespace of its
own and try to dump it).  The source's workload is a counter whose stdout
is a pipe the test holds; the destination's engine (the test) restores the
migrated checkpoint with a new pipe handed over the destination's fd socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from criud.api.client import Client, CriudClientError
from tests.integration.helpers import (
    HELLO,
    Daemon,
    Procs,
    drain_hello,
    hello_num,
    read_line,
    restore_into_pipe,
    small_state_dir,
    temp_root,
    wait_for,
)

PORT = 8420


class Hosts:
    """Two network namespaces joined by a veth pair: src (.1) and dst (.2)."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.src_ns, self.dst_ns = f"criud-s-{tag}", f"criud-d-{tag}"
        # A private /30 unlikely to meet another run's: 10.231.X.Y/30.
        n = secrets.randbelow(1 << 14) * 4
        base = f"10.{231}.{n >> 8}.{n & 0xFF}"
        prefix = base.rsplit(".", 1)[0]
        last = int(base.rsplit(".", 1)[1])
        self.src_addr, self.dst_addr = f"{prefix}.{last + 1}", f"{prefix}.{last + 2}"
        self.veth = (f"vs{tag}", f"vd{tag}")

    def up(self) -> None:
        vs, vd = self.veth
        for cmd in (
            ["ip", "netns", "add", self.src_ns],
            ["ip", "netns", "add", self.dst_ns],
            ["ip", "link", "add", vs, "type", "veth", "peer", "name", vd],
            ["ip", "link", "set", vs, "netns", self.src_ns],
            ["ip", "link", "set", vd, "netns", self.dst_ns],
            ["ip", "-n", self.src_ns, "addr", "add", f"{self.src_addr}/30", "dev", vs],
            ["ip", "-n", self.dst_ns, "addr", "add", f"{self.dst_addr}/30", "dev", vd],
            ["ip", "-n", self.src_ns, "link", "set", vs, "up"],
            ["ip", "-n", self.dst_ns, "link", "set", vd, "up"],
            ["ip", "-n", self.src_ns, "link", "set", "lo", "up"],
            ["ip", "-n", self.dst_ns, "link", "set", "lo", "up"],
        ):
            subprocess.run(cmd, check=True, timeout=30, capture_output=True)

    def down(self) -> None:
        for ns in (self.src_ns, self.dst_ns):
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30, capture_output=True)

    def enter(self, ns: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{ns}"]


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    h = Hosts()
    try:
        h.up()
        yield h
    finally:
        h.down()


class Side:
    """One daemon on its host: the daemon, its token and its TCP url."""

    def __init__(self, daemon: Daemon, token: str, url: str) -> None:
        self.daemon, self.token, self.url = daemon, token, url

    @property
    def client(self) -> Client:
        return self.daemon.client

    def tmp_dirs(self) -> list[str]:
        d = self.daemon.state_dir / "checkpoints"
        return [e for e in os.listdir(d) if e.startswith(".tmp-")] if d.exists() else []

    def page_servers(self) -> list[int]:
        """The criu page servers this daemon runs now."""
        out = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.daemon.pid and b"page-server" in cmd:
                out.append(int(pid))
        return out


@contextlib.contextmanager
def side(
    root: Path, hosts: Hosts, which: str, args: tuple[str, ...] = (), small: str | None = None
) -> Iterator[Side]:
    """A daemon in the host's namespace, serving TCP with a token; stopped after."""
    ns = hosts.src_ns if which == "src" else hosts.dst_ns
    addr = hosts.src_addr if which == "src" else hosts.dst_addr
    token = secrets.token_hex(16)
    tf = root / "token"
    tf.write_text(token + "\n")
    tf.chmod(0o600)
    listen = ["--listen", f"tcp://{addr}:{PORT}", "--token-file", str(tf)]
    d = Daemon(root, args=[*listen, *args], prefix=hosts.enter(ns))
    with contextlib.ExitStack() as stack:
        if small is not None:
            stack.enter_context(small_state_dir(root, small))
        d.start()
        try:
            yield Side(d, token, f"http://{addr}:{PORT}")
        finally:
            d.stop()


@contextlib.contextmanager
def two_sides(
    hosts: Hosts,
    src_args: tuple[str, ...] = (),
    dst_args: tuple[str, ...] = (),
    dst_small: str | None = None,
) -> Iterator[tuple[Side, Side]]:
    with (
        temp_root() as r1,
        temp_root() as r2,
        side(r1, hosts, "src", src_args) as src,
        side(r2, hosts, "dst", dst_args, dst_small) as dst,
    ):
        yield src, dst


def start_counter(
    procs: Procs, hosts: Hosts, code: str = HELLO
) -> tuple[subprocess.Popen[bytes], int]:
    """A counter on the source host (its namespace), a session leader; (it, its pipe's read end)."""
    r, w = os.pipe()
    p = procs.spawn([*hosts.enter(hosts.src_ns), sys.executable, "-c", code], stdout=w)
    os.close(w)
    return p, r


def migrate(src: Side, dst: Side, pid: int, token: str | None = None, **kw: Any) -> dict[str, Any]:
    body = {"pid": pid, "target": {"url": dst.url, "token": token or dst.token}, **kw}
    return src.client.request("POST", "/v1/migrations", body)[1]  # type: ignore[no-any-return]


def assert_runs(p: subprocess.Popen[bytes], rd: int) -> None:
    """The source tree still runs: it is alive, not stopped, and writes new lines."""
    assert p.poll() is None, "the source tree is gone"
    first = hello_num(read_line(rd, 10))
    while True:
        n = hello_num(read_line(rd, 10))
        if n > first + 2:
            return


def assert_nothing_left(src: Side, dst: Side) -> None:
    """No checkpoint (nor a failed record), no half-made dir, no page server, either side."""
    for s in (src, dst):
        wait_for(lambda s=s: not s.tmp_dirs(), 15, what="half-made dirs removed")  # type: ignore[misc]
        assert s.client.checkpoints() == []
        assert os.listdir(s.daemon.state_dir / "checkpoints") == []
    wait_for(lambda: not dst.page_servers(), 15, what="the page server to be gone")


def continues_on(
    dst: Side, procs: Procs, ref: str, key: str, last: int, timeout: float = 15
) -> None:
    """Restore ref on the destination onto a new pipe for key: it goes on at last + 1."""
    r, new_rd = restore_into_pipe(dst.client, procs, ref, key)
    try:
        assert hello_num(read_line(new_rd, timeout)) == last + 1
    finally:
        os.kill(r["pid"], signal.SIGKILL)
        os.close(new_rd)


def test_migrate_counter_round_trip(hosts: Hosts, procs: Procs) -> None:
    with two_sides(hosts) as (src, dst):
        p, rd = start_counter(procs, hosts)
        first = hello_num(read_line(rd))
        out = migrate(src, dst, p.pid)
        # The source tree was killed after the destination committed: its
        # pipe holds what it wrote up to the dump, and then EOF.
        p.wait(timeout=10)
        last = drain_hello(rd, first)
        os.close(rd)
        assert set(out["timing"]) == {"frozen", "pages", "other_images", "total"}
        assert 0 < out["timing"]["frozen"] <= out["timing"]["total"]
        ck = dst.client.inspect(out["checkpoint"])
        assert ck["origin"] == "migration" and ck["state"] == "done"
        # Nothing of it stays on the source.
        assert src.client.checkpoints() == [] and not src.tmp_dirs()
        r, new_rd = restore_into_pipe(dst.client, procs, out["checkpoint"], ck["external"][0])
        try:
            # The counter continues where it was frozen: nothing lost, nothing twice.
            assert hello_num(read_line(new_rd, 15)) == last + 1
            assert hello_num(read_line(new_rd, 15)) == last + 2
            # It runs on the destination's host: its network namespace.
            ns = os.stat(f"/proc/{r['pid']}/ns/net")
            assert ns.st_ino == os.stat(f"/run/netns/{hosts.dst_ns}").st_ino
        finally:
            os.kill(r["pid"], signal.SIGKILL)
            os.close(new_rd)


# A counter with 30,000 separate private mappings (alternate protections keep
# them from merging): its mm image alone is over 1.5 MiB, past the 1 MiB limit
# of a buffered request body.
MANY_MAPS = (
    """
import mmap
flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
maps = [mmap.mmap(-1, 4096, flags, mmap.PROT_READ | (mmap.PROT_WRITE if i % 2 else 0))
        for i in range(30000)]
"""
    + HELLO
)


def test_migrate_a_tree_whose_other_images_pass_one_mib(hosts: Hosts, procs: Procs) -> None:
    """The commit's archive was buffered by the 1 MiB body limit: 413, and the tree ran on."""
    with two_sides(hosts) as (src, dst):
        p, rd = start_counter(procs, hosts, MANY_MAPS)
        first = hello_num(read_line(rd, 60))
        out = migrate(src, dst, p.pid)
        p.wait(timeout=30)
        last = drain_hello(rd, first)
        os.close(rd)
        ck = dst.client.inspect(out["checkpoint"])
        assert ck["state"] == "done" and ck["size_bytes"] > 3 << 19
        continues_on(dst, procs, out["checkpoint"], ck["external"][0], last, 30)


def test_wrong_token_refused_before_any_dump(hosts: Hosts, procs: Procs) -> None:
    with two_sides(hosts) as (src, dst):
        p, rd = start_counter(procs, hosts)
        read_line(rd)
        with pytest.raises(CriudClientError) as ei:
            migrate(src, dst, p.pid, token="not-the-token")
        assert ei.value.status == 502 and ei.value.code == "migration_refused"
        assert ei.value.problem["problem"]["status"] == 401
        assert_runs(p, rd)
        assert_nothing_left(src, dst)
        os.close(rd)


def test_post_copy_is_unsupported_by_kernel_here(hosts: Hosts, procs: Procs) -> None:
    # Remote lazy dumps fail on this kernel (criu's page pipe tee: EPERM):
    # the probe says so in /v1/version, and a request for one is refused
    # before the destination is asked or anything is frozen.
    with two_sides(hosts) as (src, dst):
        supports = src.client.request("GET", "/v1/version")[1]["supports"]
        assert supports["post_copy_migration"]["supported"] is False
        p, rd = start_counter(procs, hosts)
        read_line(rd)
        with pytest.raises(CriudClientError) as ei:
            migrate(src, dst, p.pid, post_copy=True)
        assert (ei.value.status, ei.value.code) == (422, "unsupported_by_kernel")
        assert ei.value.problem["capability"] == "post_copy_migration"
        assert ei.value.problem["feature"] and "post-copy" in ei.value.problem["detail"]
        assert_runs(p, rd)
        assert_nothing_left(src, dst)
        assert dst.page_servers() == []
        os.close(rd)


# A process of about 512 MiB (non-zero pages: criu dumps every one).
BIG = """
import os, sys, time
blob = bytearray(os.urandom(1 << 20)) * {mib}
sys.stdout.write("hello 0\\n"); sys.stdout.flush()
i = 1
while True:
    time.sleep(0.05)
    sys.stdout.write(f"hello {{i}}\\n"); sys.stdout.flush()
    i += 1
"""


def test_connection_drops_mid_push(hosts: Hosts, procs: Procs) -> None:
    with two_sides(hosts) as (src, dst):
        p, rd = start_counter(procs, hosts, BIG.format(mib=512))
        read_line(rd, 60)
        got: dict[str, Any] = {}
        op = src.client.request(
            "POST",
            "/v1/migrations?wait=false",
            {"pid": p.pid, "target": {"url": dst.url, "token": dst.token}},
        )[1]

        def pushing() -> bool:
            ps = dst.page_servers()
            if not ps or not dst.tmp_dirs():
                return False
            # The operation's progress: the pages the destination received.
            now = src.client.operation(op["id"])
            if (now["progress"]["bytes_done"] or 0) > 16 << 20:
                got["pid"] = ps[0]
                return True
            return False

        wait_for(pushing, 60, interval=0.01, what="pages arriving at the page server")
        os.kill(got["pid"], signal.SIGKILL)
        done = src.client.wait_operation(op["id"], timeout=120)
        assert done["state"] == "failed"
        assert done["problem"]["code"] == "migration_failed"
        assert_runs(p, rd)
        assert_nothing_left(src, dst)
        os.close(rd)


def test_destination_disk_fills(hosts: Hosts, procs: Procs) -> None:
    with two_sides(hosts, dst_small="48m") as (src, dst):
        p, rd = start_counter(procs, hosts, BIG.format(mib=128))
        read_line(rd, 60)
        with pytest.raises(CriudClientError) as ei:
            migrate(src, dst, p.pid)
        assert ei.value.code == "migration_failed", ei.value.problem
        # The source names the destination's cause, as its page server saw it.
        assert ei.value.problem["destination_error"]["code"] == "no_space", ei.value.problem
        assert_runs(p, rd)
        assert_nothing_left(src, dst)
        os.close(rd)


def make_certs(d: Path, dst_addr: str) -> dict[str, Path]:
    """A CA, the destination's certificate (its address as SAN) and the source's; with openssl."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, timeout=60, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=criud test CA",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))  # fmt: skip
    for who, cn in (("dst", dst_addr), ("src", "criud-source")):
        ext = d / f"{who}.ext"
        ext.write_text(
            f"subjectAltName=IP:{dst_addr}\n" if who == "dst" else "basicConstraints=CA:FALSE\n"
        )
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
            "-keyout", str(d / f"{who}.key"), "-out", str(d / f"{who}.csr"))  # fmt: skip
        run("x509", "-req", "-in", str(d / f"{who}.csr"), "-CA", str(d / "ca.pem"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
            "-extfile", str(ext), "-out", str(d / f"{who}.pem"))  # fmt: skip
    return {"ca": d / "ca.pem", "dst": d / "dst.pem", "dst_key": d / "dst.key",
            "src": d / "src.pem", "src_key": d / "src.key"}  # fmt: skip


def tls_flags(c: dict[str, Path], who: str) -> tuple[str, ...]:
    return (
        "--tls-cacert",
        str(c["ca"]),
        "--tls-cert",
        str(c[who]),
        "--tls-key",
        str(c[f"{who}_key"]),
    )


def test_migrate_with_tls(hosts: Hosts, procs: Procs) -> None:
    with temp_root() as certs_dir:
        c = make_certs(certs_dir, hosts.dst_addr)
        with two_sides(hosts, tls_flags(c, "src"), tls_flags(c, "dst")) as (src, dst):
            p, rd = start_counter(procs, hosts)
            first = hello_num(read_line(rd))
            out = migrate(src, dst, p.pid)
            assert out["tls"] is True
            p.wait(timeout=10)
            last = drain_hello(rd, first)
            os.close(rd)
            ck = dst.client.inspect(out["checkpoint"])
            continues_on(dst, procs, out["checkpoint"], ck["external"][0], last)


def test_destination_refuses_tls_it_cannot_do(hosts: Hosts, procs: Procs) -> None:
    """The source asks for TLS, the destination has no certificate: refused before any dump."""
    with temp_root() as certs_dir:
        c = make_certs(certs_dir, hosts.dst_addr)
        with two_sides(hosts, tls_flags(c, "src")) as (src, dst):
            p, rd = start_counter(procs, hosts)
            read_line(rd)
            t0 = time.monotonic()
            with pytest.raises(CriudClientError) as ei:
                migrate(src, dst, p.pid, tls=True)
            assert ei.value.code == "migration_refused"
            assert ei.value.problem["problem"]["code"] == "invalid_request"
            assert time.monotonic() - t0 < 30
            assert_runs(p, rd)
            assert_nothing_left(src, dst)
            os.close(rd)


def test_cli_migrate(hosts: Hosts, procs: Procs) -> None:
    with two_sides(hosts) as (src, dst):
        p, rd = start_counter(procs, hosts)
        first = hello_num(read_line(rd))
        tf = src.daemon.root / "dst-token"
        tf.write_text(dst.token + "\n")
        tf.chmod(0o600)
        argv = src.daemon.cli(
            "--json", "migrate", str(p.pid), "--to", dst.url, "--token-file", str(tf)
        )
        run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        assert out["source_pid"] == p.pid and out["destination"] == dst.url
        p.wait(timeout=10)
        last = drain_hello(rd, first)
        os.close(rd)
        ck = dst.client.inspect(out["checkpoint"])
        continues_on(dst, procs, out["checkpoint"], ck["external"][0], last)


def test_ship_a_checkpoint(hosts: Hosts, procs: Procs) -> None:
    """An existing checkpoint goes over as an archive (export + import): same answer."""
    with two_sides(hosts) as (src, dst):
        p, rd = start_counter(procs, hosts)
        first = hello_num(read_line(rd))
        local = src.client.checkpoint(p.pid, name="counter")
        p.wait(timeout=10)
        last = drain_hello(rd, first)
        os.close(rd)
        body = {"checkpoint": "counter", "target": {"url": dst.url, "token": dst.token}}
        out = src.client.request("POST", "/v1/migrations", body)[1]
        assert out["source_pid"] is None and out["timing"]["total"] > 0
        ck = dst.client.inspect(out["checkpoint"])
        assert ck["name"] == "counter" and ck["origin"] == "import:criud"
        # The source keeps its checkpoint: shipping copies it.
        assert src.client.inspect("counter")["id"] == local["id"]
        continues_on(dst, procs, "counter", ck["external"][0], last)
