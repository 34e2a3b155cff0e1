"""Validation of caller-chosen names and of ids we generate.

Nothing a caller sends is ever joined into a filesystem path: directories are
named by ids criud generates, and a name is only a lookup key.  Still, names
are held to a strict alphabet so they are safe in logs, URLs and shells.
"""

from __future__ import annotations

import re
import secrets

from criud.daemon.errors import InvalidName

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Ids are 24 lowercase hex digits; a distinct shape from most names, and never
# anything a path could be built from unsafely.
ID_RE = re.compile(r"[0-9a-f]{24}")
# The owner part of "owner/name": a uid, or a user name as useradd allows it.
UID_RE = re.compile(r"[0-9]{1,10}")
USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?")


def new_id() -> str:
    """Return a fresh random id."""
    return secrets.token_hex(12)


def is_id(value: str) -> bool:
    """Tell whether value has the shape of an id criud generates."""
    return ID_RE.fullmatch(value) is not None


def check_name(value: str) -> str:
    """Return value if it is a valid name, else raise InvalidName."""
    if NAME_RE.fullmatch(value) is None or ".." in value:
        raise InvalidName(
            f"invalid name {value!r}: a name is 1-128 characters of [A-Za-z0-9_.-], "
            "starts with a letter or digit, and has no '..'"
        )
    return value


def check_ref(value: str) -> str:
    """Validate an id-or-name given in a URL or a request body."""
    if is_id(value):
        return value
    return check_name(value)


def check_owner(value: str) -> str:
    """Return value if it can name an owner (a uid or a user name), else raise InvalidName."""
    # All digits is a uid (useradd refuses numeric user names).
    pattern = UID_RE if value.isdigit() else USER_RE
    if pattern.fullmatch(value) is None:
        raise InvalidName(f"invalid owner {value!r}: give a uid or a user name")
    return value


def split_ref(value: str) -> tuple[str | None, str]:
    """Validate a checkpoint reference of a request body: "ref" or "owner/ref".

    Returns (owner or None, id-or-name).
    """
    owner, sep, ref = value.partition("/")
    if not sep:
        return None, check_ref(value)
    return check_owner(owner), check_ref(ref)
