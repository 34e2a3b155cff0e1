"""Which ids a tree holds, and what criu runs as for it: pure decisions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from criud.daemon import creds, orphans, procutil
from criud.daemon.caller import Caller
from criud.daemon.criu import RunAs, wrap_argv
from criud.daemon.errors import MixedCredentials, NeedsCapSysResource, PermissionDenied
from criud.dump.manifest import Manifest

BOB = Caller(uid=1001, gid=1001, pid=1)
ROOT = Caller(uid=0, gid=0, pid=1)


def task(u: tuple[int, ...], g: tuple[int, ...], groups: tuple[int, ...] = ()) -> creds.TaskCreds:
    return creds.TaskCreds(uids=u, gids=g, groups=groups)


def plain(uid: int, gid: int, groups: tuple[int, ...] = ()) -> creds.TaskCreds:
    return task((uid,) * 4, (gid,) * 4, groups)


def test_parse_status_reads_all_four_ids_and_sorted_groups() -> None:
    text = "Name:\tx\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t9 3 \nNSpid:\t1\n"
    assert creds.parse_status(text) == task((1, 2, 3, 4), (5, 6, 7, 8), (3, 9))
    with pytest.raises(ValueError):
        creds.parse_status("Uid:\t1\t2\n")


def test_a_users_uniform_tree_runs_criu_as_the_user_with_its_groups() -> None:
    tree = {10: plain(1001, 1001, (1001, 2000)), 11: plain(1001, 1001, (1001, 2000))}
    got = creds.choose_run_as(tree, BOB, False, "x")
    assert got == RunAs(1001, 1001, (1001, 2000))
    # Where root has CAP_SYS_RESOURCE, root's criu dumps it (as before).
    assert creds.choose_run_as(tree, BOB, True, "x") is None
    assert creds.choose_run_as(tree, ROOT, False, "x") == got


@pytest.mark.parametrize(
    "t",
    [
        task((1001, 1001, 0, 1001), (1001,) * 4),  # a saved uid of 0
        task((1001, 0, 1001, 0), (1001,) * 4),  # setuid root
        task((1001,) * 4, (1001, 5, 1001, 5)),  # setgid
        task((1001, 1001, 1001, 7), (1001,) * 4),  # another fs uid
    ],
)
def test_mixed_ids_refused_for_users_and_root(t: creds.TaskCreds) -> None:
    tree = {10: plain(1001, 1001), 11: t}
    with pytest.raises(MixedCredentials) as e:
        creds.choose_run_as(tree, BOB, False, "x")
    assert e.value.status == 403 and e.value.extra["pid"] == 11
    # Even where root's criu could dump it: the caller would get the ids back.
    with pytest.raises(MixedCredentials):
        creds.choose_run_as(tree, BOB, True, "x")
    with pytest.raises(NeedsCapSysResource):
        creds.choose_run_as(tree, ROOT, False, "x")
    assert creds.choose_run_as(tree, ROOT, True, "x") is None


def test_tasks_that_differ_from_each_other() -> None:
    ids = {10: plain(1001, 1001), 11: plain(1001, 1002)}
    with pytest.raises(MixedCredentials):
        creds.choose_run_as(ids, BOB, False, "x")
    groups = {10: plain(1001, 1001, (1,)), 11: plain(1001, 1001, (2,))}
    with pytest.raises(MixedCredentials):
        creds.choose_run_as(groups, BOB, False, "x")
    # Root's criu restores each task's groups itself.
    assert creds.choose_run_as(groups, BOB, True, "x") is None
    with pytest.raises(NeedsCapSysResource):
        creds.choose_run_as(groups, ROOT, False, "x")


def test_another_users_tree_is_permission_denied_not_mixed() -> None:
    with pytest.raises(PermissionDenied) as e:
        creds.choose_run_as({10: task((1002, 0, 1002, 0), (1002,) * 4)}, BOB, False, "x")
    assert type(e.value) is PermissionDenied


def test_roots_own_tree_stays_roots() -> None:
    me = plain(os.getuid(), os.getgid())
    assert creds.choose_run_as({10: me}, ROOT, False, "x") is None
    with pytest.raises(NeedsCapSysResource):
        creds.choose_run_as({10: plain(0, 4242)}, ROOT, False, "x")


def test_manifest_round_trip_and_previous_release() -> None:
    ra = RunAs(1001, 1001, (1001, 2000))
    m = creds.to_manifest({10: plain(1001, 1001, ra.groups)}, ra)
    assert m["uids"] == {"10": (1001,) * 4} and m["groups"] == (1001, 2000)
    stored = Manifest(**m).to_json()
    assert Manifest.from_json(json.loads(json.dumps(stored))).run_as == (1001, 1001, [1001, 2000])
    assert creds.run_as_of(Manifest.from_json(stored).run_as) == ra
    # The previous release recorded [uid, gid]: criu ran with cleared groups.
    old = Manifest.from_json({"run_as": [1001, 1001]})
    assert creds.run_as_of(old.run_as) == RunAs(1001, 1001, ())
    assert creds.run_as_of(Manifest.from_json({"run_as": None}).run_as) is None


def test_wrap_argv_passes_groups_or_clears_them() -> None:
    argv = wrap_argv("setpriv", "criu", ["dump"], RunAs(5, 6, (6, 7)))
    assert "--groups=6,7" in argv and "--clear-groups" not in argv
    argv = wrap_argv("setpriv", "criu", ["dump"], RunAs(5, 6))
    assert "--clear-groups" in argv and not any(a.startswith("--groups") for a in argv)
    assert wrap_argv("setpriv", "criu", ["dump"], None)[-2:] == ["criu", "dump"]


def test_orphans_kill_only_matching_tasks() -> None:
    old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # Start times count in clock ticks (10 ms): let one pass.
        time.sleep(0.05)
        info = orphans.plan([old.pid], [os.getuid()], False)
        # Started before the restore began: a reused pid, left alone.
        assert orphans.kill_leftovers(info, 1) == ([], [])
        assert old.poll() is None
        # Started after it, as one of the uids: killed.
        new = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            # Another uid: left alone.
            assert orphans.kill_leftovers({**info, "pids": [new.pid], "uids": [4242]}, 1) == (
                [],
                [],
            )
            assert procutil.proc_start(new.pid) is not None
            # Someone else's child (its parent is not among the parents given): left alone.
            assert orphans.kill_leftovers({**info, "pids": [new.pid]}, 0, (1,)) == ([], [])
            assert procutil.proc_start(new.pid) is not None
            got = orphans.kill_leftovers({**info, "pids": [new.pid]}, 0, (os.getpid(),))
            assert got[0] == [new.pid]
            assert new.wait(timeout=10) == -signal.SIGKILL
        finally:
            new.kill()
            new.wait()
    finally:
        old.kill()
        old.wait()


def test_orphans_read_a_gone_pid_as_not_ours() -> None:
    # psutil's NoSuchProcess is what an OSError was: not the restore's, not killed.
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert orphans._ids_and_parent(p.pid) is None
    ids = orphans._ids_and_parent(os.getpid())
    assert ids == ({os.getuid()}, os.getppid())


def test_the_daemon_starts_without_psutil() -> None:
    # psutil serves only the orphans' cold path: its import is no start-up cost.
    code = "import sys, criud.daemon.server; print('psutil' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
