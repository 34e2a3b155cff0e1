"""Who is calling: the identity every core method acts for."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who is asking, from SO_PEERCRED."""

    uid: int
    gid: int
    pid: int
    # Token-authenticated TCP callers act as root but cannot use fd handles,
    # which only exist for unix socket peers.
    via_tcp: bool = False

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def groups(self) -> list[int]:
        """The caller's supplementary groups, read from /proc."""
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        return [int(g) for g in line.split()[1:]]
        except OSError:
            pass
        return []
