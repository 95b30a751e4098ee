"""What `engram verify` found: the report (its JSON shape is what ``--json`` prints), the
bookkeeping the checks write their findings through, and the text rendering."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram.backup.rowcheck import MAX_LISTED

CHECKS = ("identity", "sqlite", "memories", "edges", "cold", "oplog", "digest")


@dataclass(frozen=True)
class Problem:
    check: str
    location: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"check": self.check, "location": self.location, "message": self.message}


@dataclass
class CheckResult:
    """One check's outcome: ``status`` is ok, fail or skipped; ``problems`` counts all found."""

    name: str
    status: str = "ok"
    detail: str = ""
    problems: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "detail": self.detail,
            "problems": self.problems,
            "seconds": round(self.seconds, 6),
        }


@dataclass
class VerifyReport:
    root: Path
    check_all: bool
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    checks: dict[str, CheckResult] = field(
        default_factory=lambda: {n: CheckResult(n) for n in CHECKS}
    )
    database_id: str | None = None
    live: bool = False
    sqlite_check: str = "quick_check"
    memories: int = 0
    edges: int = 0
    cold_stubs: int = 0
    cold_segments: int = 0
    applied_lsn: int | None = None
    log_first_lsn: int | None = None
    log_last_lsn: int | None = None
    segments_checked: int = 0
    records_checked: int = 0
    digest_stored: str | None = None
    digest_recomputed: str | None = None
    log_end_digest: str | None = None
    seconds: float = 0.0
    # What FTS5's check said of a full-text index that disagrees with its rows (--check-all),
    # for a caller that words the way out itself (validation: the backup is damaged). The
    # problem is also in ``problems``; not part of the JSON.
    index_problem: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def durations(self) -> dict[str, float]:
        return {n: c.seconds for n, c in self.checks.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "data_dir": str(self.root),
            "check_all": self.check_all,
            "database_id": self.database_id,
            "live": self.live,
            "sqlite_check": self.sqlite_check,
            "memories": self.memories,
            "edges": self.edges,
            "cold_stubs": self.cold_stubs,
            "cold_segments": self.cold_segments,
            "applied_lsn": self.applied_lsn,
            "log_first_lsn": self.log_first_lsn,
            "log_last_lsn": self.log_last_lsn,
            "segments_checked": self.segments_checked,
            "records_checked": self.records_checked,
            "digest_stored": self.digest_stored,
            "digest_recomputed": self.digest_recomputed,
            "log_end_digest": self.log_end_digest,
            "seconds": round(self.seconds, 6),
            "checks": {n: c.to_dict() for n, c in self.checks.items()},
            "problems": [p.to_dict() for p in self.problems],
            "warnings": [w.to_dict() for w in self.warnings],
        }


class Findings:
    """The report being written: every problem is counted on its check, and listed up to
    ``MAX_LISTED`` per check (``finish`` then says how many more there were), so a badly
    damaged store still gives a readable report. ``digest_seconds`` gathers the time spent
    hashing during other checks' scans: it is the digest check's time, not theirs."""

    def __init__(self, report: VerifyReport) -> None:
        self.report = report
        self.listed: dict[str, int] = {n: 0 for n in CHECKS}
        self.digest_seconds = 0.0

    def problem(self, check: str, location: str, message: str) -> None:
        c = self.report.checks[check]
        c.problems += 1
        c.status = "fail"
        if self.listed[check] < MAX_LISTED:
            self.listed[check] += 1
            self.report.problems.append(Problem(check, location, message))

    def unlisted(self, check: str, n: int) -> None:
        """``n`` more problems of ``check`` found elsewhere and not listed there."""
        if n > 0:
            c = self.report.checks[check]
            c.problems += n
            c.status = "fail"

    def warn(self, check: str, location: str, message: str) -> None:
        self.report.warnings.append(Problem(check, location, message))

    def skip(self, check: str, why: str) -> None:
        c = self.report.checks[check]
        if c.status == "ok":
            c.status = "skipped"
        c.detail = why

    def finish(self) -> None:
        for name, c in self.report.checks.items():
            if c.problems > self.listed[name]:
                more = c.problems - self.listed[name]
                self.report.problems.append(
                    Problem(name, "*", f"and {more} more problems of this check not listed")
                )


def short(hexd: str | None) -> str:
    return f"{hexd[:16]}…" if hexd else "-"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def render_text(report: VerifyReport) -> str:
    """A readable summary: one line per check, then each problem and warning as
    ``location: message``."""
    mode = "integrity_check" if report.check_all else "quick_check"
    lines = [f"verify {report.root} ({mode}{', live' if report.live else ''})"]
    for name, c in report.checks.items():
        status = {"ok": "ok", "fail": "FAIL", "skipped": "skip"}[c.status]
        extra = f", {_count(c.problems, 'problem')}" if c.problems else ""
        lines.append(f"  {name:<9} {status:<5} {c.detail}{extra} ({c.seconds:.2f}s)")
    n, w = len(report.problems), len(report.warnings)
    total = sum(c.problems for c in report.checks.values())
    verdict = "OK" if report.ok else "FAIL"
    lines.append(
        f"result: {verdict}: {_count(total, 'problem')}, {_count(w, 'warning')} "
        f"({report.seconds:.2f}s)"
    )
    if n:
        lines.append("problems:")
        lines += [f"  {p.location}: {p.message}" for p in report.problems]
    if w:
        lines.append("warnings:")
        lines += [f"  {p.location}: {p.message}" for p in report.warnings]
    return "\n".join(lines) + "\n"
