"""criu_msg.to_request: the argv the builders make, as criu's RPC message, or why not."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from criud.daemon import criu_msg, criu_rpc
from criud.daemon import criu_rpc_pb2 as rpc
from criud.dump.argv import dump_argv
from criud.dump.options import DumpOptions
from criud.restore.argv import restore_argv


def _req(argv: list[str], pass_fds: list[int], log: str = "x.log") -> criu_msg.Request:
    out = criu_msg.to_request(argv, pass_fds, log)
    assert isinstance(out, criu_msg.Request), out
    return out


def test_dump_argv_translates() -> None:
    opts = DumpOptions(leave_running=True, shell_job=True, tcp_established=True)
    argv = dump_argv(
        4242,
        Path("/var/lib/criud/checkpoints/.tmp-x"),
        opts,
        external_unix=(77,),
        network_lock="nftables",
    )
    out = _req(argv, [], "dump.log")
    o = out.req.opts
    assert out.req.type == rpc.DUMP
    assert o.pid == 4242
    assert o.images_dir == "/var/lib/criud/checkpoints/.tmp-x"
    assert o.images_dir_fd == -1
    assert out.images_dir == Path("/var/lib/criud/checkpoints/.tmp-x")
    assert (o.leave_running, o.shell_job, o.tcp_established) == (True, True, True)
    assert not o.file_locks
    assert o.network_lock == rpc.NFTABLES
    assert list(o.external) == ["unix[77]"]
    assert o.log_file == "dump.log"
    assert o.log_level == 4
    assert out.work_dir_fd is None
    # The message encodes (required fields set).
    assert out.req.SerializeToString()


def test_restore_argv_names_daemon_fds() -> None:
    argv = restore_argv(
        Path("/imgs"),
        DumpOptions(),
        (),
        cgroup_root="/criud/x",
        work_dir=Path("/proc/self/fd/9"),
    )
    out = _req(argv, [9], "restore.log")
    o = out.req.opts
    assert out.req.type == rpc.RESTORE
    assert o.rst_sibling
    # -W /proc/self/fd/9: pass_fds keeps numbers, so it is the daemon's fd 9,
    # which criu reaches as /proc/<daemon>/fd/9.
    assert o.work_dir_fd == 9
    assert out.work_dir_fd == 9
    assert out.pidfile == "restore.pid"
    assert [c.path for c in o.cg_root] == ["/criud/x"]
    assert o.images_dir == "/imgs"


def test_images_dir_by_fd() -> None:
    argv = restore_argv(
        Path("/proc/self/fd/5"), DumpOptions(), (), work_dir=Path("/proc/self/fd/6")
    )
    out = _req(argv, [5, 6])
    assert out.req.opts.images_dir_fd == 5
    assert not out.req.opts.HasField("images_dir")


def test_cli_only_cases_are_named() -> None:
    base = restore_argv(Path("/imgs"), DumpOptions(), (), work_dir=Path("/proc/self/fd/6"))
    # An inherit fd: a warm worker cannot hold it.
    inherit = restore_argv(
        Path("/imgs"),
        DumpOptions(),
        ["--inherit-fd", "fd[7]:pipe:[1]"],
        work_dir=Path("/proc/self/fd/6"),
    )
    why = criu_msg.to_request(inherit, [6, 7], "r.log")
    assert isinstance(why, str) and "--inherit-fd" in why
    # An fd handed over that the request does not name.
    why = criu_msg.to_request(base, [6, 8], "r.log")
    assert isinstance(why, str) and "does not hold" in why
    # A /proc/self/fd/N that is not handed over.
    why = criu_msg.to_request(base, [], "r.log")
    assert isinstance(why, str) and "not handed over" in why
    # OCI's options, a log by path, an unknown lock, a bare flag at the end.
    for argv in (
        [*base, "--root", "/x"],
        ["dump", "-D", "/i", "-o", "/tmp/log"],
        ["dump", "-D", "/i", "--network-lock", "ebpf"],
        ["dump", "-D", "/i", "-t"],
        ["check"],
        ["dump", "-t", "1"],
    ):
        assert isinstance(criu_msg.to_request(argv, [], "r.log"), str), argv


def _inherit_argv(*pairs: tuple[int, str]) -> list[str]:
    args = [a for fd, key in pairs for a in ("--inherit-fd", f"fd[{fd}]:{key}")]
    return restore_argv(Path("/imgs"), DumpOptions(), args, work_dir=Path("/proc/self/fd/6"))


def test_inherit_fds_name_the_handle_workers_own_fds() -> None:
    # The run's duplicates 7 and 8 were made from the handle's 20 and 21,
    # the numbers its worker holds them at.
    argv = _inherit_argv((7, "pipe:[1]"), (8, "tty[88:5]"))
    out = criu_msg.to_request(argv, [7, 8, 6], "r.log", {7: 20, 8: 21})
    assert isinstance(out, criu_msg.Request), out
    got = [(e.key, e.fd) for e in out.req.opts.inherit_fd]
    assert got == [("pipe:[1]", 20), ("tty[88:5]", 21)]
    assert out.req.opts.work_dir_fd == 6


def test_an_inherit_fd_the_worker_does_not_hold_is_the_cli_s() -> None:
    # 9 is not one of the handle's (a path opened for the caller, say).
    argv = _inherit_argv((7, "pipe:[1]"), (9, "some/file"))
    why = criu_msg.to_request(argv, [7, 9, 6], "r.log", {7: 20})
    assert isinstance(why, str) and "fd[9]" in why and "does not hold" in why
    why = criu_msg.to_request(["restore", "-D", "/i", "--inherit-fd", "7:k"], [7], "r.log", {7: 1})
    assert isinstance(why, str) and "not fd[N]:key" in why


def test_handle_workers_hold_their_fds_are_capped_and_reaped() -> None:
    """HandleWorkers with `sleep` standing in for criu swrk: one per handle, capped, killed."""
    forgot: list[int] = []

    async def spawn(cmd: Sequence[str], fds: Sequence[int]) -> asyncio.subprocess.Process:
        dn = subprocess.DEVNULL
        return await asyncio.create_subprocess_exec(
            *cmd, stdin=dn, stdout=dn, stderr=dn, pass_fds=tuple(fds), close_fds=True
        )

    async def body() -> None:
        hw = criu_rpc.HandleWorkers(2, lambda fd: ["sleep", "60"], spawn, forgot.append)
        r, w = os.pipe()
        try:
            assert hw.start("a", [r]) and hw.start("b", [w, r])
            assert not hw.start("c", [w]), "over the cap"
            # A run that hands over other fds than the handle's never gets its worker.
            assert await hw.take("b", {w}) is None
            got = await hw.take("b", {w, r})
            assert got is not None and set(got.held) == {w, r} and len(hw) == 1
            assert hw.start("c", [w]), "a taken worker frees its place"
            got.close()
            await got.proc.wait()
            hw.drop("a")
            await hw.close()
            assert len(hw) == 0
            assert len(forgot) == 2, forgot  # a's and c's: killed and reaped
        finally:
            os.close(r)
            os.close(w)

    asyncio.run(asyncio.wait_for(body(), 20))
