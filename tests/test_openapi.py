"""The OpenAPI document: it covers exactly the router's routes, and real replies conform to it.

The fuzzer (``test_openapi_fuzz.py``) rarely reaches the deep happy paths
(a managed process with a health check, a dropped-output body, a 206); the
conformance cases here do, and are checked by schemathesis against the served
document, the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import schemathesis

from sandboxd.api import openapi
from sandboxd.api.app import create_app
from sandboxd.config import Settings

from .conftest import Daemon, wait_for


def router_routes() -> set[tuple[str, str]]:
    """(method, template) of every route the app serves; HEAD is GET's twin."""
    app = create_app(Settings())
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def document_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


def test_every_route_is_documented_and_nothing_else() -> None:
    served = router_routes()
    documented = document_routes(openapi.document())
    assert served - documented == set(), "routes without a contract: add them to openapi.OPERATIONS"
    assert documented - served == set(), "documented routes the daemon does not serve"


def test_closed_path_parameters_match_the_router() -> None:
    """The enum of ``{stream}`` is the router's regex alternatives, no more, no fewer."""
    app = create_app(Settings())
    patterns = {
        route.resource.canonical: route.resource.get_info().get("pattern")
        for route in app.router.routes()
        if route.resource is not None
    }
    candidates = {"stdout", "stderr", "output", "stdin", "raw", "follow", "x"}
    checked = 0
    for op in openapi.OPERATIONS:
        for name, values in op.path_enums.items():
            pattern = patterns[op.path]
            assert isinstance(pattern, re.Pattern)

            def concrete(value: str, path: str = op.path, name: str = name) -> str:
                return path.replace("{p}", "1").replace("{" + name + "}", value)

            matching = {v for v in candidates | set(values) if pattern.fullmatch(concrete(v))}
            assert matching == set(values), (op.method, op.path)
            checked += 1
    assert checked >= 3


def test_the_document_is_served_and_loads(http: httpx.Client) -> None:
    r = http.get("/api/v1/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc == json.loads(json.dumps(openapi.document()))
    assert doc["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(doc)
    assert len([op for op in schema.get_all_operations() if op.ok()]) == len(openapi.OPERATIONS)
    # Every $ref points at a component that exists.
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs <= doc["components"]["schemas"].keys()


def test_request_schemas_come_from_the_validating_models() -> None:
    doc = openapi.document()
    components = doc["components"]["schemas"]
    for op in openapi.OPERATIONS:
        if op.body is not None:
            generated = op.body.model_json_schema(ref_template=openapi.REF)
            generated.pop("$defs", None)
            assert components[op.body.__name__] == generated, op.path
    start = components["StartProcessRequest"]
    assert start["required"] == ["command"]
    assert components["CreatePtyRequest"]["required"] == ["command"]
    params = doc["paths"]["/api/v1/tunnels/tcp"]["get"]["parameters"]
    port = next(p for p in params if p["name"] == "port")
    assert port["required"] is True
    assert (port["schema"]["minimum"], port["schema"]["maximum"]) == (1, 65535)


# --- real replies, checked against the served document ---


@pytest.fixture
def conforms(daemon: Daemon) -> Iterator[Callable[..., httpx.Response]]:
    """Send a request and check the reply against the document, as the fuzzer does."""
    doc = httpx.get(f"{daemon.url}/api/v1/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    with daemon.http() as http:

        def send(
            method: str, template: str, path: str | None = None, **kwargs: Any
        ) -> httpx.Response:
            r = http.request(method, path or template, **kwargs)
            operation = schema[template][method]
            parts: dict[str, Any] = {
                "path_parameters": dict(_path_params(template, path or template))
            }
            if "params" in kwargs:
                parts["query"] = kwargs["params"]
            if "json" in kwargs:
                parts["body"] = kwargs["json"]
            operation.Case(**parts).validate_response(r)
            return r

        yield send


def _path_params(template: str, path: str) -> Iterator[tuple[str, str]]:
    names = re.findall(r"\{(\w+)\}", template)
    regex = re.escape(template)
    for name in names:
        regex = regex.replace(re.escape("{" + name + "}"), f"(?P<{name}>[^/]+)")
    m = re.fullmatch(regex, path)
    assert m, (template, path)
    yield from m.groupdict().items()


def test_managed_process_replies_conform(conforms: Callable[..., httpx.Response]) -> None:
    body = {
        "command": "sh",
        "args": ["-c", "echo out; echo err >&2; exec sleep 30"],
        "name": "conformance-web",
        "restart": {"policy": "always", "max_restarts": 2},
        "health_check": {"type": "tcp", "port": 1, "interval_ms": 50, "initial_delay_ms": 0},
        "stdin_mode": "pipe",
    }
    started = conforms("POST", "/api/v1/processes", json=body).json()
    assert started["managed"]["name"] == "conformance-web"
    p = started["pid"]
    pid_path = "/api/v1/processes/{p}"
    conforms("GET", pid_path, f"/api/v1/processes/{p}")
    conforms("GET", pid_path, "/api/v1/processes/conformance-web")
    conforms("GET", "/api/v1/processes")
    wait_for(
        lambda: (
            conforms(
                "GET", "/api/v1/processes/{p}/{stream}", f"/api/v1/processes/{p}/output"
            ).json()["line_count"]
            == 2
        )
    )
    conforms("GET", "/api/v1/processes/{p}/{stream}/raw", f"/api/v1/processes/{p}/stderr/raw")
    conforms("POST", "/api/v1/processes/{p}/stdin", f"/api/v1/processes/{p}/stdin", content=b"x")
    conforms("POST", "/api/v1/processes/{p}/stdin/close", f"/api/v1/processes/{p}/stdin/close")
    conforms(
        "POST", "/api/v1/processes/{p}/signal", f"/api/v1/processes/{p}/signal", json={"signal": 0}
    )
    new = conforms("POST", "/api/v1/processes/{p}/restart", f"/api/v1/processes/{p}/restart").json()
    assert new["pid"] != p
    conforms("DELETE", pid_path, "/api/v1/processes/conformance-web")
    gone = conforms("GET", pid_path, f"/api/v1/processes/{new['pid']}").json()
    assert gone["managed"]["status"] == "stopped"
    conforms("POST", "/api/v1/processes/{p}/restart", f"/api/v1/processes/{new['pid']}/restart")
    conforms("GET", "/api/v1/processes/{p}/{stream}/follow", f"/api/v1/processes/{p}/output/follow")


def test_run_and_dropped_output_conform(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("--output-cap", "16K")
    doc = httpx.get(f"{d.url}/api/v1/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    with d.http() as http:
        r = http.post(
            "/api/v1/processes/run",
            json={"command": "sh", "args": ["-c", "seq 1 20000; echo e >&2"], "timeout": 10},
        )
        schema["/api/v1/processes/run"]["POST"].Case(body={}).validate_response(r)
        assert "event: exit" in r.text
        p = http.post("/api/v1/processes", json={"command": "seq", "args": ["1", "20000"]}).json()
        wait_for(lambda: http.get(f"/api/v1/processes/{p['pid']}").json()["status"] != "running")
        for stream in ("stdout", "output"):
            path = f"/api/v1/processes/{p['pid']}/{stream}"
            params = {"p": str(p["pid"]), "stream": stream}
            out = http.get(path)
            schema["/api/v1/processes/{p}/{stream}"]["GET"].Case(
                path_parameters=params
            ).validate_response(out)
            assert out.json()["truncated"] is True
            follow = http.get(path + "/follow")
            schema["/api/v1/processes/{p}/{stream}/follow"]["GET"].Case(
                path_parameters=params
            ).validate_response(follow)
            assert follow.text.startswith("event: dropped")


def test_files_and_pty_replies_conform(
    conforms: Callable[..., httpx.Response], tmp_path: Any
) -> None:
    target = str(tmp_path / "dir" / "f.txt")
    conforms("PUT", "/api/v1/files", params={"path": target}, content=b"0123456789")
    conforms("GET", "/api/v1/files", params={"path": target})
    ranged = conforms(
        "GET", "/api/v1/files", params={"path": target}, headers={"Range": "bytes=2-4"}
    )
    assert ranged.status_code == 206 and ranged.content == b"234"
    conforms("GET", "/api/v1/files", params={"path": target}, headers={"Range": "bytes=99-"})
    conforms("GET", "/api/v1/files", params={"path": str(tmp_path)})
    conforms("GET", "/api/v1/files/list", params={"path": str(tmp_path)})
    conforms("GET", "/api/v1/files/list", params={"path": target})
    conforms("GET", "/api/v1/files", params={"path": "/a/../b"})
    conforms("DELETE", "/api/v1/files", params={"path": target})
    conforms("DELETE", "/api/v1/files", params={"path": target})

    made = conforms("POST", "/api/v1/pty", json={"command": "sh", "rows": 5, "cols": 9}).json()
    sid = made["session_id"]
    conforms("GET", "/api/v1/pty")
    conforms("GET", "/api/v1/pty/{sid}", f"/api/v1/pty/{sid}")
    conforms(
        "POST", "/api/v1/pty/{sid}/resize", f"/api/v1/pty/{sid}/resize", json={"rows": 1, "cols": 2}
    )
    conforms("POST", "/api/v1/pty/{sid}/resize", f"/api/v1/pty/{sid}/resize", json={"rows": "x"})
    conforms("DELETE", "/api/v1/pty/{sid}", f"/api/v1/pty/{sid}")
    conforms("DELETE", "/api/v1/pty/{sid}", f"/api/v1/pty/{sid}")
    conforms("POST", "/api/v1/pty", json={"command": "no-such-command-xyz"})
    conforms("GET", "/api/v1/health")
    conforms("GET", "/api/v1/info")
    conforms("GET", "/metrics")
    conforms("GET", "/api/v1/openapi.json")
