"""criud.daemon.names: caller-chosen names and generated ids."""

from __future__ import annotations

import pytest

from criud.daemon.errors import InvalidName
from criud.daemon.names import check_name, check_ref, is_id, new_id, split_ref


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "0",
        "web-1",
        "my_ckpt.v2",
        "A.b-c_d",
        "x" * 128,
        "trailing-",
        "trailing.",
        "a.b.c",
    ],
)
def test_valid_names(name: str) -> None:
    assert check_name(name) == name
    assert check_ref(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/",
        "a/b",
        "..",
        "a..b",
        "../etc",
        "%2F",
        "a%2Fb",
        "a\x00b",
        "\x00",
        "x" * 129,
        ".hidden",
        "-rf",
        "_x",
        "a b",
        "a\n",
        "é",
        "name;rm",
        "a:b",
        "ü" * 3,
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName) as ei:
        check_name(name)
    assert ei.value.code == "invalid_name"
    assert ei.value.status == 422
    assert repr(name) in ei.value.detail
    with pytest.raises(InvalidName):
        check_ref(name)


def test_new_id_shape_and_uniqueness() -> None:
    ids = {new_id() for _ in range(200)}
    assert len(ids) == 200
    for i in ids:
        assert len(i) == 24
        assert is_id(i)
        assert check_ref(i) == i


@pytest.mark.parametrize(
    "value",
    ["0123456789abcdef01234567"[:-1], "0123456789abcdef012345678", "0123456789ABCDEF01234567"],
)
def test_not_ids(value: str) -> None:
    assert not is_id(value)


def test_uppercase_hex_is_still_a_valid_name() -> None:
    value = "0123456789ABCDEF01234567"
    assert not is_id(value)
    assert check_ref(value) == value


def test_id_with_newline_is_not_an_id() -> None:
    assert not is_id("0123456789abcdef01234567\n")
    with pytest.raises(InvalidName):
        check_ref("0123456789abcdef01234567\n")


@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("web", (None, "web")),
        ("1000/web", ("1000", "web")),
        ("alice/web", ("alice", "web")),
        ("svc_x$/0123456789abcdef01234567", ("svc_x$", "0123456789abcdef01234567")),
    ],
)
def test_split_ref(ref: str, want: tuple[str | None, str]) -> None:
    assert split_ref(ref) == want


@pytest.mark.parametrize(
    "ref", ["/web", "alice/", "a/b/c", "../web", "./web", "alice/..", "-x/web", "1" * 11 + "/web"]
)
def test_split_ref_refuses(ref: str) -> None:
    with pytest.raises(InvalidName):
        split_ref(ref)
