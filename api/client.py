"""A small Python client for criud (stdlib only).

    from criud.api.client import Client
    c = Client()                                   # /run/criud/criud.sock
    ck = c.checkpoint(pid, name="web", leave_running=True)
    r = c.restore("web", fds={"pipe:[823441]": new_write_end})

`restore(..., fds=...)` does both steps of the hand-off: it sends the fds over
the fd socket (SCM_RIGHTS), then names in the HTTP request what each one
replaces.  Keys are CRIU keys ("pipe:[123]", "var/log/app.log") or (pid, fd)
pairs as they were at dump time; values are fds or objects with fileno().
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO, Protocol

from criud.daemon.config import DEFAULT_FD_SOCKET, DEFAULT_SOCKET
from criud.daemon.fdpass import send_fds

# How much of an archive is read or written at a time.
ARCHIVE_CHUNK = 1 << 20
# How often an export's progress asks for its operation's (compressed archives).
PROGRESS_POLL_S = 0.25
# progress(done_bytes, total_bytes or None), after each chunk of an archive.
ProgressFn = Callable[[int, int | None], None]

# `wait_operation` polls at first often (most operations are short), then
# backs off to this at most.
WAIT_POLL_MAX_S = 1.0
# The query a POST adds for wait=False (the default, True, adds none).
_NO_WAIT = {True: "", False: "?wait=false"}


class HasFileno(Protocol):
    def fileno(self) -> int: ...


FdLike = int | HasFileno
InheritKey = str | tuple[int, int]


class CriudClientError(Exception):
    """An error answer from the daemon (a problem+json document)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.code: str = str(problem.get("code", "unknown"))
        self.title: str = str(problem.get("title", ""))
        self.detail: str = str(problem.get("detail", ""))
        super().__init__(f"{status} {self.code}: {self.detail}")


class UnixConnection(http.client.HTTPConnection):
    """An HTTP connection to the daemon's unix socket (the client's; tests and bench use it too)."""

    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _checkpoint_path(ref: str, tail: str = "", query: Mapping[str, str] | None = None) -> str:
    """The path of a checkpoint; "owner/name" becomes name?owner=owner.

    A path segment cannot carry the slash (the server would route on it).
    """
    owner, sep, name = ref.partition("/")
    q = dict(query or {})
    if sep:
        q["owner"] = owner
    else:
        name = ref
    path = f"/v1/checkpoints/{urllib.parse.quote(name, safe='')}{tail}"
    return path + (f"?{urllib.parse.urlencode(q)}" if q else "")


def _fileno(f: FdLike) -> int:
    return f if isinstance(f, int) else f.fileno()


class Client:
    """Talks to one criud over its API socket and its fd socket."""

    def __init__(
        self,
        socket_path: str = str(DEFAULT_SOCKET),
        fd_socket_path: str = str(DEFAULT_FD_SOCKET),
        timeout: float | None = 600.0,
    ) -> None:
        self.socket_path = socket_path
        self.fd_socket_path = fd_socket_path
        self.timeout = timeout

    # -- plumbing ---------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Send one request; return (status, decoded body).  Raises on 4xx/5xx."""
        conn = UnixConnection(self.socket_path, self.timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            payload = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            ctype = resp.getheader("Content-Type", "")
        finally:
            conn.close()
        data: Any = raw.decode("utf-8", "replace")
        if "json" in ctype and raw:
            data = json.loads(raw)
        if resp.status >= 400:
            problem = data if isinstance(data, dict) else {"detail": str(data)}
            raise CriudClientError(resp.status, problem)
        return resp.status, data

    def send_fds(
        self, fds: Sequence[FdLike], ttl_s: float | None = None, names: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Hand fds to the daemon; return {"handle", "count", "expires_in_s"}."""
        payload: dict[str, Any] = {}
        if ttl_s is not None:
            payload["ttl_s"] = ttl_s
        if names is not None:
            payload["names"] = list(names)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            if self.timeout is not None:
                s.settimeout(self.timeout)
            s.connect(self.fd_socket_path)
            # Refused on connect (over its quota), the daemon answers and
            # closes before our message goes: its answer is still queued.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                send_fds(s, json.dumps(payload).encode(), [_fileno(f) for f in fds])
            reply = json.loads(s.recv(65536) or b"{}")
        if "error" in reply:
            err = reply["error"]
            raise CriudClientError(400, {"code": err.get("code"), "detail": err.get("message")})
        return dict(reply)

    # -- API ----------------------------------------------------------------------

    def version(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/version")[1])

    def checkpoint(
        self, pid: int, name: str | None = None, wait: bool = True, **options: Any
    ) -> dict[str, Any]:
        """Checkpoint the tree of pid; options as in POST /v1/checkpoints.

        wait=False: start it and return the operation (?wait=false) to follow.
        """
        body = {"pid": pid, **options}
        if name is not None:
            body["name"] = name
        return dict(self.request("POST", "/v1/checkpoints" + _NO_WAIT[wait], body)[1])

    def migrate(
        self,
        url: str,
        token: str,
        pid: int | None = None,
        checkpoint: str | None = None,
        wait: bool = True,
        **options: Any,
    ) -> dict[str, Any]:
        """Move the tree of pid (or a checkpoint) to the daemon at url (its TCP listener).

        Root's only.  options as in POST /v1/migrations (name, leave_running,
        tls, ...).  wait=False: start it and return the operation to follow.
        """
        body: dict[str, Any] = {"target": {"url": url, "token": token}, **options}
        if pid is not None:
            body["pid"] = pid
        if checkpoint is not None:
            body["checkpoint"] = checkpoint
        return dict(self.request("POST", "/v1/migrations" + _NO_WAIT[wait], body)[1])

    def preflight(self, pid: int, **options: Any) -> dict[str, Any]:
        """What would block a checkpoint of pid (options as for checkpoint, plus pre_dump)."""
        return dict(self.request("POST", "/v1/checkpoints/preflight", {"pid": pid, **options})[1])

    def inspect_pid(self, pid: int) -> dict[str, Any]:
        """The process tree rooted at pid, with every fd classified."""
        return dict(self.request("GET", f"/v1/processes/{pid}")[1])

    def checkpoints(self, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        q = "&".join(f"label={k}={v}" for k, v in (labels or {}).items())
        return list(self.request("GET", "/v1/checkpoints" + (f"?{q}" if q else ""))[1])

    def inspect(self, ref: str) -> dict[str, Any]:
        """One checkpoint: ref is an id, a name of the caller's own, or "owner/name"."""
        return dict(self.request("GET", _checkpoint_path(ref))[1])

    def delete(self, ref: str) -> None:
        self.request("DELETE", _checkpoint_path(ref))

    def delete_matching(
        self,
        older_than: str | None = None,
        labels: Mapping[str, str] | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """Delete the caller's checkpoints matching every filter: {"deleted", "skipped"}."""
        q: list[tuple[str, str]] = [("label", f"{k}={v}") for k, v in (labels or {}).items()]
        if older_than is not None:
            q.append(("older_than", older_than))
        if owner is not None:
            q.append(("owner", owner))
        path = "/v1/checkpoints" + (f"?{urllib.parse.urlencode(q)}" if q else "")
        return dict(self.request("DELETE", path)[1])

    def log(self, ref: str, op: str = "dump") -> str:
        return str(self.request("GET", _checkpoint_path(ref, "/log", {"op": op}))[1])

    def restore(
        self,
        checkpoint: str,
        fds: Mapping[InheritKey, FdLike] | None = None,
        paths: Mapping[str, tuple[str, str]] | None = None,
        inherit_fds: Sequence[dict[str, Any]] = (),
        stdio: Sequence[FdLike] | None = None,
        wait: bool = True,
        **fields: Any,
    ) -> dict[str, Any]:
        """Restore checkpoint, replacing external resources (wait=False: return the operation).

        fds maps a key or a (pid, fd) pair to a fresh fd; they are sent over
        the fd socket first.  stdio, three fds, replaces the root task's
        fds 0, 1 and 2 (sent as one handle: the "stdio" shorthand).  paths
        maps a key to (path, mode) for the daemon to open.  inherit_fds
        passes raw mappings through; other keyword arguments (cgroup, oci)
        go into the request body as they are.
        """
        mappings: list[dict[str, Any]] = list(inherit_fds)
        if fds:
            keys = list(fds)
            sent = self.send_fds([fds[k] for k in keys])
            for i, k in enumerate(keys):
                m: dict[str, Any] = {"handle": sent["handle"], "index": i}
                if isinstance(k, tuple):
                    m["pid"], m["fd"] = k
                else:
                    m["key"] = k
                mappings.append(m)
        for key, (path, mode) in (paths or {}).items():
            mappings.append({"key": key, "path": path, "mode": mode})
        if stdio is not None:
            fields["stdio"] = {"handle": self.send_fds(list(stdio))["handle"]}
        body = {"checkpoint": checkpoint, "inherit_fds": mappings, **fields}
        return dict(self.request("POST", "/v1/restores" + _NO_WAIT[wait], body)[1])

    def restores(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/restores")[1])

    def get_restore(self, restore_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/restores/{restore_id}")[1])

    def signal(self, restore_id: str, sig: int | str) -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/restores/{restore_id}/signal", {"signal": sig})[1])

    def fd_handles(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/fd-handles")[1])

    def delete_fd_handle(self, handle: str) -> None:
        self.request("DELETE", f"/v1/fd-handles/{handle}")

    # -- archives --------------------------------------------------------------------

    def export(
        self,
        ref: str,
        out: BinaryIO,
        compression: str = "zstd",
        progress: ProgressFn | None = None,
    ) -> int:
        """Write checkpoint ref's archive to out as it streams; return its bytes.

        progress(done, total) is called as chunks come.  An uncompressed
        archive counts its own bytes (its Content-Length the total); a
        compressed one, whose size is known only at its end, reports its
        export operation's progress instead (bytes of the tar read, out of
        the tar's size), polled at most every PROGRESS_POLL_S.  A stream
        cut short raises http.client.IncompleteRead: what was written is
        not a whole archive.
        """
        q = {"compression": compression}
        conn = UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request("GET", _checkpoint_path(ref, "/archive", q))
            resp = conn.getresponse()
            if resp.status >= 400:
                raise CriudClientError(resp.status, _problem(resp.read()))
            length = resp.getheader("Content-Length")
            total = int(length) if length is not None and length.isdigit() else None
            op_id = resp.getheader("X-Criud-Operation")
            done, polled = 0, 0.0
            while chunk := resp.read(ARCHIVE_CHUNK):
                out.write(chunk)
                done += len(chunk)
                if progress is None:
                    continue
                if total is not None or op_id is None:
                    progress(done, total)
                elif time.monotonic() - polled >= PROGRESS_POLL_S:
                    polled = time.monotonic()
                    p = self.operation(op_id).get("progress") or {}
                    progress(int(p.get("bytes_done") or 0), p.get("bytes_total"))
            if total is not None and done != total:
                raise http.client.IncompleteRead(b"", total - done)
            return done
        finally:
            conn.close()

    def import_archive(
        self,
        src: BinaryIO,
        name: str | None = None,
        size: int | None = None,
        digest: str | None = None,
        progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        """Send an archive (any compression) as a new checkpoint; return the checkpoint.

        size sets Content-Length (else the body is chunked); digest, the
        base64 sha-256 of the whole body, is sent as Content-Digest for
        the daemon to check.
        """
        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            headers["Content-Length"] = str(size)
        if digest is not None:
            headers["Content-Digest"] = f"sha-256=:{digest}:"

        def body() -> Iterator[bytes]:
            done = 0
            while chunk := src.read(ARCHIVE_CHUNK):
                done += len(chunk)
                yield chunk
                if progress is not None:
                    progress(done, size)

        path = "/v1/checkpoints/import" + (
            f"?{urllib.parse.urlencode({'name': name})}" if name is not None else ""
        )
        conn = UnixConnection(self.socket_path, self.timeout)
        try:
            # The daemon may answer (a refusal) before it has taken the whole body.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.request("POST", path, body=body(), headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.status >= 400:
            raise CriudClientError(resp.status, _problem(raw))
        return dict(json.loads(raw))

    # -- operations and events -------------------------------------------------------

    def operation(self, op_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/operations/{urllib.parse.quote(op_id, safe='')}")[1])

    def cancel_operation(self, op_id: str) -> dict[str, Any]:
        """DELETE the operation: cancel it; the operation once it has unwound."""
        path = f"/v1/operations/{urllib.parse.quote(op_id, safe='')}"
        return dict(self.request("DELETE", path)[1])

    def wait_operation(self, op_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Poll the operation until it has ended; TimeoutError past timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.05
        while True:
            op = self.operation(op_id)
            if op.get("state") != "running":
                return op
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TimeoutError(f"operation {op_id} still running after {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, WAIT_POLL_MAX_S)

    def events(self, since: int | None = None) -> Iterator[dict[str, Any]]:
        """Follow GET /v1/events: each event's data, as a dict, until the stream ends.

        The daemon sends a keepalive every 15 s, so the client's timeout (if
        any longer than that) only ends a stream whose daemon stopped talking.
        """
        conn = UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request("GET", "/v1/events" + (f"?since={since}" if since is not None else ""))
            resp = conn.getresponse()
            if resp.status >= 400:
                raw = resp.read()
                raise CriudClientError(resp.status, _problem(raw))
            yield from _sse_events(resp)
        finally:
            conn.close()


def _problem(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    return doc if isinstance(doc, dict) else {"detail": raw.decode("utf-8", "replace")}


def _sse_events(resp: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The messages of a Server-Sent Events stream: data as JSON, with its event and id."""
    fields: dict[str, str] = {}
    data: list[str] = []
    for raw in resp:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith(":"):
            continue  # a comment: the greeting, keepalives
        if line:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value
            continue
        if data:
            doc = json.loads("\n".join(data))
            if not isinstance(doc, dict):
                doc = {"data": doc}
            doc.setdefault("event", fields.get("event", "message"))
            if "id" in fields:
                ident = fields["id"]
                doc.setdefault("id", int(ident) if ident.isdigit() else ident)
            yield doc
        fields, data = {}, []
