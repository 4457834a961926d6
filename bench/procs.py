"""CPU time and memory of a process, from /proc (Linux)."""

from __future__ import annotations

import os
from collections.abc import Callable

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int, children: bool = False) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # utime, stime are fields 14 and 15 (1-based) of the whole line: 12 and 13 after the ")" split
    total = int(fields[11]) + int(fields[12])
    if children:
        total += int(fields[13]) + int(fields[14])
    return total / _TICKS


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE / 1_048_576


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tree(pid: int) -> list[int]:
    """The process and all its descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def _tree_sum(pid: int, measure: Callable[[int], float]) -> float:
    """`measure` summed over a process and its descendants (those that exit meanwhile are skipped)."""
    total = 0.0
    for member in tree(pid):
        try:
            total += measure(member)
        except OSError:
            pass
    return total


def tree_cpu_seconds(pid: int) -> float:
    return _tree_sum(pid, cpu_seconds)


def tree_rss_mb(pid: int) -> float:
    return _tree_sum(pid, rss_mb)
