"""SSE framing: the fast quoting path must produce exactly what the JSON encoder would."""

from __future__ import annotations

import json
import random

import pytest

from sandboxd.api import sse
from sandboxd.engine.output import LineRun


def reference(runs: list[LineRun], tag_stream: bool) -> bytes:
    out = []
    for run in runs:
        for text in run.texts:
            event: dict[str, object] = {"line": text, "timestamp": run.timestamp_ms}
            if tag_stream:
                event["stream"] = sse.STREAM_NAMES[run.stream]
            out.append(f"event: output\ndata: {json.dumps(event, separators=(',', ':'))}\n\n")
    return "".join(out).encode()


@pytest.mark.parametrize("seed", range(20))
def test_output_events_match_the_json_encoder(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = [
        "a",
        "Z",
        " ",
        '"',
        "\\",
        "\t",
        "\x01",
        "\x1f",
        "\x7f",
        "é",
        "€",
        "😀",
        "x" * 20,
        "/",
    ]
    for _ in range(200):
        runs = [
            LineRun(
                rng.choice([0, 1]),
                rng.randint(0, 10**13),
                [
                    "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
                    for _ in range(rng.randint(1, 6))
                ],
            )
            for _ in range(rng.randint(0, 3))
        ]
        for tag in (True, False):
            got = sse.output_events(runs, tag)
            assert got == reference(runs, tag)
            for block in got.decode().split("\n\n")[:-1]:
                json.loads(block.split("data: ", 1)[1])
