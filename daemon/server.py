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

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from criud.api.app import create_app
from criud.daemon import procutil
from criud.daemon.caller import Caller
from criud.daemon.config import Settings
from criud.daemon.core import Core
from criud.daemon.errors import CriuUnavailable
from criud.daemon.fdpass import peer_creds
from criud.daemon.fdsock import FdSocketServer
from criud.daemon.store import StoreError

log = logging.getLogger("criud")

SD_LISTEN_FDS_START = 3


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class PeerCredProtocol(H11Protocol):
    """H11 protocol that puts the peer's SO_PEERCRED into every request's state.

    uvicorn copies ``app_state`` into each request's scope["state"]; giving
    each connection its own copy with the caller in it makes the credentials
    available as request.state.peer without touching the ASGI app.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock: Any = transport.get_extra_info("socket")
        peer: Caller | None = None
        tcp = False
        if sock is not None and sock.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                pid, uid, gid = peer_creds(sock)
                peer = Caller(uid=uid, gid=gid, pid=pid)
        elif sock is not None:
            # TCP: no credentials to read; the bearer token decides (api.deps).
            tcp = True
        self.app_state = {**self.app_state, "peer": peer, "tcp": tcp}


class Server(uvicorn.Server):
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


async def _serve(settings: Settings) -> None:
    # Take systemd's sockets before anything else opens an fd.
    activated = systemd_sockets()
    core = Core(settings)
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

    gid = _group_id(settings.socket_group)
    bound: list[Path] = []
    api_sock = activated.get(socket.SOCK_STREAM)
    if api_sock is None:
        api_sock = bind_unix(settings.socket, socket.SOCK_STREAM, gid)
        bound.append(settings.socket)
    fd_sock = activated.get(socket.SOCK_SEQPACKET)
    if fd_sock is None:
        fd_sock = bind_unix(settings.fd_socket, socket.SOCK_SEQPACKET, gid)
        bound.append(settings.fd_socket)

    tcp_sock: socket.socket | None = None
    token: str | None = None
    if settings.listen:
        token = read_token(settings.token_file)
        tcp_sock = bind_tcp(settings.listen)

    fd_server = FdSocketServer(
        fd_sock, core.handles, settings.handle_ttl_s, settings.handle_ttl_max_s, core.record
    )
    fd_server.start()

    app = create_app(core, token=token)
    config = uvicorn.Config(
        app,
        http=PeerCredProtocol,
        lifespan="off",
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        ws="none",
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        limit_concurrency=1024,
    )
    server = Server(config)

    loop = asyncio.get_running_loop()

    def request_stop(signame: str) -> None:
        # Record only; the serve loop notices should_exit and winds down.
        log.info("%s: stopping (in-flight operations may finish)", signame)
        core.accepting = False
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)
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
    try:
        await server.serve(sockets=[api_sock, *([tcp_sock] if tcp_sock else [])])
    finally:
        await fd_server.stop()
        await core.stop()
        fd_sock.close()
        api_sock.close()
        if tcp_sock is not None:
            tcp_sock.close()
        for p in bound:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def serve(settings: Settings) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the process exit status."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if os.geteuid() != 0:
        print("criud serve: must run as root (criu needs CAP_SYS_ADMIN)", file=sys.stderr)
        return 1
    # Everything the daemon creates is private unless chmod'ed on purpose.
    os.umask(0o077)
    procutil.set_child_subreaper()
    try:
        asyncio.run(_serve(settings))
    except StartupError as e:
        print(f"criud serve: {e}", file=sys.stderr)
        return 1
    return 0
