"""Container tests: a busybox OCI bundle, run detached by Debian's runc.

Needs the Debian packages `runc` and `busybox-static` (the rootfs holds only
a static busybox, so nothing else has to be copied in).  `missing()` says
what is absent, for a pytest skip.

Every runc call uses a private state root (`runc --root`), so the tests
neither see nor disturb containers of the host's runc.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

RUNC = shutil.which("runc") or "/usr/sbin/runc"
BUSYBOX = "/bin/busybox"
LOOP = "i=0; while true; do echo hello $i; i=$((i+1)); sleep 0.1; done"
PACKAGES = ("runc", "busybox-static")


def _is_static_elf(path: str) -> bool:
    """Whether path is an ELF executable without a program interpreter (PT_INTERP)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only, as on amd64/arm64
                return False
            end = "<" if head[5] == 1 else ">"
            (phoff,) = struct.unpack_from(end + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(phnum):
        (p_type,) = struct.unpack_from(end + "I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP: dynamically linked
            return False
    return True


def missing() -> str | None:
    """Why container tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "container tests need root"
    if not os.access(RUNC, os.X_OK):
        return f"runc not found (apt-get install {' '.join(PACKAGES)})"
    if not _is_static_elf(BUSYBOX):
        return f"{BUSYBOX} is missing or not static (apt-get install busybox-static)"
    return None


def _install_busybox(rootfs: Path) -> None:
    """Copy the static busybox into rootfs/bin with a relative symlink per applet.

    `busybox --install -s DIR` would link to the absolute path busybox was run
    from (here the host's view of the rootfs), which does not exist inside the
    container: runc then fails with `exec: "sh": executable file not found`.
    """
    bindir = rootfs / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, bindir / "busybox")
    applets = subprocess.run(
        [BUSYBOX, "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    for name in applets:
        if name != "busybox" and "/" not in name:
            with contextlib.suppress(FileExistsError):
                (bindir / name).symlink_to("busybox")


def runc_spec() -> dict[str, Any]:
    """The config.json `runc spec` writes (into a scratch dir, read back)."""
    d = Path(tempfile.mkdtemp(prefix="runc-spec-"))
    try:
        subprocess.run([RUNC, "spec", "--bundle", str(d)], check=True, capture_output=True)
        return dict(json.loads((d / "config.json").read_text()))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def build_bundle(
    bundle: Path,
    *,
    args: Sequence[str] = ("sh", "-c", LOOP),
    rootfs: str = "rootfs",
    binds: Mapping[str, str] | None = None,
    network: bool = True,
    cgroups_path: str | None = None,
    terminal: bool = False,
) -> Path:
    """Make an OCI bundle at `bundle`: busybox rootfs and runc's default config.

    The config is `runc spec`'s, with terminal off unless asked (off, `runc
    run -d` hands the container its own stdio; on, runc makes a pty and sends
    its master to a console socket), the given args, extra bind mounts
    {destination: host source}, and the network namespace dropped unless
    network.  The rootfs gets a /tmp: criu restores into a read-only root
    only through an existing tmp directory (it pivots through it).
    """
    bundle.mkdir(parents=True, exist_ok=True)
    root = bundle / rootfs
    _install_busybox(root)
    for d in ("tmp", "proc", "sys", "dev"):
        (root / d).mkdir(exist_ok=True)
    spec = runc_spec()
    spec["process"]["terminal"] = terminal
    spec["process"]["args"] = list(args)
    spec["root"]["path"] = rootfs
    for dest, source in (binds or {}).items():
        spec["mounts"].append(
            {"destination": dest, "type": "bind", "source": source, "options": ["rbind", "rw"]}
        )
    if not network:
        spec["linux"]["namespaces"] = [
            n for n in spec["linux"]["namespaces"] if n["type"] != "network"
        ]
    if cgroups_path is not None:
        spec["linux"]["cgroupsPath"] = cgroups_path
    (bundle / "config.json").write_text(json.dumps(spec, indent=2))
    return bundle


def copy_bundle(
    src: Path,
    dest: Path,
    *,
    rootfs: str = "rootfs",
    binds: Mapping[str, str] | None = None,
    cgroups_path: str | None = None,
) -> Path:
    """Copy a bundle for "restore under a new name": new rootfs dir, new bind sources.

    binds maps a bind mount's destination to its new host source.
    """
    spec = json.loads((src / "config.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    old_root = src / spec["root"]["path"]
    shutil.copytree(old_root, dest / rootfs, symlinks=True)
    spec["root"]["path"] = rootfs
    for m in spec.get("mounts") or []:
        if binds and m["destination"] in binds:
            m["source"] = binds[m["destination"]]
    if cgroups_path is not None:
        spec["linux"]["cgroupsPath"] = cgroups_path
    (dest / "config.json").write_text(json.dumps(spec, indent=2))
    return dest


class Runc:
    """runc with a private state root; remembers its containers for cleanup."""

    def __init__(self, state_root: Path) -> None:
        self.state_root = state_root
        self.started: list[str] = []

    def cmd(self, *args: str) -> list[str]:
        return [RUNC, "--root", str(self.state_root), *args]

    def run_detached(
        self, bundle: Path, container_id: str, stdout_fd: int, console_socket: Path | None = None
    ) -> int:
        """`runc run -d`: the container's stdout and stderr are stdout_fd; return its init pid.

        With console_socket (a terminal container), runc sends the pty's master
        there instead.  runc's own messages go to a log file beside the state,
        not into the pipe.
        """
        pid_file = self.state_root / f"{container_id}.pid"
        log = self.state_root / f"{container_id}.log"
        self.started.append(container_id)
        p = subprocess.run(
            self.cmd(
                "--log",
                str(log),
                "run",
                "-d",
                "--pid-file",
                str(pid_file),
                *(["--console-socket", str(console_socket)] if console_socket else []),
                "--bundle",
                str(bundle),
                container_id,
            ),
            stdin=subprocess.DEVNULL,
            stdout=stdout_fd,
            stderr=stdout_fd,
            timeout=60,
            check=False,
        )
        if p.returncode != 0:
            text = log.read_text(errors="replace") if log.exists() else ""
            raise AssertionError(f"runc run {container_id} exited {p.returncode}: {text[-2000:]}")
        return int(pid_file.read_text().strip())

    def state(self, container_id: str) -> dict[str, Any] | None:
        p = subprocess.run(
            self.cmd("state", container_id), capture_output=True, text=True, check=False
        )
        return dict(json.loads(p.stdout)) if p.returncode == 0 else None

    def delete(self, container_id: str) -> None:
        """Kill and delete one container, whatever its state."""
        subprocess.run(self.cmd("kill", container_id, "KILL"), capture_output=True, check=False)
        for _ in range(50):
            p = subprocess.run(
                self.cmd("delete", "--force", container_id), capture_output=True, check=False
            )
            if p.returncode == 0 or self.state(container_id) is None:
                return
            time.sleep(0.1)

    def cleanup(self) -> None:
        for cid in reversed(self.started):
            self.delete(cid)


class ConsoleSocket:
    """The engine's console socket, as runc's recvtty serves it: it receives the pty master.

    A unix stream socket at path; runc connects once and sends the master
    over SCM_RIGHTS.  accept() waits (bounded) for it and returns the fd.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        self.sock.listen(1)

    def accept(self, timeout: float = 30.0) -> int:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(timeout)
            space = socket.CMSG_SPACE(array.array("i", [0]).itemsize)
            _, anc, flags, _ = conn.recvmsg(4096, space, socket.MSG_CMSG_CLOEXEC)
        assert not flags & socket.MSG_CTRUNC, "console socket: control data truncated"
        fds = array.array("i")
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        assert len(fds) == 1, f"console socket: expected one fd, got {len(fds)}"
        return int(fds[0])

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def cgroup_dirs(path: str) -> list[Path]:
    """The directory of cgroup `path` in every mounted hierarchy (v1 and v2)."""
    out: list[Path] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] in ("cgroup", "cgroup2") and fields[3] == "/":
                out.append(Path(fields[4]) / path.lstrip("/"))
    return out


def remove_cgroup(path: str, timeout: float = 5.0) -> None:
    """rmdir cgroup `path` everywhere (criu creates it in each hierarchy on restore).

    Retried: the cgroup stays busy until its killed tasks are reaped.
    """
    deadline = time.monotonic() + timeout
    for d in cgroup_dirs(path):
        while d.is_dir():
            try:
                d.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)


@contextlib.contextmanager
def runc_env(state_root: Path) -> Iterator[Runc]:
    """A Runc whose containers are all killed and deleted on exit."""
    state_root.mkdir(parents=True, exist_ok=True)
    r = Runc(state_root)
    try:
        yield r
    finally:
        r.cleanup()
