"""`criud serve`: bind the sockets, start the core, run uvicorn, stop cleanly.

Transport and lifecycle stay apart: we bind the unix sockets ourselves (mode
0660, never wider, even for an instant) or take them from systemd, and hand
them to uvicorn's Server.serve(sockets=...).  uvicorn's own uds= path would
chmod the socket to 0666.

Signal handlers only record the request to stop; the serve loop acts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import grp
import http
import json
import logging
import os
import signal
import socket
import sqlite3
import stat
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

from uvicorn.config import LOGGING_CONFIG
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import Server as UvicornServer

from criud.api import fastlist
from criud.api.app import create_app
from criud.api.fastlist import FastList
from criud.daemon import logfmt, memory, procutil
from criud.daemon.caller import Caller, peer_caller
from criud.daemon.config import Settings
from criud.daemon.errors import CriudError, CriuUnavailable, HeaderTimeout
from criud.daemon.fdsock import FdSocketServer
from criud.daemon.quotas import Pool, Quotas, Ticket, raise_nofile
from criud.daemon.service import CriudService
from criud.daemon.store import StoreError

log = logging.getLogger("criud")

SD_LISTEN_FDS_START = 3


class StartupError(CriudError):
    """The daemon cannot start; the message says why and what to do (the CLI prints it)."""

    code = "startup_failed"


def raw_problem(e: CriudError) -> bytes:
    """A whole HTTP/1.1 problem+json answer for a connection that has no request to answer.

    A refused connection, or a head that never completed, has no request
    cycle in uvicorn (and no response goes out before a request), so the
    bytes are written as they are, and the connection closed after them.
    """
    body = json.dumps(
        {"type": "about:blank", "title": e.title, "status": e.status, "detail": e.detail}
        | {"code": e.code, **e.extra}
    ).encode()
    reason = http.HTTPStatus(e.status).phrase
    head = (
        f"HTTP/1.1 {e.status} {reason}\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n" + ("retry-after: 1\r\n" if e.status in (429, 503) else "") + "\r\n"
    )
    return head.encode() + body


# SO_SNDBUFFORCE (linux/asm-generic/socket.h); Python's socket module lacks it.
SO_SNDBUFFORCE = 32
# The most one answer widens its connection's send buffer to (the kernel
# doubles it for its own bookkeeping).
SEND_ROOM_MAX = 2 << 20


class SendRoom:
    """Widens one unix connection's send buffer so that a big answer goes out in one send().

    A 1,000-record list is 800 KB; the default buffer (208 KiB) takes a
    quarter of it, and asyncio's transport copies the rest into its own
    buffer and sends it in pieces as the reader drains, each piece a turn of
    the loop: 40% of the daemon's CPU per list under load.  Root may force
    a wider buffer.  It adds no exposure: an answer the caller does not read
    waits in the kernel instead of the transport's buffer, the same bytes,
    and only answers that asked for room (criud.api.fastlist's) get it, so
    an event stream's slow reader is still noticed as soon as before.
    """

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.room = 0

    def fit(self, size: int) -> None:
        """Make room for size bytes in flight (at most SEND_ROOM_MAX); never narrows it."""
        want = min(size, SEND_ROOM_MAX)
        if want > self.room:
            self.room = want
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, want)


# A head timer firing this close to its deadline times the head out (the
# loop may run a timer up to its clock resolution early).
HEAD_TIMER_SLACK_S = 1e-3

# The most a request head may take, as h11's default (uvicorn's h11 protocol
# used it): httptools sets no bound of its own.
MAX_HEAD = 16 * 1024


# The request target _answer_list takes, and the headers that announce a
# body (a request with one goes the framework's way).
PLAIN_LIST = fastlist.PATH.encode()
_BODY_HEADERS = (b"content-length", b"transfer-encoding", b"expect")


class PeerCredProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that puts the peer's SO_PEERCRED into every request's state.

    uvicorn copies ``app_state`` into each request's scope["state"]; giving
    each connection its own copy with the caller in it makes the credentials
    available as request.state.peer without touching the ASGI app.

    It also admits the connection into its pool (criud.daemon.quotas),
    bounds how long a request head may take (uvicorn has no such timeout,
    and its keep-alive timer stops at the first byte of the next head, so a
    head that never ends would hold the connection forever) and how big it
    may grow (MAX_HEAD; httptools keeps a header's bytes until it ends).

    httptools rather than h11: it parses in C, a third less of the daemon's
    CPU per request under load (docs/benchmarks.md, issue 13).
    """

    # Set on the subclass protocol_for() makes for a running daemon.
    quotas: Quotas | None = None
    header_timeout_s: float = 10.0
    # The app's state (its list cache), for answering the list from here.
    list_state: Any = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._ticket: Ticket | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_deadline: float | None = None
        self._refused = False
        # Bytes that arrived while no head was complete, and whether the
        # parser is past a head (in a body) now.
        self._head_bytes = 0
        self._in_body = False
        # The request now parsed was answered by _answer_list (no cycle).
        self._answered = False
        sock: Any = transport.get_extra_info("socket")
        peer: Caller | None = None
        tcp = False
        if sock is not None and sock.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                # Identity and groups as of connect(), never re-read later.
                peer = peer_caller(sock)
        elif sock is not None:
            # TCP: no credentials to read; the bearer token decides (api.deps).
            tcp = True
        self.app_state = {**self.app_state, "peer": peer, "tcp": tcp}
        if sock is not None and not tcp:
            self.app_state["send_room"] = SendRoom(sock)
        if self.quotas is not None:
            # A unix peer without credentials is no one's: it counts as non-root.
            pool: Pool = "tcp" if tcp else "api"
            key: int | str = peer.uid if peer is not None else -1
            if tcp:
                key = self.client[0] if self.client else "?"
            try:
                self._ticket = self.quotas.connect(pool, key)
            except CriudError as e:
                self._refuse(e)
                return
        self._arm_head_timer()

    def _refuse(self, e: CriudError) -> None:
        """Answer e on this connection and close it; nothing more is read from it."""
        self._refused = True
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.write(raw_problem(e))
            self.transport.close()

    def _arm_head_timer(self) -> None:
        """The next head must be complete within header_timeout_s from now.

        One timer per connection, moved on lazily: a kept-alive connection
        arms a head's time after every answer and stops it at every head,
        and a call_later + cancel per request was 3% of the daemon's CPU per
        list under load.  Now each request only sets or clears the deadline;
        the timer, when it fires, times the head out, waits on for a later
        deadline, or finds none and ends.
        """
        if self.header_timeout_s <= 0:
            return
        # Deadlines only grow: a timer still pending fires no later than this.
        self._head_deadline = self.loop.time() + self.header_timeout_s
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_deadline, self._head_timed_out)

    def _head_done(self) -> None:
        """A head completed: no deadline until the next answer is out (the timer stays)."""
        self._head_deadline = None

    def _cancel_head_timer(self) -> None:
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return  # no head pending; the next answer arms it again
        if deadline - self.loop.time() > HEAD_TIMER_SLACK_S:
            # Re-armed since this timer was set: wait for the newer deadline.
            self._head_timer = self.loop.call_at(deadline, self._head_timed_out)
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered: not a head any more
        self._refuse(
            HeaderTimeout(
                f"the request head was not complete within {self.header_timeout_s:g} s",
                timeout_s=self.header_timeout_s,
            )
        )

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._in_body:
            # These bytes start or go on with a head.  Counted before the
            # parser sees them; a head completed inside them starts the
            # count again (on_headers_complete), so a whole pipelined
            # request in one read never counts against the next head.
            self._head_bytes += len(data)
        super().data_received(data)
        if not self._in_body and self._head_bytes > MAX_HEAD and not self._refused:
            # As h11 answered a head past its limit, and the connection closes.
            self._refused = True
            self._cancel_head_timer()
            if not self.transport.is_closing():
                self.send_400_response("Invalid HTTP request received.")

    def on_headers_complete(self) -> None:
        # A whole head arrived: its request starts (or waits its turn).
        self._head_done()
        self._head_bytes = 0
        self._in_body = True
        if not self._answer_list():
            super().on_headers_complete()

    def _answer_list(self) -> bool:
        """Answer a plain GET /v1/checkpoints from the list's cache, before any ASGI cycle.

        Under load the list costs the daemon ~0.19 ms of CPU, of which a
        quarter was uvicorn's cycle around FastList: a task, an Event, the
        ASGI messages, the head built per request (bench/profile.py api
        --clients 50).  Only the plainest form is taken: HTTP/1.1 kept
        alive, no query, no body, nothing in flight before it, access log
        off; and only a cache hit (criud.api.fastlist.cached_now: a unix
        peer with credentials, its own view).  Anything else goes to the
        cycle and FastList.  The bytes are those uvicorn writes for
        FastList's answer: status line, its default headers (date, server),
        FastList's headers (tests/security/test_list_views.py).
        """
        p = self.parser
        if (
            self.list_state is None
            or self.url != PLAIN_LIST
            or p.get_method() != b"GET"
            or p.get_http_version() != "1.1"
            or not p.should_keep_alive()
            or p.should_upgrade()
            or (self.cycle is not None and not self.cycle.response_complete)
            or self.pipeline
            or self.access_log
            or self.flow.write_paused
            or self.transport.is_closing()
            or any(name in _BODY_HEADERS for name, _ in self.headers)
        ):
            return False
        body = fastlist.cached_now(self.list_state, self.app_state)
        if body is None:
            return False
        room = self.app_state.get("send_room")
        if room is not None:
            room.fit(len(body) + 4096)
        head = [b"HTTP/1.1 200 OK\r\n"]
        for name, value in (*self.server_state.default_headers, *fastlist.headers(body)):
            head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        self.transport.write(b"".join(head))
        self.transport.write(body)
        self._answered = True
        # As uvicorn after a response: count it, arm keep-alive (and our head timer).
        self.on_response_complete()
        return True

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._answered:
            # Answered in on_headers_complete: there is no cycle to tell.
            self._answered = False
            return
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            # The next head on this kept-alive connection gets its own time.
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self.quotas is not None and self._ticket is not None:
            self.quotas.disconnect(self._ticket)
        super().connection_lost(exc)


def protocol_for(
    quotas: Quotas, header_timeout_s: float, list_state: Any = None
) -> type[PeerCredProtocol]:
    """The protocol class for a daemon with these quotas, header timeout and app state."""

    class Bound(PeerCredProtocol):
        pass

    Bound.quotas = quotas
    Bound.header_timeout_s = header_timeout_s
    Bound.list_state = list_state
    return Bound


class Server(UvicornServer):
    """uvicorn's server without its signal capture (it re-raises SIGTERM on exit)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"--socket-group: no group named {group!r}") from None


def bind_unix(path: Path, kind: int, gid: int | None) -> socket.socket:
    """Bind a listening unix socket at path, mode 0660 (0600 while binding)."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # The daemon's umask (077) would make it 0700 and lock out the socket
        # group; the sockets' own 0660 mode is what guards access.
        os.chmod(path.parent, 0o755)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
        try:
            probe.connect(str(path))
        except OSError:
            os.unlink(path)  # stale socket of a daemon that is gone
        else:
            raise StartupError(f"another daemon is serving {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    # The umask makes bind() create the node 0600: nobody else can connect
    # in the instant before chmod narrows group access in.
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, 0, gid)
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock


def bind_tcp(listen: str) -> socket.socket:
    """Bind the optional TCP listener given as tcp://HOST:PORT."""
    if not listen.startswith("tcp://"):
        raise StartupError(f"--listen {listen!r}: expected tcp://HOST:PORT")
    host, sep, port = listen[len("tcp://") :].rpartition(":")
    if not sep or not port.isdigit():
        raise StartupError(f"--listen {listen!r}: expected tcp://HOST:PORT")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        raise StartupError(f"--listen {listen!r}: {e.strerror or e}") from e
    return sock


def read_token(path: Path | None) -> str:
    """Read the TCP bearer token; refuse a missing, short or world-readable one."""
    if path is None:
        raise StartupError("--listen needs --token-file: the TCP listener is never open")
    try:
        st = os.stat(path)
        token = path.read_text().strip()
    except OSError as e:
        raise StartupError(f"--token-file {path}: {e.strerror}") from e
    if st.st_mode & 0o077:
        raise StartupError(f"--token-file {path} is readable by others; chmod 600 it")
    if len(token) < 16:
        raise StartupError(f"--token-file {path}: the token must be at least 16 characters")
    return token


def systemd_sockets() -> dict[int, socket.socket]:
    """Sockets passed by systemd socket activation, keyed by SO_TYPE."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    count = int(os.environ.get("LISTEN_FDS", "0"))
    out: dict[int, socket.socket] = {}
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise StartupError(f"socket activation: fd {fd} is not a socket ({e.strerror})") from e
        if sock.family != socket.AF_UNIX or sock.type in out:
            raise StartupError(
                f"socket activation: fd {fd} must be one unix stream (API) and one "
                "unix seqpacket (fds) socket"
            )
        out[sock.type] = sock
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return out


async def _start_service(settings: Settings) -> CriudService:
    """Start the daemon's service; what stops it becomes a StartupError that says what to do."""
    core = CriudService(settings)
    try:
        await core.start()
    except CriuUnavailable as e:
        raise StartupError(
            f"{e.detail}\ncriud needs criu >= 4.2 passing `criu check`; "
            "run deploy/install-criu (as root) or pass --criu PATH"
        ) from e
    except StoreError as e:
        raise StartupError(f"{e}; move it away to start with an empty one") from e
    except sqlite3.DatabaseError as e:
        # Damage past the header shows only once the first query reads it.
        raise StartupError(f"the database {settings.db_path} is unusable: {e}") from e
    return core


def _unix_sockets(
    settings: Settings, activated: dict[int, socket.socket], bound: list[Path]
) -> tuple[socket.socket, socket.socket]:
    """The API and fd sockets: systemd's, or bound here (their paths added to bound)."""
    gid = _group_id(settings.socket_group)
    api_sock = activated.get(socket.SOCK_STREAM)
    if api_sock is None:
        api_sock = bind_unix(settings.socket, socket.SOCK_STREAM, gid)
        bound.append(settings.socket)
    fd_sock = activated.get(socket.SOCK_SEQPACKET)
    if fd_sock is None:
        fd_sock = bind_unix(settings.fd_socket, socket.SOCK_SEQPACKET, gid)
        bound.append(settings.fd_socket)
    return api_sock, fd_sock


def _uvicorn_config(
    app: Any, core: CriudService, settings: Settings, list_state: Any = None
) -> UvicornConfig:
    return UvicornConfig(
        app,
        http=protocol_for(core.quotas, settings.header_timeout_s, list_state),
        lifespan="off",
        log_level=settings.log_level,
        # JSON: uvicorn's loggers get no handlers of their own and reach the
        # root's, so every line on stderr is one JSON object.
        log_config=None if settings.log_format == "json" else LOGGING_CONFIG,
        access_log=settings.log_level == "debug",
        ws="none",
        # No proxy stands in front of criud: the peer is the socket's.
        # uvicorn's default trusts X-Forwarded-For from 127.0.0.1, which let
        # a local TCP peer name another address as itself (the page server
        # of an incoming migration takes only the requester's).  One
        # middleware fewer on every request, too.
        proxy_headers=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        # No limit_concurrency: it counts every connection alike, so one
        # caller's idle connections made everyone's requests 503.  The pools
        # of criud.daemon.quotas bound each caller instead.  A small backlog:
        # asyncio accepts up to this many at a time, each an fd until the
        # pools close the excess ones.
        limit_concurrency=None,
        backlog=128,
    )


def _on_stop_signals(loop: asyncio.AbstractEventLoop, core: CriudService, server: Server) -> None:
    """SIGTERM and SIGINT only record the request; the serve loop winds down."""

    def request_stop(signame: str) -> None:
        # Record only; the serve loop notices should_exit and winds down.
        log.info("%s: stopping (in-flight operations may finish)", signame)
        core.accepting = False
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)


async def _serve(settings: Settings) -> None:
    # Take systemd's sockets before anything else opens an fd.
    activated = systemd_sockets()
    core = await _start_service(settings)
    bound: list[Path] = []
    api_sock, fd_sock = _unix_sockets(settings, activated, bound)

    tcp_sock: socket.socket | None = None
    token: str | None = None
    if settings.listen:
        token = read_token(settings.token_file)
        tcp_sock = bind_tcp(settings.listen)

    fd_server = FdSocketServer(
        fd_sock,
        core.handles,
        settings.handle_ttl_s,
        settings.handle_ttl_max_s,
        core.quotas,
        core.record,
    )
    fd_server.start()

    app = create_app(core, token=token)
    # The polled list is answered from its cached bytes ahead of FastAPI.
    # Its cached hits are answered by the protocol itself (_answer_list).
    server = Server(_uvicorn_config(FastList(app, app.state), core, settings, app.state))

    loop = asyncio.get_running_loop()
    _on_stop_signals(loop, core, server)
    log.info(
        "criud serving on %s (fds on %s), state in %s, criu %s at %s",
        settings.socket,
        settings.fd_socket,
        settings.state_dir,
        core.criu.version,
        core.criu.path,
    )
    # Everything alive now (modules, the app, its routes and models) lives as
    # long as the daemon: keep it out of the collector's full passes, which
    # a request building ten thousand objects (a big tree's introspection)
    # would otherwise pay for by scanning the whole heap.
    gc.freeze()
    # What start-up built and dropped (kernel probes, recovery) leaves free
    # pages in the middle of the heap: give them back before idling.
    memory.release()
    try:
        await server.serve(sockets=[api_sock, *([tcp_sock] if tcp_sock else [])])
    finally:
        await fd_server.stop()
        await core.stop()
        for sock in (fd_sock, api_sock, tcp_sock):
            if sock is not None:
                sock.close()
        for p in bound:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def use_pidfd_child_watcher() -> None:
    """Have asyncio wait for children through pidfds (Python < 3.12, where it is not the default).

    Python 3.11's default, ThreadedChildWatcher, starts a thread per child
    and waits for it to run: measured here at a median of 3.2 ms per spawn
    (0.4 ms with pidfds), with the event loop blocked meanwhile, on every
    criu run, and right in the middle of a restore request when an fd
    handle's worker starts (issue 13).  3.12 picks pidfds by itself.
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return  # a kernel without pidfds: keep the default
    asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


def serve(settings: Settings) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the process exit status."""
    # Before any thread (criud.daemon.memory says why).
    memory.one_heap()
    logfmt.setup(settings.log_level, settings.log_format)
    if os.geteuid() != 0:
        print("criud serve: must run as root (criu needs CAP_SYS_ADMIN)", file=sys.stderr)
        return 1
    # Everything the daemon creates is private unless chmod'ed on purpose.
    os.umask(0o077)
    # Each connection and each handed-in fd is one of ours: take all the
    # room the hard limit gives (the budget in criud.daemon.quotas keeps
    # callers from using it up).
    log.info("fd limit (RLIMIT_NOFILE): %d", raise_nofile())
    procutil.set_child_subreaper()
    use_pidfd_child_watcher()
    try:
        asyncio.run(_serve(settings))
    except StartupError as e:
        print(f"criud serve: {e}", file=sys.stderr)
        return 1
    return 0
