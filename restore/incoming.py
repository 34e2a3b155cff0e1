"""The destination's side of a migration: a one-shot page server, then the other images.

`open_incoming` makes a fresh `.tmp-<id>` dir (root's, 0700) in the
checkpoints dir and binds a listening TCP socket on a port the kernel picks.
The daemon accepts the one connection itself (only from the address the
request came from, when it came over TCP) and hands the connected socket
to `criu page-server --ps-socket FD`, which writes the pages into the dir
and exits when the source's dump ends.  `commit` then imports the
remaining images (criud's archive, criud.restore.importer's safe reader)
into the same dir: a member that collides with a page image is refused,
and the checkpoint is sealed and recorded like an import, origin
"migration".  `abort`, the deadline (settings.migration_timeout_s) and
every failure kill the page server and remove the dir: nothing is left.

criu's page server takes the CLI path of criud.daemon.criu (it has no RPC
form: the warm pool serves dumps and restores only).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

from criud.daemon import criu_errors, names, peer
from criud.daemon.caller import Caller
from criud.daemon.config import Settings
from criud.daemon.criu import Criu, CriuResult, LogFile
from criud.daemon.errors import (
    Busy,
    CriudError,
    InvalidRequest,
    MigrationFailed,
    MigrationNotFound,
    PermissionDenied,
)
from criud.daemon.operations import Progress
from criud.daemon.store import CheckpointRecord, Store
from criud.dump.job import TMP_PREFIX
from criud.restore import importer

log = logging.getLogger("criud.incoming")

ORIGIN = "migration"
# How long a commit waits at least for the page server to finish (it flushes
# and exits as soon as the source's dump ends; this only bounds a broken one).
PAGE_SERVER_GRACE_S = 30.0


class IncomingRuntime(Protocol):
    """What the running daemon lends an incoming migration."""

    settings: Settings
    store: Store
    criu: Criu


@dataclasses.dataclass
class Incoming:
    """One incoming migration, from its page server's socket to its commit."""

    id: str
    owner_uid: int
    name: str | None
    tls: bool
    address: str
    port: int
    expires: float
    # "waiting" (for the source's connection), "receiving" (the page server
    # runs), "received", "importing", "failed".
    state: str = "waiting"
    page_server_pid: int | None = None
    error: CriudError | None = None
    server: asyncio.Task[None] | None = None
    expiry: asyncio.TimerHandle | None = None
    reaper: asyncio.Future[None] | None = None

    def as_dict(self) -> dict[str, object]:
        """The answer to the source: where to push the pages, and until when."""
        return {
            "id": self.id,
            "address": self.address,
            "port": self.port,
            "tls": self.tls,
            "expires": self.expires,
            "state": self.state,
            "page_server_pid": self.page_server_pid,
            "error": (
                None
                if self.error is None
                else {"code": self.error.code, "detail": self.error.detail}
            ),
        }


def received(rt: IncomingRuntime, inc: Incoming) -> int:
    """Bytes the page server has written so far (a blocking scandir: call in a thread)."""
    tmp = rt.settings.checkpoints_dir / f"{TMP_PREFIX}{inc.id}"
    try:
        with os.scandir(tmp) as it:
            return sum(e.stat(follow_symlinks=False).st_size for e in it if e.is_file())
    except OSError:
        return 0


def page_server_argv(images_dir: Path, sock_fd: int, tls: Settings | None) -> list[str]:
    """`criu page-server` on an accepted socket (without the criu binary); pure.

    With TLS the page server demands and checks the source's certificate
    against the CA (criu's server side always requires one); the name is
    not checked (--tls-no-cn-verify: criu would check it against the
    server's own address), the CA is what vouches for the source.
    """
    argv = ["page-server", "--no-default-config", "-D", str(images_dir)]
    argv += ["--ps-socket", str(sock_fd), "-o", "-", "-v4"]
    if tls is not None:
        argv += [*peer.criu_tls_args(tls), "--tls-no-cn-verify"]
    return argv


class IncomingTable:
    """The open incoming migrations, by id."""

    def __init__(self) -> None:
        self.items: dict[str, Incoming] = {}

    def get(self, inc_id: str, caller: Caller) -> Incoming:
        """The caller's incoming migration; the same 404 for a stranger's."""
        inc = self.items.get(inc_id)
        if inc is None or (inc.owner_uid != caller.uid and not caller.is_root):
            raise MigrationNotFound(f"no incoming migration {inc_id!r}", migration=inc_id)
        return inc


def _listen(address: str) -> socket.socket:
    """A listening socket on address, port picked by the kernel (non-blocking, CLOEXEC)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind((address, 0))
        sock.listen(1)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise InvalidRequest(f"cannot listen for the page server on {address}: {e}") from None
    return sock


async def open_incoming(
    rt: IncomingRuntime,
    table: IncomingTable,
    caller: Caller,
    name: str | None,
    tls: bool,
    local: str | None,
    source: str | None,
) -> Incoming:
    """Open a one-shot page server for a new checkpoint; it waits for source to connect.

    local is the address the request came in on (None: over the unix
    socket, where settings.migration_address is used); source the address it
    came from (None: any source may connect; the unix socket's root chose).
    """
    if not caller.is_root:
        raise PermissionDenied("incoming migrations are root's (or a token holder's)")
    if name is not None:
        names.check_name(name)
    tls_from = rt.settings if tls else None
    if tls_from is not None:
        peer.criu_tls_args(tls_from)
    address = local or rt.settings.migration_address
    if address is None:
        raise InvalidRequest(
            "no address for the page server: ask over TCP, or start the daemon with "
            "--migration-address"
        )
    listener = _listen(address)
    inc_id = names.new_id()
    tmp = rt.settings.checkpoints_dir / f"{TMP_PREFIX}{inc_id}"
    try:
        os.mkdir(tmp, 0o700)
    except BaseException:
        listener.close()
        raise
    loop = asyncio.get_running_loop()
    inc = Incoming(
        id=inc_id,
        owner_uid=caller.uid,
        name=name,
        tls=tls,
        address=address,
        port=listener.getsockname()[1],
        expires=time.time() + rt.settings.migration_timeout_s,
    )
    table.items[inc_id] = inc
    inc.server = asyncio.ensure_future(_serve(rt, inc, listener, source, tmp, tls_from))
    inc.expiry = loop.call_later(rt.settings.migration_timeout_s, lambda: _expire(rt, table, inc))
    log.info("incoming migration %s: page server on %s:%d", inc_id, address, inc.port)
    return inc


async def _accept(listener: socket.socket, peer: str | None) -> socket.socket:
    """The first connection from peer (others are closed at once); the listener closed."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            conn, addr = await loop.sock_accept(listener)
            if peer is None or addr[0] == peer:
                return conn
            log.warning("page server: refused a connection from %s (expected %s)", addr[0], peer)
            conn.close()
    finally:
        # One-shot: nobody else gets in once the source is connected.
        listener.close()


async def _serve(
    rt: IncomingRuntime,
    inc: Incoming,
    listener: socket.socket,
    peer: str | None,
    tmp: Path,
    tls: Settings | None,
) -> None:
    """Accept the source, run the page server on its connection; inc.state says how it went."""
    conn = await _accept(listener, peer)
    inc.state = "receiving"
    log_fd = os.open(rt.settings.run_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        # criu wants a blocking socket; the daemon's copy is closed after.
        conn.setblocking(True)
        fd = conn.fileno()

        async def started(pid: int) -> None:
            inc.page_server_pid = pid

        result = await rt.criu.run(
            page_server_argv(tmp, fd, tls),
            LogFile(log_fd, rt.settings.run_dir / f"page-server-{inc.id}.log"),
            pass_fds=[fd],
            on_spawn=started,
        )
        if not result.ok:
            inc.error = await _failure(rt, inc, result)
            inc.state = "failed"
            await asyncio.to_thread(shutil.rmtree, tmp, True)
            return
        inc.state = "received"
    finally:
        conn.close()
        os.close(log_fd)
        inc.page_server_pid = None


async def _failure(rt: IncomingRuntime, inc: Incoming, result: CriuResult) -> CriudError:
    """The page server's failure as an error (ENOSPC as no_space), with criu's words."""
    err = await criu_errors.failure(
        rt.criu,
        f"page server of incoming migration {inc.id}",
        result,
        "page-server",
        inc.id,
        rt.settings.checkpoints_dir,
    )
    log.warning("incoming migration %s: %s", inc.id, err.detail)
    return err


def _expire(rt: IncomingRuntime, table: IncomingTable, inc: Incoming) -> None:
    """The deadline passed: abort unless the images are being imported."""
    if inc.state != "importing" and table.items.get(inc.id) is inc:
        log.warning("incoming migration %s: expired in state %s", inc.id, inc.state)
        inc.reaper = asyncio.ensure_future(abort(rt, table, inc))


async def abort(rt: IncomingRuntime, table: IncomingTable, inc: Incoming) -> None:
    """Kill the page server (if it runs), remove the half-made checkpoint, forget inc."""
    if inc.state == "importing":
        raise Busy(f"incoming migration {inc.id} is being committed", migration=inc.id)
    table.items.pop(inc.id, None)
    if inc.expiry is not None:
        inc.expiry.cancel()
    if inc.server is not None and not inc.server.done():
        # criu.run kills criu when cancelled; the accept closes the listener.
        inc.server.cancel()
        with contextlib.suppress(BaseException):
            await inc.server
    tmp = rt.settings.checkpoints_dir / f"{TMP_PREFIX}{inc.id}"
    await asyncio.to_thread(shutil.rmtree, tmp, True)
    log.info("incoming migration %s: aborted", inc.id)


async def commit(
    rt: IncomingRuntime,
    table: IncomingTable,
    inc: Incoming,
    spec: importer.ImportSpec,
    body: AsyncIterator[bytes],
    caller: Caller,
    progress: Progress,
    admit: Callable[[int], Awaitable[None]] | None = None,
) -> CheckpointRecord:
    """The remaining images (the body, an archive) into inc's dir; the committed record."""
    if inc.state == "importing":
        raise Busy(f"incoming migration {inc.id} is being committed", migration=inc.id)
    try:
        await _pages_in(inc)
        inc.state = "importing"
        spec = dataclasses.replace(spec, name=inc.name)
        return await importer.run_into(
            rt, spec, body, caller, progress, inc.id, admit, origin=ORIGIN
        )
    finally:
        # Committed, or removed (run_into removes the dir on failure): gone either way.
        inc.state = "failed"
        await abort(rt, table, inc)


async def _pages_in(inc: Incoming) -> None:
    """Wait for the page server to end; MigrationFailed if it did not receive the pages."""
    assert inc.server is not None
    if inc.state == "waiting":
        raise MigrationFailed(
            f"incoming migration {inc.id}: no source connected to its page server",
            migration=inc.id,
        )
    # The source opens its commit while its dump still pushes (criud.dump.
    # migrate): the wait covers the rest of the push, up to the migration's
    # deadline (whose expiry aborts it), and at least the grace.
    left = max(PAGE_SERVER_GRACE_S, inc.expires - time.time())
    done, _ = await asyncio.wait([inc.server], timeout=left)
    if not done:
        raise MigrationFailed(
            f"incoming migration {inc.id}: the page server did not finish", migration=inc.id
        )
    if inc.state != "received":
        raise inc.error or MigrationFailed(
            f"incoming migration {inc.id}: the page server failed", migration=inc.id
        )
