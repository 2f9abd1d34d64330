"""The edge's pure rules, case by case: which names are loopback, which origins are ours."""

from __future__ import annotations

import pytest

from sandboxd.edge.body import is_json_type
from sandboxd.edge.crosssite import is_loopback_name, origin_allowed, split_host
from sandboxd.edge.errors import ApiError, ErrorMap


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost:8900", ("localhost", 8900)),
        ("[::1]:8900", ("::1", 8900)),
        ("[::1]", ("::1", None)),
        ("Example.COM.", ("example.com", None)),
        ("sbx-1.local:80", ("sbx-1.local", 80)),
        ("a:b", ("a", -1)),
    ],
)
def test_split_host(value: str, expected: tuple[str, int | None]) -> None:
    assert split_host(value) == expected


@pytest.mark.parametrize(
    "name", ["localhost", "127.0.0.1", "127.9.9.9", "::1", "a.localhost", "sbx-ab12.local"]
)
def test_loopback_names(name: str) -> None:
    assert is_loopback_name(name)


@pytest.mark.parametrize(
    "name", ["evil.example", "localhost.evil.example", "10.0.0.1", "0.0.0.0", "::", "local"]
)
def test_names_that_are_not_loopback(name: str) -> None:
    assert not is_loopback_name(name)


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        ("http://127.0.0.1:8900", "sbx-1.local", True),  # the SDK's websocket client
        ("http://localhost:8900", "127.0.0.1:8900", True),
        ("http://[::1]:8900", "localhost:8900", True),
        ("http://app.example:8900", "app.example:8900", True),  # same origin
        ("https://app.example", "app.example", True),
        ("http://app.example", "app.example:8900", False),  # another port
        ("http://127.0.0.1:3000", "127.0.0.1:8900", False),  # another local server
        ("http://8000-sbx-1.localhost:8900", "127.0.0.1:8900", False),  # a sandbox's app
        ("http://evil.example", "127.0.0.1:8900", False),
        ("null", "127.0.0.1:8900", False),
        ("file://", "127.0.0.1:8900", False),
    ],
)
def test_origins(origin: str, host: str, allowed: bool) -> None:
    assert origin_allowed(origin, host, 8900) is allowed


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/merge-patch+json", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("", False),
    ],
)
def test_json_types(value: str, ok: bool) -> None:
    assert is_json_type(value) is ok


def test_the_error_map_takes_the_most_specific_class() -> None:
    class Base(Exception):
        pass

    class Child(Base):
        pass

    errors = ErrorMap()
    errors.add(Base, 409, "BASE")
    errors.add_mapper(Child, lambda e: ApiError(404, "CHILD", str(e)))
    errors.add_mapper(KeyError, lambda e: None)  # "not mine"
    child = errors.lookup(Child("gone"))
    assert child is not None and (child.status, child.code, child.message) == (404, "CHILD", "gone")
    base = errors.lookup(Base("busy"))
    assert base is not None and (base.status, base.code) == (409, "BASE")
    assert errors.lookup(KeyError("x")) is None
    assert errors.lookup(ValueError("x")) is None
