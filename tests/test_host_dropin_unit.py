"""Issue 15's pure parts: archive pages and eviction, log pages, what the SDK parses."""

from __future__ import annotations

from pathlib import Path

import pytest
from multidict import MultiDict

from sandboxd.host import archive, logs
from sandboxd.host.model import ApiError, CreateSpec, Record, parse_create
from sandboxd.host.store.records import Store


def _ended(i: int, status: str = "terminated") -> Record:
    rec = Record.new("default", CreateSpec(image_asked="python"), 1000.0 + i)
    rec.id = f"sbx-{i:016x}"
    rec.status = status
    rec.terminated_at = 2000.0 + i
    rec.termination_reason = "user_terminated"
    return rec


def test_archive_pages_cover_every_record_once_both_ways() -> None:
    from tensorlake.sandbox.models import ListArchivedSandboxesResponse

    records = [_ended(i) for i in range(10)]
    seen: list[str] = []
    pages = []
    cursor = None
    while True:
        body = archive.page(records, 3, cursor, None)
        parsed = ListArchivedSandboxesResponse.model_validate(body)  # the SDK's own model
        pages.append(body)
        seen += [s.sandbox_id for s in parsed.sandboxes]
        cursor = body.get("next_cursor")
        if cursor is None:
            break
    assert seen == [r.id for r in reversed(records)]  # newest first, no repeat, no gap
    assert [len(p["sandboxes"]) for p in pages] == [3, 3, 3, 1]
    back = archive.page(records, 3, pages[2]["prev_cursor"], "backward")
    assert back["sandboxes"] == pages[1]["sandboxes"]
    assert parsed.sandboxes[0].image == "python" and parsed.sandboxes[0].archived_at
    for bad_cursor in ("not-base64!", "bnVsbA=="):
        with pytest.raises(ApiError) as e:
            archive.page(records, 3, bad_cursor, None)
        assert e.value.code == "INVALID_CURSOR"
    with pytest.raises(ApiError) as e:
        archive.page(records, 3, None, "sideways")
    assert e.value.code == "INVALID_DIRECTION"


def test_the_store_evicts_the_oldest_ended_records_past_its_bound(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db", archive_max=2)
    live = Record.new("default", CreateSpec(), 1.0)
    store.put(live)
    for i in range(4):
        store.put(_ended(i))
    kept = sorted(r.id for r in store.all() if not r.live)
    assert kept == [_ended(2).id, _ended(3).id]
    assert store.by_id(live.id) is not None  # live ones are never evicted
    store.close()
    again = Store(tmp_path / "s.db", archive_max=2)
    assert sorted(r.id for r in again.all() if not r.live) == kept
    again.close()


def test_log_pages_filter_and_parse_as_the_sdk_reads_them() -> None:
    from tensorlake.sandbox.models import SandboxLogsResponse, SandboxProcessLogFiltersResponse

    rec = _ended(1)
    entries = [
        {"t": i, "level": 3 if i % 2 else 5, "body": f"line {i}", "pid": 7, "command": "sh -c x"}
        | {"stream": "stdout" if i % 2 else "stderr"}
        for i in range(1, 8)
    ]
    first = logs.page(rec, entries, MultiDict(head="3"))
    parsed = SandboxLogsResponse.model_validate(first)
    assert [e.body for e in parsed.logs] == ["line 1", "line 2", "line 3"]
    rest = logs.page(rec, entries, MultiDict(nextToken=parsed.next_token, head="10"))
    assert [e["body"] for e in rest["logs"]] == [f"line {i}" for i in range(4, 8)]
    assert rest["nextToken"] is None
    errors = logs.page(rec, entries, MultiDict([("level", "5")]))
    assert [e["body"] for e in errors["logs"]] == ["line 2", "line 4", "line 6"]
    assert [e["body"] for e in logs.page(rec, entries, MultiDict(tail="2"))["logs"]] == [
        "line 6",
        "line 7",
    ]
    procs = SandboxProcessLogFiltersResponse.model_validate(logs.processes(entries))
    assert [(p.process_id, p.log_count) for p in procs.processes] == [("7", 7)]
    for query, code in (
        (MultiDict(head="0"), "INVALID_HEAD"),
        (MultiDict(head="1", tail="1"), "INVALID_QUERY"),
        (MultiDict(nextToken="%%%"), "INVALID_NEXT_TOKEN"),
        (MultiDict(level="loud"), "INVALID_LEVEL"),
    ):
        with pytest.raises(ApiError) as e:
            logs.page(rec, entries, query)
        assert e.value.code == code


def test_create_keeps_the_image_and_entrypoint_as_asked() -> None:
    spec = parse_create({"image": "python", "entrypoint": ["python3", "-m", "http.server"]})
    assert (spec.image, spec.image_asked) == ("default", "python")
    rec = Record.new("default", spec, 1.0)
    assert rec.entrypoint == ["python3", "-m", "http.server"]
    for body in ({"entrypoint": "sleep"}, {"entrypoint": [""]}, {"entrypoint": [1]}):
        with pytest.raises(ApiError) as e:
            parse_create(body)
        assert e.value.code == "INVALID_ENTRYPOINT"
