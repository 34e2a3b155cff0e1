"""The fixture itself: the users are real, and the socket group is what lets them in."""

from __future__ import annotations

from tests.integration.helpers import Daemon
from tests.security.users import Accounts, call_as, run_as


def test_socket_group_lets_members_in_and_keeps_others_out(
    users: Accounts, sdaemon: Daemon
) -> None:
    st, body = call_as(users.bob, sdaemon, "GET", "/v1/checkpoints")
    assert (st, body) == (200, [])
    st, body = call_as(users.carol, sdaemon, "GET", "/v1/checkpoints")
    assert st == 0 and body["errno"] == 13  # EACCES on connect
    out = run_as(users.alice, "import os; print(sorted(os.getgroups()))")
    assert out.returncode == 0, out.stderr
    assert tuple(eval(out.stdout)) == users.alice.groups
