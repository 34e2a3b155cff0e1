"""Real users for security tests: created with useradd, removed at the end.

Every security test acts as a real second (and third) user that belongs to
the daemon's socket group, through the real sockets, with a process of its
own: the attacker of docs/security.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

from tests.integration.helpers import CALLS, Daemon, Procs, _shared_src, uid_of, wait_for


@dataclasses.dataclass(frozen=True)
class User:
    """A throwaway account: name, ids, and its full group list."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    def setpriv(self) -> list[str]:
        """A setpriv prefix that becomes this user with all its groups."""
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            f"--groups={','.join(map(str, self.groups))}",
        ]


@dataclasses.dataclass(frozen=True)
class Accounts:
    """The socket group, two extra groups, and the users the tests act as."""

    sock_group: str
    sock_gid: int
    extra_gids: tuple[int, int]
    # In the socket group and in both extra groups.
    alice: User
    # In the socket group only.
    bob: User
    # Not in the socket group: the sockets must refuse it.
    carol: User


def _run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, timeout=60)


def _gid(name: str) -> int:
    import grp

    return grp.getgrnam(name).gr_gid


def _user(name: str, groups: Sequence[str]) -> User:
    args = ["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/bin/false"]
    args += ["--user-group"]
    if groups:
        args += ["--groups", ",".join(groups)]
    _run(*args, name)
    pw = pwd.getpwnam(name)
    gids = tuple(sorted({pw.pw_gid, *(_gid(g) for g in groups)}))
    return User(name=name, uid=pw.pw_uid, gid=pw.pw_gid, groups=gids)


@contextlib.contextmanager
def accounts() -> Iterator[Accounts]:
    """Create the test's groups and users; remove them afterwards, whatever happens."""
    tag = secrets.token_hex(3)
    sock, g1, g2 = f"cdsock{tag}", f"cdga{tag}", f"cdgb{tag}"
    users = [f"cdalice{tag}", f"cdbob{tag}", f"cdcarol{tag}"]
    made_groups: list[str] = []
    made_users: list[str] = []
    try:
        for g in (sock, g1, g2):
            _run("groupadd", g)
            made_groups.append(g)
        alice = _user(users[0], [sock, g1, g2])
        made_users.append(users[0])
        bob = _user(users[1], [sock])
        made_users.append(users[1])
        carol = _user(users[2], [])
        made_users.append(users[2])
        yield Accounts(
            sock_group=sock,
            sock_gid=_gid(sock),
            extra_gids=(_gid(g1), _gid(g2)),
            alice=alice,
            bob=bob,
            carol=carol,
        )
    finally:
        for u in made_users:
            # Processes of the user are the tests' own; they were killed by pid.
            subprocess.run(["userdel", "--force", u], capture_output=True, timeout=60)
            subprocess.run(["groupdel", u], capture_output=True, timeout=60)
        for g in made_groups:
            subprocess.run(["groupdel", g], capture_output=True, timeout=60)


def run_as(
    user: User, code: str, *args: str, timeout: float = 120, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run `python -c code args` as user, with all of its groups, on a readable copy of criud."""
    import sys

    return subprocess.run(
        [*user.setpriv(), os.path.realpath(sys.executable), "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(_shared_src())},
        **kw,
    )


def calls_as(user: User, daemon: Daemon, calls: list[tuple[str, str, Any]]) -> list[Any]:
    """Make API calls as user through the daemon's real unix socket."""
    out = run_as(user, CALLS, str(daemon.socket), str(daemon.fd_socket), json.dumps(calls))
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def call_as(
    user: User, daemon: Daemon, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    """One API call as user: (status, body)."""
    ((status, doc),) = calls_as(user, daemon, [(method, path, body)])
    return int(status), doc


def spawn_as(procs: Procs, user: User, argv: Sequence[str], **kw: Any) -> int:
    """Start argv as user (all its groups) in cwd /; return its pid once it runs as user."""
    kw.setdefault("cwd", "/")
    p = procs.spawn([*user.setpriv(), *argv], **kw)
    wait_for(lambda: uid_of(p.pid) == user.uid, 10, what=f"pid {p.pid} to run as {user.name}")
    return p.pid
