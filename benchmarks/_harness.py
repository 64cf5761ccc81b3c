"""Shared plumbing for the benchmarks: run each path in its own process, report peak memory."""

import json
import multiprocessing as mp
import queue as queue_module
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _child(target: Callable[..., dict[str, Any]], kwargs: dict[str, Any], queue: mp.Queue) -> None:
    result = target(**kwargs)
    # ru_maxrss is in KiB on Linux: the peak resident memory of this process alone (unless the
    # path reports its own, e.g. one that codes in worker processes).
    result.setdefault("peak_rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    queue.put(result)


def run_isolated(target: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """Run `target(**kwargs)` in a fresh process so each path's memory and threads are its own."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(target, kwargs, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not process.is_alive():  # it died: its traceback is already on stderr
                raise RuntimeError(f"{target.__name__} failed with exit code {process.exitcode}") from None
    process.join()
    return result


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))
    sys.stdout.flush()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.1f}"
    return "" if value is None else str(value)


def save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
