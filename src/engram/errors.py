"""One error tree for engram.

Every error a user can hit is an ``EngramError``: its message says what went wrong and what to do
next, in one line. ``exit_code`` is stable per class (README "CLI" has the table: 1 = failure,
2 = usage, 3 = refused because of the state of a file, directory or server); ``http_status`` is
what the server answers with. Nothing here logs: errors are returned up to the adapter that
renders them (CLI line, HTTP JSON body).
"""

from __future__ import annotations

from typing import Any


class EngramError(Exception):
    """engram failed."""

    exit_code = 1
    http_status = 500
    code = "error"

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message or (self.__doc__ or self.code).strip()
        self.details = details
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.code, "message": self.message}
        out.update({k: v for k, v in self.details.items() if v is not None})
        return out


class UsageError(EngramError):
    """Invalid usage; see --help."""

    exit_code = 2
    http_status = 400
    code = "usage"


class ValidationError(UsageError):
    """A field of the request is invalid."""

    code = "invalid"

    def __init__(self, message: str, field: str | None = None, **details: Any) -> None:
        super().__init__(message, field=field, **details)
        self.field = field


class Refused(EngramError):
    """Refused because of the current state (a name that exists, a non-empty target, no server
    to ask); nothing was changed."""

    # Not a bad command line (2) and not a failure (1): the same command succeeds once the state
    # is changed (a new name, --force, a running server), which a script may want to tell apart.
    exit_code = 3
    http_status = 409
    code = "refused"


class NotFound(EngramError):
    """Not found."""

    exit_code = 1
    http_status = 404
    code = "not_found"


class Conflict(EngramError):
    """The request conflicts with the current state."""

    exit_code = 1
    http_status = 409
    code = "conflict"


class Unavailable(EngramError):
    """The database is not accepting writes right now; retry shortly."""

    exit_code = 1
    http_status = 503
    code = "unavailable"

    def __init__(self, message: str | None = None, retry_after: float = 1.0, **details: Any):
        super().__init__(message, retry_after=retry_after, **details)
        self.retry_after = retry_after


class DataDirError(EngramError):
    """The data directory cannot be used."""

    code = "data_dir"


class NotInitialized(DataDirError, Refused):
    """The directory is not an engram data dir; run `engram init` first."""

    code = "not_initialized"


class DataDirLocked(DataDirError):
    """The data directory is owned by another process."""

    code = "locked"

    def __init__(self, message: str, pid: int | None = None, url: str | None = None) -> None:
        super().__init__(message, pid=pid, url=url)
        self.pid = pid
        self.url = url


class DiskFull(DataDirError):
    """The disk is full; free space and run the command again."""

    # Nothing is damaged and nothing is the client's fault: the server cannot store more.
    http_status = 507
    code = "disk_full"


class CorruptLog(EngramError):
    """The operation log is damaged."""

    code = "corrupt_log"

    def __init__(self, message: str, segment: str | None = None, offset: int | None = None):
        super().__init__(message, segment=segment, offset=offset)
        self.segment = segment
        self.offset = offset


class ForeignLog(EngramError):
    """The log belongs to another database."""

    code = "foreign_log"


class LogGap(EngramError):
    """Records are missing from the log."""

    code = "log_gap"


class CorruptData(EngramError):
    """Stored data is damaged."""

    # A read that meets damage is not the client's fault and not a crash of the server: the
    # data cannot be served until it is repaired or restored (503, with the way out named).
    http_status = 503
    code = "corrupt_data"


class BackupError(EngramError):
    """The backup failed; nothing was written at the output path."""

    code = "backup_failed"


class BadArchive(EngramError):
    """The archive is not a valid engram backup."""

    code = "bad_archive"


class RestoreError(EngramError):
    """The restore failed; the target was not changed."""

    code = "restore_failed"


class RemoteError(EngramError):
    """The engram server answered with an error."""

    code = "remote"
