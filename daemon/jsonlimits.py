"""A guard for JSON from callers: how deeply it nests, counted without parsing.

Python's json module recurses once per level and raises RecursionError (not
a ValueError) on a deep enough document.  Both the HTTP API and the fd
socket check the depth first, so a hostile document is refused, never a
crash or an escaped exception.
"""

from __future__ import annotations

MAX_DEPTH = 32


def json_depth(body: bytes) -> int:
    """Deepest nesting of [ and { in a JSON text, ignoring strings."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in body:
        if in_string:
            if escaped:
                escaped = False
            elif ch == 0x5C:  # backslash
                escaped = True
            elif ch == 0x22:  # quote
                in_string = False
        elif ch == 0x22:
            in_string = True
        elif ch in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return deepest
