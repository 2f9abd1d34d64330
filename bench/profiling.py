"""py-spy around a workload, and a plain-text summary of where the daemon spent its time.

Profiles are taken in a *separate* pass after a figure missed its goal, never
during the measured pass: py-spy's default (blocking) mode stops the target at
every sample, which is what makes its stacks exact and also what would skew
the numbers.
"""

from __future__ import annotations

import collections
import contextlib
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from common import LOAD_CPU, VENV_BIN, pinned

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
RATE_HZ = 250
_WAIT_LEAVES = ("EpollSelector.select (", "select (selectors.py")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


@contextlib.contextmanager
def pyspy(pid: int, name: str) -> Iterator[Path]:
    """Record ``pid`` while the block runs; writes profiles/<name>.txt (a summary)."""
    PROFILE_DIR.mkdir(exist_ok=True)
    raw = PROFILE_DIR / f"{name}.raw"
    # --threads: the event loop (MainThread) is told apart from the file-I/O
    # workers. No --idle: py-spy drops samples of threads blocked in the
    # kernel (epoll_wait, a queue), so samples/expected = how busy a thread was.
    argv = [str(VENV_BIN / "py-spy"), "record", "--pid", str(pid), "--format", "raw"]
    argv += ["--rate", str(RATE_HZ), "--threads", "-o", str(raw)]
    # py-spy runs on the load core: it must not take cycles from the server core.
    spy = subprocess.Popen(
        pinned(LOAD_CPU, argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    time.sleep(0.5)  # attach before the workload starts
    t0 = time.perf_counter()
    try:
        yield raw
    finally:
        seconds = time.perf_counter() - t0 + 0.5
        spy.send_signal(signal.SIGINT)
        try:
            _, err = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        if raw.exists():
            summary = summarize(raw, seconds)
        else:
            summary = f"py-spy wrote nothing: {err.decode()[-500:]}"
        (PROFILE_DIR / f"{name}.txt").write_text(summary)
        raw.unlink(missing_ok=True)  # large; the summary is what the notes cite


def _frame_key(frame: str) -> str:
    m = _FRAME.match(frame)
    return f"{m['func']} ({m['file']})" if m else frame


def _thread_group(frame: str) -> str:
    # "thread (12590): sandboxd-files_3" -> "sandboxd-files"
    name = frame.split(": ", 1)[-1]
    return re.sub(r"_\d+$", "", name)


def summarize(raw: Path, seconds: float, top: int = 25) -> str:
    """Per thread group: how busy; for the event loop: self and inclusive time per function."""
    expected = RATE_HZ * seconds
    per_group: collections.Counter[str] = collections.Counter()
    threads: dict[str, set[str]] = collections.defaultdict(set)
    self_: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    other_self: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        n = int(count_s)
        head, *frames = stack.split(";")
        group = _thread_group(head)
        per_group[group] += n
        threads[group].add(head.split(":", 1)[0])
        keys = [_frame_key(f) for f in frames] or ["(no frames)"]
        if group != "MainThread":
            other_self[f"[{group}] {keys[-1]}"] += n
            continue
        if keys[-1].startswith(_WAIT_LEAVES):
            # py-spy does not always see a thread in epoll_wait as idle.
            per_group[group] -= n
            continue
        self_[keys[-1]] += n
        for f in set(keys):
            incl[f] += n
    main = per_group.get("MainThread", 0)
    out = [
        f"py-spy at {RATE_HZ} Hz over {seconds:.1f} s ({expected:.0f} samples per thread if always busy)",
        "",
    ]
    out.append("busy share of each thread group (samples / expected, per thread;")
    out.append("the event loop's samples inside select() count as idle):")
    for group, n in per_group.most_common():
        k = len(threads[group])
        out.append(f"  {group:<20} {k:>2} thread(s)  {100 * n / expected / k:5.1f}% busy each")
    out += ["", "event loop (MainThread), top self time (share of its busy samples):"]
    out += [f"  {100 * c / max(main, 1):5.1f}%  {f}" for f, c in self_.most_common(top)]
    out += ["", "event loop, top inclusive time in sandboxd code:"]
    ours = [(f, c) for f, c in incl.most_common() if "(sandboxd/" in f]
    out += [f"  {100 * c / max(main, 1):5.1f}%  {f}" for f, c in ours[:top]]
    out += ["", "event loop, top inclusive time, any code:"]
    skip = ("<module>", "main (", "run (", "Runner.run", "run_until_complete", "run_forever")
    anyc = [(f, c) for f, c in incl.most_common() if not f.startswith(skip)]
    out += [f"  {100 * c / max(main, 1):5.1f}%  {f}" for f, c in anyc[:top]]
    if other_self:
        total_other = sum(other_self.values())
        out += ["", "other threads, top self time (share of their busy samples):"]
        out += [f"  {100 * c / total_other:5.1f}%  {f}" for f, c in other_self.most_common(10)]
    return "\n".join(out) + "\n"
