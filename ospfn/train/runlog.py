"""The run log ``<out_dir>/log.jsonl``: one JSON record per logged step, each step once.

``RunLog(path).start(step)`` is called when a run starts or resumes at ``step``: records of later steps
(written by a run that was stopped or killed before its next checkpoint, so those steps are about to run
again) are dropped, and so is a torn last line a kill left behind; the file is rewritten atomically.
``append(record)`` then adds one line per logged step and flushes it, so a killed run loses at most the line
being written.

Non-finite floats (a skipped step's loss) are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``:
the file stays strict JSON, and ``float(value)`` reads them back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ospfn._fs import write_text_atomic

__all__ = ["RunLog", "encode_record"]


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def encode_record(record: dict) -> str:
    """One log line (without the newline): strict JSON, non-finite floats as strings."""
    return json.dumps(_plain(record), allow_nan=False)


def _step_of(line: str):
    """The ``step`` of a log line, None if the line is not a record with an integer step."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class RunLog:
    """Append-only JSON-lines log of a run, truncated to the resumed step on start (see the module doc)."""

    def __init__(self, path) -> None:
        self.path = Path(path)

    def start(self, step: int) -> int:
        """Prepare the log for a run continuing after ``step`` (0 = a fresh run): drop the records of steps
        after ``step`` and a torn (unterminated) last line.  Returns the number of lines dropped."""
        if not self.path.exists():
            return 0
        text = self.path.read_text()
        lines = text.split("\n")
        torn = lines.pop() if lines else ""  # text after the last newline: "" unless a write was cut short
        kept = []
        for line in lines:
            s = _step_of(line)
            if s is None or s <= step:  # lines that are no step record are not ours to judge: kept
                kept.append(line)
        dropped = len(lines) - len(kept) + (1 if torn else 0)
        if dropped:
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        return dropped

    def append(self, record: dict) -> str:
        """Add one record (flushed to the OS before returning); returns the line written."""
        line = encode_record(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        return line

    def records(self) -> list[dict]:
        """The records in the file (lines that are not JSON objects are skipped)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out
