"""What every figure gets: a scratch directory, the scale of the run, and a log."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

N = TypeVar("N", int, float)


@dataclass
class Ctx:
    scratch: Path
    quick: bool = False  # smaller counts: for trying the suite out, not for results
    log_lines: list[str] = field(default_factory=list)

    def n(self, full: N, quick: N) -> N:
        return quick if self.quick else full

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        self.log_lines.append(line)
        print(line, file=sys.stderr, flush=True)
