"""Images dirs are hostile once a user could write to them (issue 11, images).

criud runs criu as a tree's owner (root lacks CAP_SYS_RESOURCE here), and
the release before this fix chowned the checkpoint's images dir to that
owner for the dump and for every restore.  The owner cannot reach the dir by
path (the state dir is 0700 root), but any fd of it (one criu or a restored
process leaked, or /proc/<pid>/fd of a process of his) is enough to plant
symlinks or overwrite files in it.  These tests stand in for "bob got an fd
of his checkpoint's dir": the test, as root, opens the dir and hands the fd
to a process running as bob, which then does only what bob's own
credentials allow with it.  Where the daemon's own defences (O_NOFOLLOW,
type checks, the pid check) are tested independently of the sealing, the
test itself plants the file as root, standing for tampering done while the
dir was still bob's (during his own dump); each docstring says which.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from tests.integration.helpers import Daemon, Procs, pid_gone, proc_state, wait_for
from tests.security.users import Accounts, User, call_as, calls_as, run_as, uid_of

SECRET = "root-only secret 5f1c\n"

# Runs as bob with an fd of his checkpoint's dir (argv[1]): tries to plant
# a symlink `name` -> target; prints "planted" or the errno name.
PLANT = r"""
import errno, os, sys
fd, name, target = int(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    try:
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass
    os.symlink(target, name, dir_fd=fd)
    print("planted")
except OSError as e:
    print(errno.errorcode[e.errno])
"""

# Runs as bob: for every entry of the dir (fd argv[1]) tries to open it for
# writing; prints one "name:outcome" per entry.
WRITE_ALL = r"""
import errno, os, sys
fd = int(sys.argv[1])
for name in sorted(os.listdir(fd)):
    try:
        os.close(os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd))
        print(f"{name}:opened")
    except OSError as e:
        print(f"{name}:{errno.errorcode[e.errno]}")
try:
    os.close(os.open("new-file", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=fd))
    print("new-file:created")
except OSError as e:
    print(f"new-file:{errno.errorcode[e.errno]}")
"""

# Runs as bob until argv[4] (a monotonic deadline): keeps a symlink
# argv[2] -> argv[3] in the dir of fd argv[1]; prints how often it planted.
RACE_SYMLINK = r"""
import os, sys, time
fd, name, target, until = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
n = 0
while time.monotonic() < until:
    try:
        os.symlink(target, name, dir_fd=fd)
        n += 1
    except FileExistsError:
        pass
    except OSError:
        time.sleep(0.001)
print(n)
"""

# Runs as bob until argv[4]: whenever argv[2] exists in the dir of fd
# argv[1], replaces it atomically (write a temp file, rename over) with
# argv[3]; prints how often it did.
RACE_OVERWRITE = r"""
import os, sys, time
fd, name, data, until = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode(), float(sys.argv[4])
n = 0
while time.monotonic() < until:
    try:
        os.stat(name, dir_fd=fd, follow_symlinks=False)
        f = os.open(".x", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=fd)
        os.write(f, data)
        os.close(f)
        os.rename(".x", name, src_dir_fd=fd, dst_dir_fd=fd)
        n += 1
    except OSError:
        pass
print(n)
"""


def _ck_dir(daemon: Daemon, ck_id: str) -> Path:
    return daemon.state_dir / "checkpoints" / ck_id


@contextlib.contextmanager
def _dir_fd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _root_secret() -> Iterator[Path]:
    """A root-owned 0600 file in a root-only temp dir, standing for /etc/shadow."""
    d = Path(tempfile.mkdtemp(prefix="criud-secret-", dir="/tmp"))
    try:
        f = d / "secret"
        f.write_text(SECRET)
        f.chmod(0o600)
        yield f
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def _bob_dump(users: Accounts, daemon: Daemon, procs: Procs, **opts: Any) -> dict[str, Any]:
    # Without supplementary groups: criu, run as bob with --clear-groups,
    # cannot restore a tree that has some ("Can't setgroups"); passing the
    # tree's groups is another part of issue 11, not this file's subject.
    bob = users.bob
    pid = procs.spawn(
        ["setpriv", f"--reuid={bob.uid}", f"--regid={bob.gid}", "--clear-groups", "sleep", "1000"],
        cwd="/",
    ).pid
    wait_for(lambda: uid_of(pid) == bob.uid, 10, what="sleep to run as bob")
    st, ck = call_as(users.bob, daemon, "POST", "/v1/checkpoints", {"pid": pid, **opts})
    assert st == 201, ck
    if not opts.get("leave_running"):
        # criu killed it; reap it (it is the test's child) so its pid is free.
        next(p for p in procs.popens if p.pid == pid).wait(timeout=10)
    return ck


def _as_bob_with_fd(user: User, fd: int, code: str, *args: str) -> str:
    out = run_as(user, code, str(fd), *args, pass_fds=(fd,), timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _restore(user: User, daemon: Daemon, procs: Procs, ck_id: str) -> tuple[int, Any]:
    st, r = call_as(user, daemon, "POST", "/v1/restores", {"checkpoint": ck_id})
    if st == 201 and r.get("pid"):
        procs.adopt(r["pid"])
    return st, r


def _kill_restore(user: User, daemon: Daemon, r: dict[str, Any]) -> None:
    """Kill a restored tree through the API and wait until the daemon reaped it."""
    st, body = call_as(user, daemon, "POST", f"/v1/restores/{r['id']}/signal", {"signal": 9})
    assert st == 200, body
    wait_for(lambda: pid_gone(r["pid"]), 10, what=f"restored pid {r['pid']} to be reaped")


def _racer(procs: Procs, user: User, fd: int, code: str, *args: str) -> subprocess.Popen[bytes]:
    return procs.spawn(
        [*user.setpriv(), os.path.realpath(sys.executable), "-c", code, str(fd), *args],
        pass_fds=(fd,),
        stdout=subprocess.PIPE,
        cwd="/",
    )


def _sealed(path: Path) -> None:
    """The dir and every file in it are root's and nobody else may write them."""
    st = os.lstat(path)
    assert (st.st_uid, st.st_gid) == (0, 0), path
    assert stat.S_IMODE(st.st_mode) == 0o755, oct(st.st_mode)
    for f in path.iterdir():
        fs = os.lstat(f)
        assert stat.S_ISREG(fs.st_mode), f
        assert (fs.st_uid, fs.st_gid) == (0, 0), f
        assert stat.S_IMODE(fs.st_mode) & 0o022 == 0, (f, oct(fs.st_mode))


# -- (a) read ------------------------------------------------------------------


def test_symlinked_dump_log_never_reads_root_file(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    """bob, given an fd of his checkpoint's dir, cannot make GET .../log read a root file.

    Before the fix the dir was bob's after the dump: the symlink went in and
    the daemon followed it as root.  Now the dir is sealed (root's, 0755):
    his attempt fails, and every file is root's and not writable by him.
    """
    ck = _bob_dump(users, sdaemon, procs)
    ck_dir = _ck_dir(sdaemon, ck["id"])
    with _root_secret() as secret, _dir_fd(ck_dir) as fd:
        planted = _as_bob_with_fd(users.bob, fd, PLANT, "dump.log", str(secret)).strip()
        st, body = call_as(users.bob, sdaemon, "GET", f"/v1/checkpoints/{ck['id']}/log")
        assert SECRET.strip() not in str(body)
        assert planted == "EACCES"
        assert st == 200 and "dump" in body
        # Every file: bob cannot open it for writing nor add one.
        outcome = _as_bob_with_fd(users.bob, fd, WRITE_ALL).split()
        assert outcome and all(line.endswith(":EACCES") for line in outcome), outcome
    _sealed(ck_dir)


def test_log_symlink_or_fifo_is_refused_not_followed(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    """The log is read through the dir fd, O_NOFOLLOW, regular files only, bounded.

    Planted by the test as root: it stands for a dump.log bob swapped while
    the dir was still his, during his dump.  A symlink to a root file and a
    fifo (which would hang a plain open) both get a clear 4xx.
    """
    ck = _bob_dump(users, sdaemon, procs)
    log = _ck_dir(sdaemon, ck["id"]) / "dump.log"
    with _root_secret() as secret:
        log.unlink()
        log.symlink_to(secret)
        t0 = time.monotonic()
        st, body = call_as(users.bob, sdaemon, "GET", f"/v1/checkpoints/{ck['id']}/log")
        assert SECRET.strip() not in str(body)
        assert 400 <= st < 500 and body["code"] == "checkpoint_tampered", (st, body)
        log.unlink()
        os.mkfifo(log, 0o644)
        st, body = call_as(users.bob, sdaemon, "GET", f"/v1/checkpoints/{ck['id']}/log")
        assert 400 <= st < 500 and body["code"] == "checkpoint_tampered", (st, body)
        assert time.monotonic() - t0 < 30
    log.unlink()


# -- (b) chown -----------------------------------------------------------------


def test_restore_log_race_never_chowns_a_root_file(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    """A symlink raced in as restore.log while bob's restore starts never gets followed.

    bob's racer holds an fd of his checkpoint's dir (before the fix, his own
    dir) and keeps restore.log a symlink to a root-owned decoy during three
    restores.  Before the fix the daemon opened it O_CREAT without
    O_NOFOLLOW and fchowned the decoy to bob (won in 1-2 tries).  The test
    then also plants the symlink itself as root before a restore: the
    daemon replaces it with its own file.
    """
    ck = _bob_dump(users, sdaemon, procs)
    ck_dir = _ck_dir(sdaemon, ck["id"])
    with _root_secret() as decoy, _dir_fd(ck_dir) as fd:
        for _ in range(3):
            racer = _racer(
                procs,
                users.bob,
                fd,
                RACE_SYMLINK,
                "restore.log",
                str(decoy),
                str(time.monotonic() + 4),
            )
            time.sleep(0.2)
            st, r = _restore(users.bob, sdaemon, procs, ck["id"])
            racer.wait(timeout=30)
            assert os.stat(decoy).st_uid == 0, "the daemon chowned a root file to bob"
            assert decoy.read_text() == SECRET
            if st == 201:
                _kill_restore(users.bob, sdaemon, r)
        log = ck_dir / "restore.log"
        with contextlib.suppress(FileNotFoundError):
            log.unlink()
        log.symlink_to(decoy)
        st, r = _restore(users.bob, sdaemon, procs, ck["id"])
        assert st == 201, r
        _kill_restore(users.bob, sdaemon, r)
        assert os.stat(decoy).st_uid == 0 and decoy.read_text() == SECRET
        assert not log.is_symlink() and log.stat().st_uid == 0


# -- (c) kill ------------------------------------------------------------------


def test_overwritten_pidfile_never_gets_root_process_killed(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    """bob overwrites restore.pid with root's pid during his restore: root's process lives.

    The racer holds an fd of his checkpoint's dir (where criu wrote the
    pidfile before the fix; now it writes it in a root-only run dir he
    cannot reach) and overwrites restore.pid whenever it exists, during
    three restores.  Each restore must record the true restored root (bob's
    process, the checkpoint's root pid) or fail clearly, and SIGKILL
    through the API never reaches root's process.
    """
    victim = procs.spawn(["sleep", "1000"])
    ck = _bob_dump(users, sdaemon, procs)
    with _dir_fd(_ck_dir(sdaemon, ck["id"])) as fd:
        for _ in range(3):
            racer = _racer(
                procs,
                users.bob,
                fd,
                RACE_OVERWRITE,
                "restore.pid",
                str(victim.pid),
                str(time.monotonic() + 4),
            )
            time.sleep(0.2)
            st, r = _restore(users.bob, sdaemon, procs, ck["id"])
            racer.wait(timeout=30)
            if st == 201:
                st2, body = call_as(
                    users.bob, sdaemon, "POST", f"/v1/restores/{r['id']}/signal", {"signal": 9}
                )
                time.sleep(0.2)
                assert victim.poll() is None, "root's process was killed through bob's restore"
                assert st2 == 200, body
                assert r["pid"] == ck["pid"], (r, ck["pid"])
                wait_for(partial(pid_gone, int(r["pid"])), 10, what="restored pid to be reaped")
            else:
                assert 400 <= st < 500 and r["code"], r
            assert proc_state(victim.pid) in ("S", "R")


# -- (d) checkpoints of the previous release -----------------------------------


def _as_previous_release(path: Path, owner: User) -> None:
    """Leave a checkpoint dir as the release before this fix did: the owner's, 0700/0600."""
    os.chown(path, owner.uid, owner.gid)
    os.chmod(path, 0o700)
    for f in path.iterdir():
        os.chown(f, owner.uid, owner.gid, follow_symlinks=False)
        os.chmod(f, 0o600)


def test_previous_release_checkpoint_restores_and_is_sealed(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    """A checkpoint dir still owned by bob (as the previous release left it) restores, sealed."""
    ck = _bob_dump(users, sdaemon, procs)
    ck_dir = _ck_dir(sdaemon, ck["id"])
    _as_previous_release(ck_dir, users.bob)
    st, r = _restore(users.bob, sdaemon, procs, ck["id"])
    assert st == 201, r
    assert r["pid"] == ck["pid"]
    _sealed(ck_dir)
    _kill_restore(users.bob, sdaemon, r)
    # Idempotent: a second restore of the sealed dir works as well.
    st, r = _restore(users.bob, sdaemon, procs, ck["id"])
    assert st == 201, r
    _kill_restore(users.bob, sdaemon, r)
    _sealed(ck_dir)


def test_tampered_previous_release_checkpoint_is_refused(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    """A previous-release dir with a link in it is refused before criu runs, untouched.

    The test plants, as root, a hardlink to a root file and a symlink,
    standing for what bob could do to his dir before the fix.  The daemon
    refuses the restore with checkpoint_tampered and chowns nothing.
    """
    ck = _bob_dump(users, sdaemon, procs)
    ck_dir = _ck_dir(sdaemon, ck["id"])
    _as_previous_release(ck_dir, users.bob)
    with _root_secret() as secret:
        os.link(secret, ck_dir / "extra.img")
        st, r = _restore(users.bob, sdaemon, procs, ck["id"])
        assert st == 409 and r["code"] == "checkpoint_tampered", r
        assert os.stat(secret).st_uid == 0 and stat.S_IMODE(os.stat(secret).st_mode) == 0o600
        (ck_dir / "extra.img").unlink()
        (ck_dir / "extra.img").symlink_to(secret)
        st, r = _restore(users.bob, sdaemon, procs, ck["id"])
        assert st == 409 and r["code"] == "checkpoint_tampered", r
        assert os.stat(secret).st_uid == 0


def test_dump_dir_is_sealed_and_bob_sees_only_his_log(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    """After a dump: root's dir 0755 in the 0700 checkpoints dir; the log reads as before."""
    ck = _bob_dump(users, sdaemon, procs, leave_running=True)
    ck_dir = _ck_dir(sdaemon, ck["id"])
    _sealed(ck_dir)
    assert stat.S_IMODE(os.stat(ck_dir.parent).st_mode) == 0o700
    assert ck["size_bytes"] > 0 and ck["stats"]["pages_written"] > 0
    (st, body), (st2, body2) = calls_as(
        users.bob,
        sdaemon,
        [
            ("GET", f"/v1/checkpoints/{ck['id']}/log", None),
            ("GET", f"/v1/checkpoints/{ck['id']}/log?op=restore", None),
        ],
    )
    assert st == 200 and "Dumping finished successfully" in body
    assert st2 == 404 and body2["code"] == "log_not_found"
