"""`criud migrate`: move a running tree (or a checkpoint) to another daemon, with progress."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from criud.api.client import Client

# start(wait) -> the operation (wait=False) or the result; as cli._long_op takes it.
LongOp = Callable[
    [argparse.Namespace, "Client", str, Callable[[bool], dict[str, Any]]], dict[str, Any] | None
]


def add_parser(sub: Any, following: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `migrate` subcommand; following adds --no-wait and the ^C flags."""
    m = sub.add_parser(
        "migrate",
        help="move a running process tree to another criud (page-server push; root's only)",
    )
    m.add_argument("pid", type=int, nargs="?", help="root of the tree to move")
    m.add_argument("--checkpoint", metavar="REF", help="instead of a pid: ship this checkpoint")
    m.add_argument("--to", required=True, metavar="URL", help="the destination: http://ADDR:PORT")
    m.add_argument(
        "--token-file",
        default=os.environ.get("CRIUD_TARGET_TOKEN_FILE"),
        help="file holding the destination's bearer token (env CRIUD_TARGET_TOKEN_FILE)",
    )
    m.add_argument("--name", help="the checkpoint's name on the destination")
    m.add_argument("--leave-running", action="store_true", help="keep the source running (a copy)")
    m.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None)
    following(m)


def _token(a: argparse.Namespace) -> str:
    if not a.token_file:
        raise SystemExit("criud migrate: --token-file (or CRIUD_TARGET_TOKEN_FILE) is required")
    try:
        with open(a.token_file) as f:
            return f.read().strip()
    except OSError as e:
        raise SystemExit(f"criud migrate: {a.token_file}: {e.strerror}") from None


def run(a: argparse.Namespace, cl: Client, long_op: LongOp) -> tuple[dict[str, Any], str] | None:
    """Start the migration and follow it; (the result, its line), None with --no-wait."""
    if (a.pid is None) == (a.checkpoint is None):
        raise SystemExit("criud migrate: give a PID or --checkpoint REF (one of them)")
    token = _token(a)
    opts: dict[str, Any] = {"leave_running": a.leave_running}
    if a.name is not None:
        opts["name"] = a.name
    if a.tls is not None:
        opts["tls"] = a.tls
    what = f"pid {a.pid}" if a.pid is not None else f"checkpoint {a.checkpoint}"
    out = long_op(
        a,
        cl,
        f"migrate {what}",
        lambda w: cl.migrate(a.to, token, pid=a.pid, checkpoint=a.checkpoint, wait=w, **opts),
    )
    if out is None:
        return None
    t = out["timing"]
    return out, (
        f"migrated {what} to {out['destination']}: checkpoint {out['checkpoint']}; "
        f"frozen {t['frozen']:.3f} s, pages {t['pages']:.3f} s, "
        f"other images {t['other_images']:.3f} s, total {t['total']:.3f} s"
    )
