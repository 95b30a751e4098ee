"""Where backups are kept: the ``BackupStore`` seam (``base``), a local directory (``local``)
and a fault-injecting wrapper for tests (``faults``)."""

from engram.storage.base import BackupStore, Ref, TempObject, info_name, sidecar_name
from engram.storage.local import LocalBackupStore, as_ref, as_store

__all__ = [
    "BackupStore",
    "LocalBackupStore",
    "Ref",
    "TempObject",
    "as_ref",
    "as_store",
    "info_name",
    "sidecar_name",
]
