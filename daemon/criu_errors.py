"""What criu's log means: a failed run mapped to a stable code and a one-line hint.

criu says why it failed in free text ("External socket is used. Consider
using --ext-unix-sk option.").  Engines need a code to branch on and people
need to be told which request option fixes it, in criud's words rather than
criu's (criu suggests --ext-unix-sk even where only ``--external unix[ino]``
works).  ``classify`` does that from the first error line and, when that
line says nothing recognisable, from the log's later error lines.

Every pattern below comes from a real failure of criu 4.2.1 on this machine;
tests/unit/criu_logs/<code>.log keeps an excerpt of each.  The codes match
criud.dump.preflight's, so a predicted and an actual failure look the same.

``error_class(code)`` gives the criud error to raise, carrying the HTTP
status: most are CriuFailed subclasses; pid_in_use and permission_denied
reuse the existing PidInUse (409) and PermissionDenied (403), whose codes
must stay unique.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
from collections.abc import Sequence
from pathlib import Path

from criud.daemon import errors
from criud.daemon.criu import Criu, CriuResult
from criud.daemon.criu import first_error as _error_message

FALLBACK = "criu_failed"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One recognisable failure: a pattern of criu's error message and what it means."""

    code: str
    pattern: re.Pattern[str]
    hint: str
    # Operations the rule applies to ("dump", "pre-dump", "restore"); None: all.
    ops: frozenset[str] | None = None
    # A pattern of the log's other lines whose group 1 replaces INODE in the
    # hint, so it names the very key to declare.
    inode: re.Pattern[str] | None = None
    # Searched in every line of the log (warnings too) before any error line
    # is looked at: for a cause criu logs only as a warning, whose
    # consequence is the first error line.
    any_line: bool = False


_DUMPS = frozenset({"dump", "pre-dump"})
_RESTORE = frozenset({"restore"})
# criu logs the socket it gives up on just before the error line.
_EXT_UNIX_INODE = re.compile(
    r"(?:Runaway socket|Ext stream not supported|Ext dgram w/o name): ino (\d+)"
)
_EXT_UNIX_HINT = (
    'declare the socket\'s key in external: ["socket:[INODE]"], and hand in a replacement '
    "at restore; ext_unix_sk alone covers only a datagram socket whose peer "
    "has a name"
)

# ptrace(PTRACE_SEIZE) refused with EPERM: the task is not ptraceable by
# criu's uid (a setgid task, or one whose saved uid differs, is not
# dumpable).  compel logs it as a warning, treats the task as gone, and
# criu's first error is "Unable to detach from N: No such process", which
# would read as process_gone.
_SEIZE_EPERM = re.compile(
    r"(?:Unable to interrupt task|SEIZE \d+: can't interrupt task):.*Operation not permitted"
)

# Order matters only between rules that can match the same line: the first
# rule that matches the earliest error line wins.
RULES: tuple[Rule, ...] = (
    Rule(
        "permission_denied",
        _SEIZE_EPERM,
        "criu may not trace a task of the tree (ptrace refused: a setgid task, or one whose "
        "saved or filesystem uid differs from its owner's): checkpoint trees whose tasks "
        "run with one uid and one gid throughout",
        any_line=True,
    ),
    Rule(
        "external_unix_socket",
        re.compile(r"External socket is used"),
        _EXT_UNIX_HINT,
        inode=_EXT_UNIX_INODE,
    ),
    Rule(
        "external_unix_socket",
        re.compile(r"Can't dump half of stream unix connection|Can't dump name-less external"),
        'ext_unix_sk does not cover this socket: declare its key in external: ["socket:[INODE]"], '
        "and hand in a replacement at restore",
        inode=_EXT_UNIX_INODE,
    ),
    Rule(
        "tcp_established_needed",
        re.compile(r"Connected TCP socket|--tcp-established"),
        "the tree has established TCP connections: pass tcp_established: true",
    ),
    Rule(
        "external_tty",
        re.compile(r"slave peer index \d+ without correspond master"),
        "a pty slave of the tree has its master outside it (an engine's terminal): criud "
        "dumps such a slave as external (--external tty[rdev:dev]) when its walk of the tree "
        "sees it, so a pty opened while the checkpoint started was missed: retry it, and at "
        'restore hand a new pty slave in for the key, inherit_fds: [{"key": "tty[RDEV:DEV]", '
        '"handle": H, "index": N}] (or "stdio" for fds 0-2); shell_job is not the fix',
    ),
    Rule(
        "shell_job_needed",
        re.compile(r"is not a session leader|--shell-job|Found dangling tty"),
        "the tree runs in a session or on a terminal it does not own: pass shell_job: true",
    ),
    Rule(
        "file_locks_needed",
        re.compile(r"file locks are hold|--file-locks"),
        "the tree holds file locks: pass file_locks: true",
    ),
    Rule(
        "ghost_file_too_big",
        re.compile(r"Can't dump ghost file .* increase limit"),
        "a deleted but still open file is bigger than criu's 1 MiB ghost limit: close or "
        "truncate it before the checkpoint",
    ),
    Rule(
        "pid_ns_not_rooted",
        re.compile(
            r"Can't dump a pid namespace without the process init|"
            r"session leader of .* is outside of its pid namespace"
        ),
        "checkpoint the pid namespace's init (pid 1 in it), started as a session leader (setsid)",
    ),
    Rule(
        "pid_in_use",
        re.compile(r"Can't fork for \d+: File exists|Can't fork for \d+:.*EEXIST"),
        "the checkpoint's pids are taken by running processes: end them (or wait until the "
        "dumped tree's zombies are reaped) and retry",
        _RESTORE,
    ),
    Rule(
        "file_size_changed",
        re.compile(r"has bad size \d+ \(expect \d+\)"),
        "a file the tree had open changed size since the checkpoint: map its key to a fresh "
        "path or fd in inherit_fds",
        _RESTORE,
    ),
    Rule(
        "no_space",
        re.compile(r"No space left on device|Disk quota exceeded"),
        "the images' filesystem is full: free space in the daemon's state dir and retry",
    ),
    Rule(
        "process_gone",
        re.compile(r"was killed by \d+ unexpectedly|No such process"),
        "the process exited or was killed while criu dumped it; nothing was saved: check it "
        "still runs, then retry",
        _DUMPS,
    ),
    Rule(
        "permission_denied",
        re.compile(r"Can't get rlimit"),
        "criu may not dump a process of another uid here (root lacks CAP_SYS_RESOURCE): "
        "checkpoint trees of the daemon's own uid, or give root that capability",
    ),
    Rule(
        "permission_denied",
        re.compile(r"Read-only file system"),
        "the images dir is on a read-only filesystem: give the daemon a writable state dir",
    ),
    Rule(
        "permission_denied",
        re.compile(r"Operation not permitted|Permission denied"),
        "criu lacks a privilege it needs for this tree (another uid, an LSM or seccomp "
        "policy, missing capabilities): see the log for the call that failed",
    ),
)

# The error class (and so the HTTP status) each code is raised as.
CLASSES: dict[str, type[errors.CriudError]] = {
    "external_unix_socket": errors.ExternalUnixSocket,
    "tcp_established_needed": errors.TcpEstablishedNeeded,
    "shell_job_needed": errors.ShellJobNeeded,
    "external_tty": errors.ExternalTty,
    "file_locks_needed": errors.FileLocksNeeded,
    "ghost_file_too_big": errors.GhostFileTooBig,
    "pid_ns_not_rooted": errors.PidNsNotRooted,
    "file_size_changed": errors.FileSizeChanged,
    "pid_in_use": errors.PidInUse,
    "process_gone": errors.ProcessGone,
    "no_space": errors.NoSpace,
    "permission_denied": errors.PermissionDenied,
    FALLBACK: errors.CriuFailed,
}


def _match(message: str, op: str, log_lines: Sequence[str]) -> tuple[str, str] | None:
    for rule in RULES:
        if rule.ops is not None and op not in rule.ops:
            continue
        if rule.pattern.search(message):
            return rule.code, _hint(rule, log_lines)
    return None


def _hint(rule: Rule, log_lines: Sequence[str]) -> str:
    if rule.inode is not None:
        for line in log_lines:
            m = rule.inode.search(line)
            if m:
                return rule.hint.replace("INODE", m.group(1))
    return rule.hint


def _fallback_hint(message: str | None) -> str:
    if message:
        return f'criu said "{message}"; read the whole log for the cause'
    return "criu exited without an error line; read the whole log for the cause"


def classify(first_error: str | None, log_lines: Sequence[str], op: str) -> tuple[str, str]:
    """Map a failed criu run to (code, hint); ("criu_failed", ...) when nothing matches.

    first_error is criud.daemon.criu.first_error's answer; log_lines may be
    the whole log or its tail.  The earliest error that a rule recognises
    decides: criu logs the cause first and its consequences after
    ("Dumping FAILED.").  op is "dump", "pre-dump" or "restore": the same
    errno means different things in each (ESRCH during a dump is a process
    that went away).  A rule marked any_line wins over all of that when any
    line of the log matches it.
    """
    for rule in RULES:
        applies = rule.any_line and (rule.ops is None or op in rule.ops)
        if applies and any(rule.pattern.search(line) for line in log_lines):
            return rule.code, _hint(rule, log_lines)
    if first_error:
        found = _match(first_error, op, log_lines)
        if found:
            return found
    for line in log_lines:
        # Only criu's own "Error (file:line): msg" lines, minus the known
        # harmless ones (the RLIMIT_NOFILE line carries EPERM on every run).
        message = _error_message([line])
        if message is None:
            continue
        found = _match(message, op, log_lines)
        if found:
            return found
    return FALLBACK, _fallback_hint(first_error)


def classify_log(path: Path, op: str) -> tuple[str, str]:
    """classify() on a criu log file; blocking (run it in a thread)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return FALLBACK, _fallback_hint(None)
    return classify(_error_message(lines), lines, op)


def status_of(code: str) -> int:
    """The HTTP status criud answers a code with (422 for unknown codes)."""
    # The classes carry their statuses: no second table to drift from them.
    return error_class(code).status


def hint_of(code: str) -> str:
    """The hint of the first rule with this code (the fallback's if none)."""
    for rule in RULES:
        if rule.code == code:
            return rule.hint
    return _fallback_hint(None)


def error_class(code: str) -> type[errors.CriudError]:
    """The criud error class to raise for a code (CriuFailed for unknown codes)."""
    return CLASSES.get(code, errors.CriuFailed)


# Below this much free space, a criu failure without a recognisable error
# line is taken for a full disk (criu cannot write that line either).
_FULL_BYTES = 1 << 20


def disk_full(path: Path) -> bool:
    """Whether path's filesystem is (all but) full, as after a dump filled it."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _FULL_BYTES or (st.f_files > 0 and st.f_favail == 0)


def log_url(ckpt_id: str, op: str) -> str:
    """Where the API serves a checkpoint's criu log of op (dump or restore)."""
    return f"/v1/checkpoints/{ckpt_id}/log?op={op}"


async def failure(
    criu: Criu, what: str, result: CriuResult, op: str, ckpt_id: str, images_root: Path
) -> errors.CriudError:
    """Turn a failed criu run into the error with the code and hint that name the fix."""
    rc = result.returncode
    how = f"criu was killed by {signal.Signals(-rc).name}" if rc < 0 else f"criu exited {rc}"
    reason = result.first_error or "no error line in its log"
    cls: type[errors.CriudError]
    if result.stopped == "target_gone":
        how = (
            "the process went away, and criu, still running "
            f"{criu.gone_grace_s:g} s later, was killed"
        )
        cls, hint = errors.ProcessGone, hint_of("process_gone")
    elif result.stopped == "timeout":
        how = f"criu ran longer than --criu-timeout ({criu.timeout_s:g} s) and was killed"
        cls = errors.CriuTimeout
        hint = (
            "criu hung, or the dump needs longer than the timeout allows: read the log, "
            "and raise --criu-timeout if criu was still working"
        )
    else:
        # The whole log, not only its first error line: some causes (a
        # task killed mid-dump) show only in the lines after it.
        code, hint = await asyncio.to_thread(classify, result.first_error, result.log_lines, op)
        if code == FALLBACK and await asyncio.to_thread(disk_full, images_root):
            # criu could not even write its log's error line.
            code, hint = "no_space", hint_of("no_space")
        cls = error_class(code)
    return cls(
        f"{what} failed: {how}: {reason}",
        criu_error=result.first_error,
        hint=hint,
        exit_code=result.returncode,
        log_tail=result.log_tail,
        log_url=log_url(ckpt_id, op),
    )
