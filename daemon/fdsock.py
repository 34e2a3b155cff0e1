"""The fd socket: clients hand fds to the daemon with SCM_RIGHTS.

Protocol (SOCK_SEQPACKET, one exchange per connection):
  client -> daemon: one message, a JSON object {"ttl_s"?, "names"?} as payload
                    and 1 to 64 fds as SCM_RIGHTS ancillary data;
  daemon -> client: {"handle": "...", "count": N, "expires_in_s": T}
                    or {"error": {"code": "...", "message": "..."}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

from criud.daemon.caller import Caller, peer_caller
from criud.daemon.errors import CriudError
from criud.daemon.fdpass import FdPassError, parse_payload, recv_message
from criud.daemon.handles import HandleStore
from criud.daemon.quotas import Quotas, Ticket

log = logging.getLogger("criud.fdsock")

# Called as audit(action, caller, target, outcome, **extra) for each message.
AuditHook = Callable[..., None]

# A client that connects and sends nothing is dropped after this long.
RECV_TIMEOUT_S = 10.0


def error_reply(code: str, message: str) -> dict[str, Any]:
    """The fd socket's refusal: a stable code and a message for people."""
    return {"error": {"code": code, "message": message}}


class FdSocketServer:
    """Accepts connections on a bound SOCK_SEQPACKET socket and fills a HandleStore."""

    def __init__(
        self,
        sock: socket.socket,
        handles: HandleStore,
        default_ttl: float,
        max_ttl: float,
        quotas: Quotas,
        audit: AuditHook | None = None,
    ) -> None:
        self._sock = sock
        self._handles = handles
        self._quotas = quotas
        self._default_ttl = default_ttl
        self._max_ttl = max_ttl
        self._audit = audit
        self._task: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._sock.setblocking(False)
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as e:
                log.warning("fd socket accept failed: %s", e)
                await asyncio.sleep(0.05)
                continue
            admitted = self._admit(conn)
            if admitted is None:
                continue
            t = loop.create_task(self._serve(conn, *admitted))
            self._conns.add(t)
            t.add_done_callback(self._conns.discard)

    def _admit(self, conn: socket.socket) -> tuple[Caller, Ticket] | None:
        """Take the peer's credentials and a place in its quota, or refuse and close."""
        try:
            # Identity and groups as of connect(), never re-read later.
            who = peer_caller(conn)
            ticket = self._quotas.connect("fd", who.uid)
        except OSError:
            conn.close()
            return None
        except CriudError as e:
            # Shed load with an answer rather than a silent close; the
            # message (and its fds) is never read, and goes when conn does.
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(json.dumps(error_reply(e.code, e.detail)).encode())
            conn.close()
            return None
        return who, ticket

    async def _wait_readable(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(conn.fileno(), ready)
        try:
            await asyncio.wait_for(fut, RECV_TIMEOUT_S)
        finally:
            loop.remove_reader(conn.fileno())

    async def _serve(self, conn: socket.socket, who: Caller, ticket: Ticket) -> None:
        try:
            with conn:
                await self._exchange(conn, who)
        finally:
            self._quotas.disconnect(ticket)

    async def _exchange(self, conn: socket.socket, who: Caller) -> None:
        conn.setblocking(False)
        try:
            reply = await self._receive(conn, who.uid, who.pid)
        except Exception:
            # A bug, not the client's fault: still answer, never go silent.
            log.exception("fd socket: unexpected error handling a message from pid %d", who.pid)
            reply = error_reply("internal_error", "unexpected error")
        if self._audit is not None:
            err = reply.get("error")
            self._audit(
                "send_fds",
                who,
                {"count": reply.get("count")},
                err["code"] if isinstance(err, dict) else "ok",
                **({"id": reply["handle"]} if "handle" in reply else {}),
            )
        with contextlib.suppress(OSError):
            conn.send(json.dumps(reply).encode())

    async def _receive(self, conn: socket.socket, uid: int, pid: int) -> dict[str, Any]:
        """Take one message off conn; return the reply to send."""
        try:
            await self._wait_readable(conn)
            try:
                data, owned = recv_message(conn)
            except BlockingIOError:
                raise FdPassError("empty", "nothing to read") from None
            try:
                ttl, names = parse_payload(data, len(owned), self._max_ttl)
                # The fds are in our table already (the kernel installs them
                # on receipt); over quota they are closed before anything
                # else runs, so one message at most is ever in flight.
                self._quotas.admit_handle(uid, len(owned))
            except BaseException:
                # Whatever goes wrong, the fds received are closed: a hostile
                # message must not be able to pin fds in the daemon.
                owned.close()
                raise
        except CriudError as e:
            # FdPassError included: its code is the fd socket's own.
            return error_reply(e.code, e.detail)
        except TimeoutError:
            return error_reply("timeout", "no message received in time")
        ttl = ttl or self._default_ttl
        h = self._handles.add(uid, pid, owned, names, ttl)
        log.info("fd handle %s: %d fds from uid %d pid %d", h.id, len(h.fds), uid, pid)
        return {"handle": h.id, "count": len(h.fds), "expires_in_s": ttl}
