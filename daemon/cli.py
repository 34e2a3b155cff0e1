"""The `criud` command: `criud serve`, and a client for everything else."""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from criud.daemon import cli_archive, cli_migrate
from criud.daemon.config import DEFAULT_FD_SOCKET, DEFAULT_SOCKET, DEFAULT_STATE_DIR, Settings

if TYPE_CHECKING:
    from criud.api.client import Client

_INHERIT_RE = re.compile(r"fd\[(\d+)\]:(.+)")


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"CRIUD_{name}", default)


def _count(text: str) -> int:
    """argparse type: a whole number, 0 or more."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return n


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """argparse type: bytes, as a number with an optional K, M, G or T (powers of 1024)."""
    m = re.fullmatch(r"(\d+)([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512M, 10G)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


# `criud serve`'s numeric tunables: (flag, type, default, metavar, help);
# each can also come from CRIUD_<FLAG> in the environment.
_TUNABLES: tuple[tuple[str, Callable[[str], float], str, str, str], ...] = (
    ("criu-timeout", float, "1800", "SECONDS", "kill a criu run that takes longer (0: never)"),
    (
        "criu-gone-grace",
        float,
        "10",
        "SECONDS",
        "kill a dump's criu this long after its process died, if it has not finished",
    ),
    (
        "criu-pool",
        _count,
        "2",
        "N",
        "pre-started criu workers kept ready for dumps and restores (0: none)",
    ),
    # Quotas (criud.daemon.quotas); the rest of them are Settings fields.
    (
        "header-timeout",
        float,
        "10",
        "SECONDS",
        "close a connection whose request head is not complete in this time",
    ),
    (
        "max-conns-per-uid",
        _count,
        "32",
        "N",
        "connections one non-root uid may hold on each unix socket",
    ),
    (
        "max-ops-per-uid",
        _count,
        "4",
        "N",
        "checkpoints and restores one non-root uid may have in flight",
    ),
    (
        "max-handle-fds-per-uid",
        _count,
        "1024",
        "N",
        "fds one non-root uid's fd handles may hold together",
    ),
    (
        "fd-reserve",
        _count,
        "0",
        "N",
        "fds kept from callers: root's stop at the fd limit - N, others' at the limit - 2N "
        "(0: an eighth of the limit, 32..1024)",
    ),
    # Retention (criud.daemon.quotas.CheckpointQuota, criud.daemon.retention).
    (
        "max-checkpoints-per-uid",
        _count,
        "0",
        "N",
        "checkpoints one uid may keep, failed ones included (0: no limit; root exempt "
        "without --quota-root)",
    ),
    (
        "max-checkpoint-bytes-per-uid",
        _size,
        "0",
        "SIZE",
        "image bytes one uid's checkpoints may hold, e.g. 10G; a dump whose estimate "
        "would pass it is refused before it starts (0: no limit)",
    ),
    (
        "max-checkpoints-per-pid",
        _count,
        "0",
        "N",
        "after a checkpoint of a pid, keep only its owner's newest N of that pid (0: all)",
    ),
    (
        "path-open-timeout",
        float,
        "5",
        "SECONDS",
        "give up opening a restore's inherit paths after this long",
    ),
    # Archives (criud.daemon.archive, docs/archives.md).
    ("export-zstd-level", _count, "1", "N", "zstd level of exported archives"),
    (
        "export-zstd-threads",
        _count,
        "0",
        "N",
        "zstd worker threads per export (0: compress in the export's own thread)",
    ),
    (
        "import-max-bytes",
        _count,
        str(64 << 30),
        "BYTES",
        "refuse an imported archive that is, or unpacks to, more than this",
    ),
    (
        "import-max-ratio",
        _count,
        "200",
        "N",
        "refuse an imported archive that decompresses more than N:1 (a bomb)",
    ),
    (
        "import-max-members",
        _count,
        "100000",
        "N",
        "refuse an imported archive with more members",
    ),
    (
        "archive-stall-timeout",
        float,
        "300",
        "SECONDS",
        "end an export its client stops reading, or an import whose body stops coming",
    ),
    (
        "migration-timeout",
        float,
        "120",
        "SECONDS",
        "abort an incoming migration not committed within this long",
    ),
)
# The Settings field each tunable fills.
_TUNABLE_FIELDS = {
    "criu-timeout": "criu_timeout_s",
    "criu-gone-grace": "criu_gone_grace_s",
    "criu-pool": "criu_pool",
    "header-timeout": "header_timeout_s",
    "max-conns-per-uid": "max_conns_per_uid",
    "max-ops-per-uid": "max_ops_per_uid",
    "max-handle-fds-per-uid": "max_handle_fds_per_uid",
    "fd-reserve": "fd_reserve",
    "max-checkpoints-per-uid": "max_checkpoints_per_uid",
    "max-checkpoint-bytes-per-uid": "max_checkpoint_bytes_per_uid",
    "max-checkpoints-per-pid": "max_checkpoints_per_pid",
    "path-open-timeout": "path_open_timeout_s",
    "export-zstd-level": "export_zstd_level",
    "export-zstd-threads": "export_zstd_threads",
    "import-max-bytes": "import_max_bytes",
    "import-max-ratio": "import_max_ratio",
    "import-max-members": "import_max_members",
    "archive-stall-timeout": "archive_stall_s",
    "migration-timeout": "migration_timeout_s",
}


def _table(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    cells = [[str(c).upper() for c in cols]]
    cells += [["-" if r.get(c) is None else str(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _when(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _user_name(uid: int) -> str:
    """A uid's user name, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _preflight_text(r: dict[str, Any]) -> str:
    lines = [
        f"{'ok' if r['ok'] else 'BLOCKED'}: estimated image {r['estimated_image_bytes']} bytes, "
        f"{r['free_bytes']} free"
    ]
    for kind in ("blockers", "warnings"):
        for f in r[kind]:
            mark = "resolved" if f["resolved"] else kind[:-1]
            where = f"pid {f['task']}" + (f" fd {f['fd']}" if f["fd"] is not None else "")
            lines.append(f"  [{mark}] {f['code']} ({where}): {f['message']}")
            lines.append(f"      fix: {f['resolution']}")
    if r["restore_keys"]:
        lines.append("  a restore must supply: " + ", ".join(r["restore_keys"]))
    return "\n".join(lines)


def _tree_text(tree: dict[str, Any]) -> str:
    by_parent: dict[int, list[dict[str, Any]]] = {}
    pids = {t["pid"] for t in tree["tasks"]}
    for t in tree["tasks"]:
        by_parent.setdefault(t["ppid"] if t["ppid"] in pids else 0, []).append(t)
    lines: list[str] = []

    def walk(task: dict[str, Any], depth: int) -> None:
        pad = "  " * depth
        cmd = " ".join(task.get("cmdline") or []) or task.get("comm", "?")
        ns = [n for n, v in (task.get("namespaces") or {}).items() if v.get("differs")]
        lines.append(
            f"{pad}{task['pid']} {task['state']} {cmd[:60]}"
            + (f"  [own ns: {','.join(ns)}]" if ns else "")
        )
        for f in task.get("fds") or []:
            ext = " EXTERNAL" if f.get("external") else ""
            lines.append(f"{pad}    fd {f['fd']:>3} {f['type']:<8} {f['mode']:<2} {f['key']}{ext}")
        for child in by_parent.get(task["pid"], []):
            walk(child, depth + 1)

    for root in by_parent.get(0, []):
        walk(root, 0)
    if tree.get("external"):
        lines.append("external: " + ", ".join(tree["external"]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="criud", description="Checkpoint/restore daemon for container engines"
    )
    p.add_argument(
        "--socket",
        default=_env("SOCKET", str(DEFAULT_SOCKET)),
        help="API socket (env CRIUD_SOCKET; default %(default)s)",
    )
    p.add_argument(
        "--fd-socket",
        default=_env("FD_SOCKET", str(DEFAULT_FD_SOCKET)),
        help="fd socket (env CRIUD_FD_SOCKET; default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = p.add_subparsers(dest="cmd", required=True)

    _add_serve(sub)
    _add_checkpoint(sub)
    cli_migrate.add_parser(sub, _add_following)
    _add_others(sub)
    _add_watch(sub)
    cli_archive.add_parsers(sub, "a checkpoint id or name (owner/name for another user's)")
    return p


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_serve(sub: Subparsers) -> None:
    s = sub.add_parser("serve", help="run the daemon (root)")
    # Also after `serve`, where a unit file or a reader of `serve --help`
    # looks for them; SUPPRESS keeps the global value unless given here.
    s.add_argument("--socket", default=argparse.SUPPRESS, help="API socket (as above)")
    s.add_argument("--fd-socket", default=argparse.SUPPRESS, help="fd socket (as above)")
    s.add_argument(
        "--state-dir",
        default=_env("STATE_DIR", str(DEFAULT_STATE_DIR)),
        help="state dir (env CRIUD_STATE_DIR; default %(default)s)",
    )
    s.add_argument("--criu", default=_env("CRIU", "criu"), help="criu binary (env CRIUD_CRIU)")
    _add_serve_logging(s)
    s.add_argument(
        "--listen",
        default=_env("LISTEN", None),
        metavar="tcp://HOST:PORT",
        help="also serve HTTP on TCP, e.g. tcp://127.0.0.1:8420; needs --token-file "
        "(env CRIUD_LISTEN; off by default)",
    )
    s.add_argument(
        "--token-file",
        default=_env("TOKEN_FILE", None),
        help="file holding the bearer token TCP clients must send (env CRIUD_TOKEN_FILE)",
    )
    _add_serve_migration(s)
    for flag, kind, default, metavar, what in _TUNABLES:
        env = flag.upper().replace("-", "_")
        s.add_argument(
            f"--{flag}",
            type=kind,
            default=kind(_env(env, None) or default),
            metavar=metavar,
            help=f"{what} (env CRIUD_{env}; default %(default)s)",
        )
    s.add_argument(
        "--quota-root",
        action="store_true",
        default=_env("QUOTA_ROOT", "") in ("1", "true", "yes"),
        help="hold root to the per-uid checkpoint quotas too (env CRIUD_QUOTA_ROOT=1)",
    )
    s.add_argument(
        "--socket-group",
        default=_env("SOCKET_GROUP", None),
        help="group owning both sockets (env CRIUD_SOCKET_GROUP)",
    )


def _add_serve_logging(s: argparse.ArgumentParser) -> None:
    """`serve`'s flags for what the daemon tells: logs, events and metrics."""
    s.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="env CRIUD_LOG_LEVEL",
    )
    s.add_argument(
        "--log-format",
        default=_env("LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="json: one JSON object a line, with the operation's id (env CRIUD_LOG_FORMAT)",
    )
    s.add_argument(
        "--observability",
        default=_env("OBSERVABILITY", "on"),
        choices=["on", "off"],
        help="off: operations publish no events and update no metrics, for measuring "
        "what they cost (env CRIUD_OBSERVABILITY; default %(default)s)",
    )


def _add_checkpoint(sub: Subparsers) -> None:
    c = sub.add_parser("checkpoint", help="checkpoint a process tree")
    c.add_argument("pid", type=int)
    c.add_argument("--name")
    for flag in ("leave-running", "shell-job", "tcp-established", "ext-unix-sk", "file-locks"):
        c.add_argument(f"--{flag}", action="store_true")
    c.add_argument(
        "--external",
        action="append",
        default=[],
        metavar="KEY",
        help="treat KEY (e.g. pipe:[123]) as external; repeatable",
    )
    c.add_argument("--label", action="append", default=[], metavar="K=V")
    c.add_argument(
        "--dry-run",
        action="store_true",
        help="freeze nothing: say what would block the checkpoint and what resolves it",
    )
    _add_following(c)
    ip = sub.add_parser("inspect-pid", help="show a process tree and its fds as criu sees them")
    ip.add_argument("pid", type=int)


def _add_following(p: argparse.ArgumentParser) -> None:
    """Flags of the commands that start a long operation and follow it."""
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="start the operation, print its id and exit (follow it with criud wait)",
    )
    p.add_argument(
        "--cancel-on-interrupt",
        action="store_true",
        help="on ^C cancel the operation without asking (else a terminal asks, and "
        "otherwise it is left running)",
    )


def _add_others(sub: Subparsers) -> None:
    ref_help = "id, name (your own), or OWNER/NAME with OWNER a uid or user name"
    r = sub.add_parser("restore", help="restore a checkpoint")
    r.add_argument("checkpoint", help=ref_help)
    _add_following(r)
    r.add_argument(
        "--inherit-fd",
        action="append",
        default=[],
        metavar="fd[N]:KEY",
        help="hand this command's fd N in for KEY (as criu's option); repeatable",
    )
    r.add_argument(
        "--inherit-path",
        action="append",
        default=[],
        metavar="KEY=PATH[:MODE]",
        help="the daemon opens PATH (mode r, w, a or r+; default a) for KEY",
    )
    r.add_argument(
        "--stdio",
        action="store_true",
        help="hand this command's own fds 0, 1 and 2 in for the tree's (a pipe, pty, FIFO "
        "or file each, as they were at checkpoint)",
    )
    r.add_argument(
        "--lazy",
        action="store_true",
        help="run the tree before its memory is in (criu lazy-pages serves each page on "
        "first touch; needs userfaultfd)",
    )

    sub.add_parser("ls", help="list checkpoints")
    i = sub.add_parser("inspect", help="show one checkpoint")
    i.add_argument("ref", help=ref_help)
    d = sub.add_parser(
        "rm", help="delete a checkpoint, or every one of yours matching --older-than/--label"
    )
    d.add_argument("ref", nargs="?", help=ref_help)
    d.add_argument(
        "--older-than",
        metavar="AGE|TIME",
        help="made before: a duration back from now (7d, 12h, 1h30m) or an RFC 3339 time",
    )
    d.add_argument("--label", action="append", default=[], metavar="K=V", help="repeat to AND")
    d.add_argument("--owner", help="root: only this owner's (uid or user name)")
    lg = sub.add_parser("log", help="print a checkpoint's criu log")
    lg.add_argument("ref", help=ref_help)
    lg.add_argument("--op", choices=["dump", "restore"], default="dump")
    sub.add_parser("ps", help="list restores")
    k = sub.add_parser("kill", help="signal a restored tree")
    k.add_argument("restore_id")
    k.add_argument("signal", nargs="?", default="TERM")


def _add_watch(sub: Subparsers) -> None:
    e = sub.add_parser("events", help="follow the daemon's events, one line each, until ^C")
    e.add_argument(
        "--since", type=_count, metavar="ID", help="first replay the events after this id"
    )
    w = sub.add_parser(
        "wait", help="wait for an operation; exit 0 when done, 1 when it failed or was cancelled"
    )
    w.add_argument("operation", help="an operation id (from ?wait=false or GET /v1/operations)")
    w.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="give up (exit 2) after this long"
    )


def _add_serve_migration(s: argparse.ArgumentParser) -> None:
    """`criud serve`'s migration flags: the page server's address and its TLS files."""
    s.add_argument(
        "--migration-address",
        default=_env("MIGRATION_ADDRESS", None),
        metavar="ADDR",
        help="where an incoming migration's page server listens when asked over the unix "
        "socket (over TCP: the address the request came in on) (env CRIUD_MIGRATION_ADDRESS)",
    )
    for what in ("cacert", "cert", "key"):
        s.add_argument(
            f"--tls-{what}",
            default=_env(f"TLS_{what.upper()}", None),
            metavar="PATH",
            help=f"page server TLS: the {what} (all three or none; env CRIUD_TLS_{what.upper()})",
        )


def _tls_paths(a: argparse.Namespace) -> tuple[Path | None, Path | None, Path | None]:
    """--tls-cacert, --tls-cert, --tls-key: all three or none."""
    given = (a.tls_cacert, a.tls_cert, a.tls_key)
    if any(given) and not all(given):
        raise SystemExit("criud serve: --tls-cacert, --tls-cert and --tls-key go together")
    ca, cert, key = (Path(v) if v else None for v in given)
    return ca, cert, key


def _settings(a: argparse.Namespace) -> Settings:
    ca, cert, key = _tls_paths(a)
    return Settings(
        migration_address=a.migration_address,
        tls_cacert=ca,
        tls_cert=cert,
        tls_key=key,
        socket=Path(a.socket),
        fd_socket=Path(a.fd_socket),
        state_dir=Path(a.state_dir),
        criu=a.criu,
        log_level=a.log_level,
        log_format=a.log_format,
        observability=a.observability == "on",
        socket_group=a.socket_group,
        listen=a.listen,
        token_file=Path(a.token_file) if a.token_file else None,
        quota_root=a.quota_root,
        **{field: getattr(a, flag.replace("-", "_")) for flag, field in _TUNABLE_FIELDS.items()},
    )


def _dump_options(a: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint options given on the command line, as the API names them."""
    return {
        "leave_running": a.leave_running,
        "shell_job": a.shell_job,
        "tcp_established": a.tcp_established,
        "ext_unix_sk": a.ext_unix_sk,
        "file_locks": a.file_locks,
        "external": a.external,
    }


def _restore_mappings(
    a: argparse.Namespace,
) -> tuple[dict[str, int], dict[str, tuple[str, str]]]:
    """`criud restore`'s --inherit-fd and --inherit-path flags: key -> fd, key -> (path, mode)."""
    fds: dict[str, int] = {}
    for spec in a.inherit_fd:
        m = _INHERIT_RE.fullmatch(spec)
        if m is None:
            raise SystemExit(f"criud restore: --inherit-fd {spec!r} is not fd[N]:KEY")
        fds[m.group(2)] = int(m.group(1))
    paths: dict[str, tuple[str, str]] = {}
    for spec in a.inherit_path:
        key, sep, rest = spec.partition("=")
        if not sep:
            raise SystemExit(f"criud restore: --inherit-path {spec!r} is not KEY=PATH[:MODE]")
        path, _, mode = (
            rest.rpartition(":")
            if rest.rsplit(":", 1)[-1] in ("r", "w", "a", "r+")
            else (rest, "", "a")
        )
        paths[key] = (path, mode)
    return fds, paths


def _checkpoints_text(out: list[dict[str, Any]]) -> str:
    rows = [
        {
            **r,
            "owner": _user_name(r["owner_uid"]),
            "created": _when(r["created_at"]),
            "size": r["size_bytes"],
        }
        for r in out
    ]
    return _table(rows, ["id", "owner", "name", "pid", "state", "size", "created", "origin"])


def _restores_text(out: list[dict[str, Any]]) -> str:
    rows = [
        {
            **r,
            "started": _when(r["started_at"]),
            "exit": r["exit_code"] if r["exit_signal"] is None else f"sig {r['exit_signal']}",
        }
        for r in out
    ]
    return _table(rows, ["id", "checkpoint", "pid", "state", "exit", "started"])


def _event_text(ev: dict[str, Any]) -> str:
    """One event as `docker events` prints them: time, type, then the fields as k=v."""
    when = ev.get("time")
    stamp = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when))
        if isinstance(when, int | float)
        else "-"
    )
    rest = " ".join(
        f"{k}={v if isinstance(v, str) else json.dumps(v)}"
        for k, v in ev.items()
        if k not in ("time", "event")
    )
    return f"{stamp} {ev.get('event', '?')} {rest}"


def _run_events(a: argparse.Namespace, cl: Client) -> int:
    # No read timeout: an idle stream is quiet but for a keepalive each 15 s.
    cl.timeout = None
    try:
        for ev in cl.events(a.since):
            print(json.dumps(ev) if a.json else _event_text(ev), flush=True)
    except KeyboardInterrupt:
        return 0
    # The daemon ended the stream: it stopped, or this reader lagged.
    return 1


def _run_wait(a: argparse.Namespace, cl: Client) -> int:
    try:
        op = cl.wait_operation(a.operation, a.timeout)
    except TimeoutError as e:
        print(f"criud wait: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(op, indent=2))
    elif op["state"] == "done":
        res = op.get("result") or {}
        print(f"{op['kind']} {op['id']} done: {op['kind']} {res.get('id', '?')}")
    if op["state"] == "done":
        return 0
    p = op.get("problem") or {}
    print(
        f"criud wait: {op['kind']} {op['id']} {op['state']}: "
        f"{p.get('code', '?')}: {p.get('detail', '')}",
        file=sys.stderr,
    )
    return 1


def _run_rm(a: argparse.Namespace, cl: Client) -> tuple[dict[str, Any], str]:
    """`criud rm REF`, or `criud rm --older-than AGE --label K=V ...` (a bulk delete)."""
    bulk = a.older_than is not None or bool(a.label) or a.owner is not None
    if a.ref is not None and bulk:
        raise SystemExit("criud rm: give a checkpoint, or --older-than/--label, not both")
    if a.ref is None and (a.older_than is None and not a.label):
        raise SystemExit("criud rm: give a checkpoint, or --older-than AGE and/or --label K=V")
    if a.ref is not None:
        cl.delete(a.ref)
        return {"deleted": a.ref}, f"deleted {a.ref}"
    labels: dict[str, str] = {}
    for item in a.label:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise SystemExit(f"criud rm: --label {item!r} is not K=V")
        labels[k] = v
    out = cl.delete_matching(a.older_than, labels, a.owner)
    lines = [
        f"deleted {d['id']}" + (f" ({d['name']})" if d["name"] else "") for d in out["deleted"]
    ]
    lines += [f"skipped {s['id']}: {s['detail']}" for s in out["skipped"]]
    return out, "\n".join(lines) or "nothing matched"


def _run_long(a: argparse.Namespace, cl: Client) -> tuple[dict[str, Any], str] | None:
    """`criud checkpoint` and `criud restore`: (the result, its line); None with --no-wait."""
    if a.cmd == "checkpoint":
        labels = dict(item.split("=", 1) for item in a.label if "=" in item)
        out = _long_op(
            a,
            cl,
            f"checkpoint pid {a.pid}",
            lambda w: cl.checkpoint(a.pid, name=a.name, labels=labels, wait=w, **_dump_options(a)),
        )
        if out is None:
            return None
        return out, (
            f"checkpoint {out['id']} ({out['name'] or 'unnamed'}) of pid {out['pid']}: "
            f"{out['state']}, {out['size_bytes']} bytes"
            + (f"; external: {', '.join(out['external'])}" if out["external"] else "")
        )
    fds, paths = _restore_mappings(a)
    out = _long_op(
        a,
        cl,
        f"restore {a.checkpoint}",
        lambda w: cl.restore(
            a.checkpoint,
            fds=fds,  # type: ignore[arg-type]
            paths=paths,
            stdio=(0, 1, 2) if a.stdio else None,
            wait=w,
            lazy=a.lazy,
        ),
    )
    if out is None:
        return None
    lazy = " (lazy: pages still coming in)" if out.get("lazy") else ""
    return out, f"restore {out['id']}: pid {out['pid']} {out['state']}{lazy}"


def _long_op(
    a: argparse.Namespace, cl: Client, label: str, start: Callable[[bool], dict[str, Any]]
) -> dict[str, Any] | None:
    """Start an operation (start(wait=False)) and follow it; its result (None: --no-wait).

    With stderr a terminal (and without --json) a live bar there shows its
    phase, bytes, rate and time left; stdout gets only the result, as the
    synchronous call printed it.  An operation that failed or was cancelled
    raises its problem, as the synchronous call would have answered it.
    """
    from criud.api.client import CriudClientError

    op = start(False)
    if a.no_wait:
        print(json.dumps(op, indent=2) if a.json else op["id"])
        return None
    final = _follow(a, cl, op["id"], label)
    if final["state"] != "done":
        problem = final.get("problem") or {"code": final["state"], "detail": ""}
        raise CriudClientError(int(problem.get("status") or 500), problem)
    result: dict[str, Any] = final["result"]
    return result


def _follow(a: argparse.Namespace, cl: Client, op_id: str, label: str) -> dict[str, Any]:
    """Poll the operation until it ends (drawing it on a terminal); ^C may cancel it."""
    from criud.daemon import progress

    # The bar goes to stderr: stdout carries the result alone, byte for byte
    # as the synchronous call printed it, terminal or not (a restore's
    # --stdio hands this very stdout to the restored tree).
    tty = sys.stderr.isatty() and not a.json
    while True:
        with progress.interrupt_sets(threading.Event()) as interrupted:
            poll = progress.OperationPoll(cl, op_id, stop=interrupted)
            if tty:
                progress.render(poll, label, stderr=True)
            else:
                for _ in poll:
                    pass
        if poll.final is not None:
            return poll.final
        what = _on_interrupt(a, op_id, tty)
        if what == "cancel":
            return _cancel(cl, op_id)
        if what == "leave":
            print(
                f"criud {a.cmd}: operation {op_id} left running (follow it: criud wait {op_id})",
                file=sys.stderr,
            )
            raise SystemExit(130)
        # "follow": the user said no; draw on.


def _on_interrupt(a: argparse.Namespace, op_id: str, tty: bool) -> str:
    """What ^C does: "cancel", "leave" (running, and exit) or "follow" (on)."""
    if a.cancel_on_interrupt:
        return "cancel"
    if not (tty and sys.stdin.isatty()):
        return "leave"
    print(f"cancel operation {op_id}? [y/N] ", end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        answer = ""
    if not answer.endswith("\n"):  # ^C again, or end of input: leave it
        print(file=sys.stderr)
        return "leave"
    return "cancel" if answer.strip().lower() in ("y", "yes") else "follow"


def _cancel(cl: Client, op_id: str) -> dict[str, Any]:
    """DELETE the operation; the operation as it ended (it may have ended first)."""
    from criud.api.client import CriudClientError

    print(f"cancelling operation {op_id}", file=sys.stderr)
    try:
        return cl.cancel_operation(op_id)
    except CriudClientError as e:
        if e.code != "operation_ended":
            raise
        return cl.operation(op_id)


def _run_client(a: argparse.Namespace) -> int:
    from criud.api.client import Client

    cl = Client(a.socket, a.fd_socket)
    if a.cmd == "events":
        return _run_events(a, cl)
    if a.cmd == "wait":
        return _run_wait(a, cl)
    out: Any
    if a.cmd in ("export", "import"):
        run = cli_archive.run_export if a.cmd == "export" else cli_archive.run_import
        out, text = run(a, cl)
    elif a.cmd == "checkpoint" and a.dry_run:
        out = cl.preflight(a.pid, **_dump_options(a))
        text = _preflight_text(out)
    elif a.cmd == "inspect-pid":
        out = cl.inspect_pid(a.pid)
        text = _tree_text(out)
    elif a.cmd in ("checkpoint", "restore", "migrate"):
        done = cli_migrate.run(a, cl, _long_op) if a.cmd == "migrate" else _run_long(a, cl)
        if done is None:
            return 0
        out, text = done
    elif a.cmd == "ls":
        out = cl.checkpoints()
        text = _checkpoints_text(out)
    elif a.cmd == "inspect":
        out = cl.inspect(a.ref)
        text = json.dumps(out, indent=2)
    elif a.cmd == "rm":
        out, text = _run_rm(a, cl)
    elif a.cmd == "log":
        out = text = cl.log(a.ref, a.op)
    elif a.cmd == "ps":
        out = cl.restores()
        text = _restores_text(out)
    elif a.cmd == "kill":
        out = cl.signal(a.restore_id, a.signal)
        text = f"signalled {a.restore_id} (pid {out['pid']})"
    else:  # pragma: no cover - argparse refuses unknown commands
        raise SystemExit(2)
    # An archive written to stdout keeps it: the summary goes to stderr.
    to = sys.stderr if a.cmd == "export" and a.output == "-" else sys.stdout
    print(json.dumps(out, indent=2) if a.json and not isinstance(out, str) else text, file=to)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `criud` console script."""
    a = build_parser().parse_args(argv)
    if a.cmd == "serve":
        # Before the app's modules: FastAPI builds their routes as they load.
        from criud.daemon import memory

        memory.keep_out_unused()
        from criud.daemon.server import serve

        return serve(_settings(a))
    from criud.api.client import CriudClientError

    try:
        return _run_client(a)
    except CriudClientError as e:
        print(f"criud {a.cmd}: {e.title or e.code}: {e.detail}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ConnectionRefusedError) as e:
        print(
            f"criud {a.cmd}: cannot reach the daemon at {a.socket}: {e.strerror}", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        # Before an operation started, or in a short command: nothing to undo.
        return 130


if __name__ == "__main__":
    sys.exit(main())
