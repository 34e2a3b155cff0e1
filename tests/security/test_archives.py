"""Archives and users (issue 14): who may export, and what a non-root import may become.

An imported archive is hostile input: its criud.json may claim any owner,
any uid for its tree, any credentials for criu.  The checkpoint belongs to
whoever imported it, a non-root importer's criu runs as that importer, and
a tree that ran as someone else is refused at the door.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import tarfile
from pathlib import Path
from typing import Any

from criud.daemon import archive
from tests.integration.helpers import Daemon, Procs, temp_root, wait_for
from tests.security.users import Accounts, User, call_as, run_as, uid_of

IMPORT = r"""
import json, sys
from criud.api.client import Client, CriudClientError
c = Client(sys.argv[1], sys.argv[2])
try:
    with open(sys.argv[3], "rb") as f:
        print(json.dumps([201, c.import_archive(f)]))
except CriudClientError as e:
    print(json.dumps([e.status, e.problem]))
"""

EXPORT = r"""
import io, json, sys
from criud.api.client import Client, CriudClientError
c = Client(sys.argv[1], sys.argv[2])
try:
    out = io.BytesIO()
    n = c.export(sys.argv[3], out, "none")
    print(json.dumps([200, n]))
except CriudClientError as e:
    print(json.dumps([e.status, e.problem]))
"""


def _user_dump(user: User, d: Daemon, procs: Procs) -> dict[str, Any]:
    """A sleep of user's (no supplementary groups), checkpointed by user; its pid freed."""
    p = procs.spawn(
        [
            "setpriv",
            f"--reuid={user.uid}",
            f"--regid={user.gid}",
            "--clear-groups",
            "sleep",
            "1000",
        ],
        cwd="/",
    )
    wait_for(lambda: uid_of(p.pid) == user.uid, 10, what=f"sleep to run as {user.name}")
    st, ck = call_as(user, d, "POST", "/v1/checkpoints", {"pid": p.pid})
    assert st == 201, ck
    p.wait(timeout=10)
    return dict(ck)


def _files(blob: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(blob)) as t:
        for m in t.getmembers():
            f = t.extractfile(m) if m.isreg() else None
            if f is not None and m.name != archive.SUMS_NAME:
                out[m.name] = f.read()
    return out


def _repack(files: dict[str, bytes], edit: Any) -> bytes:
    """files with criud.json edited (edit(doc)), repacked with right sums, as criud writes."""
    doc = json.loads(files["criud.json"])
    edit(doc)
    files = {**files, "criud.json": json.dumps(doc).encode()}
    ms = [archive.Member(n, len(b), lambda b=b: io.BytesIO(b)) for n, b in files.items()]
    return b"".join(archive.compress(archive.tar_stream(ms), "zstd"))


def _import_as(user: User, d: Daemon, root: Path, body: bytes) -> tuple[int, Any]:
    path = root / "archive.tar.zst"
    path.write_bytes(body)
    path.chmod(0o644)
    out = run_as(user, IMPORT, str(d.socket), str(d.fd_socket), str(path))
    assert out.returncode == 0, out.stderr
    st, doc = json.loads(out.stdout)
    return int(st), doc


def _stored_run_as(d: Daemon, ck_id: str) -> Any:
    db = sqlite3.connect(f"file:{d.state_dir / 'criud.db'}?mode=ro", uri=True)
    try:
        (manifest,) = db.execute("SELECT manifest FROM checkpoints WHERE id=?", (ck_id,)).fetchone()
    finally:
        db.close()
    return json.loads(manifest)["run_as"]


def test_export_is_for_the_owner_and_root(users: Accounts, sdaemon: Daemon, procs: Procs) -> None:
    ck = _user_dump(users.bob, sdaemon, procs)
    try:
        for user, want in ((users.alice, 404), (users.bob, 200)):
            out = run_as(user, EXPORT, str(sdaemon.socket), str(sdaemon.fd_socket), ck["id"])
            assert out.returncode == 0, out.stderr
            st, doc = json.loads(out.stdout)
            assert st == want, doc
        assert sdaemon.client.export(ck["id"], io.BytesIO(), "none") > 0
    finally:
        sdaemon.client.delete(ck["id"])


def test_non_root_import_is_the_importers_whatever_it_claims(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    """criud.json says owner 0 and criu as uid 0: bob's import is bob's, restored as bob."""
    bob = users.bob
    ck = _user_dump(bob, sdaemon, procs)
    blob = io.BytesIO()
    sdaemon.client.export(ck["id"], blob, "none")
    sdaemon.client.delete(ck["id"])

    def claim_root(doc: dict[str, Any]) -> None:
        doc["checkpoint"]["owner_uid"] = 0
        doc["manifest"]["run_as"] = [0, bob.gid, []]

    with temp_root() as root:
        st, imp = _import_as(bob, sdaemon, root, _repack(_files(blob.getvalue()), claim_root))
    assert st == 201, imp
    assert imp["owner_uid"] == bob.uid and imp["origin"] == "import:criud"
    assert _stored_run_as(sdaemon, imp["id"]) == [bob.uid, bob.gid, []]
    try:
        # Another user does not see it; bob restores it, and it runs as bob.
        st, doc = call_as(users.alice, sdaemon, "GET", f"/v1/checkpoints/{imp['id']}")
        assert st == 404, doc
        st, r = call_as(bob, sdaemon, "POST", "/v1/restores", {"checkpoint": imp["id"]})
        assert st == 201, r
        procs.adopt(r["pid"])
        assert uid_of(r["pid"]) == bob.uid
        st, _ = call_as(bob, sdaemon, "POST", f"/v1/restores/{r['id']}/signal", {"signal": 9})
        wait_for(lambda: sdaemon.client.get_restore(r["id"])["state"] == "exited", 10, what="exit")
    finally:
        sdaemon.client.delete(imp["id"])


def test_non_root_import_of_someone_elses_tree_is_refused(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    """A tree that ran as uid 0, or criu with a group bob lacks: 403, nothing kept."""
    bob = users.bob
    ck = _user_dump(bob, sdaemon, procs)
    blob = io.BytesIO()
    sdaemon.client.export(ck["id"], blob, "none")
    sdaemon.client.delete(ck["id"])
    files = _files(blob.getvalue())

    def tree_of_root(doc: dict[str, Any]) -> None:
        doc["manifest"]["uids"] = {k: [0, 0, 0, 0] for k in doc["manifest"]["uids"]}

    def group_of_root(doc: dict[str, Any]) -> None:
        doc["manifest"]["run_as"] = [bob.uid, 0, []]

    ck_dir = sdaemon.state_dir / "checkpoints"
    for edit in (tree_of_root, group_of_root):
        before = set(os.listdir(ck_dir))
        with temp_root() as root:
            st, doc = _import_as(bob, sdaemon, root, _repack(files, edit))
        assert (st, doc["code"]) == (403, "permission_denied"), doc
        assert set(os.listdir(ck_dir)) == before
        assert all(c["owner_uid"] != bob.uid for c in sdaemon.client.checkpoints())
    # Root may import the same archive (root restores any tree).
    body = _repack(files, tree_of_root)
    imp = sdaemon.client.import_archive(io.BytesIO(body))
    assert imp["owner_uid"] == 0
    sdaemon.client.delete(imp["id"])


def test_carol_outside_the_group_cannot_import(users: Accounts, sdaemon: Daemon) -> None:
    out = run_as(users.carol, IMPORT, str(sdaemon.socket), str(sdaemon.fd_socket), "/dev/null")
    assert out.returncode != 0 and "PermissionError" in out.stderr
