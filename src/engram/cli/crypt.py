"""The encryption options every backup command shares, and what wraps a command's destination or
source with them (docs/DESIGN.md "Encryption"): ``--encrypt-to`` / ``--recipients-file`` on the
commands that write backups (backup, push, sync), ``--identity`` on those that read them
(restore, restore-pitr, apply-log, validate-backup, pull). A command wraps its destination only
when given recipients and its source only when given an identity; nothing else changes.

The identity file is read here and handed down as key objects: its text is never printed,
logged or put into a result.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from engram.errors import UsageError

if TYPE_CHECKING:
    from engram.storage import BackupStore, Ref

EncryptTo = Annotated[
    list[str] | None,
    typer.Option(
        "--encrypt-to",
        help="Encrypt the backup to this age recipient (age1…, a public key); repeatable.",
    ),
]
RecipientsFile = Annotated[
    Path | None,
    typer.Option(
        "--recipients-file",
        help="Encrypt to every age recipient in this file (one age1… a line, # comments).",
    ),
]
Identity = Annotated[
    Path | None,
    typer.Option(
        "--identity",
        help="Decrypt encrypted backups with the age identity in this file (age-keygen's).",
    ),
]


def recipients(encrypt_to: list[str] | None, recipients_file: Path | None) -> list[str]:
    """The recipients the options name, checked; [] when neither is given."""
    from engram.backup.encrypted import parse_recipients, read_recipients_file

    out = parse_recipients(encrypt_to or [])
    if recipients_file is not None:
        out += [r for r in read_recipients_file(recipients_file) if r not in out]
    return out


def identities(identity: Path | None) -> list[Any]:
    """The identities of ``--identity`` ([] without it); warns when others can read the file."""
    if identity is None:
        return []
    from engram.backup.encrypted import read_identities

    ids = read_identities(identity)
    with contextlib.suppress(OSError):
        if os.stat(identity).st_mode & 0o077:
            print(
                f"warning: the identity file {identity} can be read by other users; "
                f"chmod 600 {identity}",
                file=sys.stderr,
            )
    return ids


def _store_and_name(where: Path | Ref) -> tuple[BackupStore, str]:
    from engram.storage import LocalBackupStore, Ref

    if isinstance(where, Ref):
        return where.store, where.name
    p = Path(where).absolute()
    return LocalBackupStore(p.parent), p.name


def encrypting(output: Path | Ref, rcpts: list[str]) -> Ref:
    """``output`` (a path or an object of a store) written encrypted to ``rcpts``."""
    from engram.backup.encrypted import EncryptedStore
    from engram.storage import Ref

    store, name = _store_and_name(output)
    return Ref(EncryptedStore(store, recipients=rcpts), name)


def encrypting_store(store: BackupStore, rcpts: list[str]) -> BackupStore:
    """A repository written encrypted to ``rcpts`` (unchanged without any): every backup copied
    into it is encrypted as it is written (push, sync)."""
    if not rcpts:
        return store
    from engram.backup.encrypted import EncryptedStore

    return EncryptedStore(store, recipients=rcpts)


def pull_decrypted(src: Ref, directory: str, ids: list[Any]) -> Path | None:
    """``pull --identity``: an encrypted backup decrypted into the local ``directory`` (placed
    only once its last chunk authenticated, never replacing); None for a plaintext one, which
    is copied as it is."""
    from engram.backup.encrypted import decrypt_backup, is_encrypted

    if not ids or not is_encrypted(src.store, src.name):
        return None
    if directory.startswith("s3://"):
        raise UsageError("pull --identity decrypts into a local directory; give one")
    dst = Path(directory)
    if not dst.is_dir():
        raise UsageError(f"directory {dst} does not exist; create it first")
    return decrypt_backup(src, ids, dst)


def decrypting_store(where: Path | BackupStore, ids: list[Any]) -> Path | BackupStore:
    """A repository read with ``ids`` (unchanged without any): its encrypted backups decrypt as
    they are read, each only once all of it authenticated."""
    if not ids:
        return where
    from engram.backup.encrypted import EncryptedStore
    from engram.storage import as_store

    return EncryptedStore(as_store(where), identities=ids)


@contextlib.contextmanager
def decrypted(where: Any, ids: list[Any], near: Path | None = None) -> Iterator[Any]:
    """A backup file read with ``ids``: an encrypted one decrypted into a private staging dir
    (beside ``near`` when given, else the system's temp dir) with its sidecar and entry, placed
    there only once the last age chunk authenticated; yields that copy's path, and afterwards
    carries a validation verdict recorded on it back to the backup's own entry, then removes
    the copy. A plaintext backup is yielded as it is; an encrypted one without ``ids`` is
    NeedsIdentity."""
    from engram.backup.encrypted import NeedsIdentity, decrypt_backup, is_encrypted
    from engram.storage import Ref

    if not isinstance(where, (Path, Ref)) or (isinstance(where, Path) and not where.is_file()):
        yield where  # a directory or a repository: read as it is
        return
    store, name = _store_and_name(where)
    if not is_encrypted(store, name):
        yield where
        return
    if not ids:
        raise NeedsIdentity(
            f"{store.describe(name)} is encrypted (age); give --identity FILE with a key of "
            "one of its recipients"
        )
    parent = near.absolute().parent if near is not None else None
    staging = Path(tempfile.mkdtemp(prefix=".engram-decrypt-", dir=parent))
    try:
        plain = decrypt_backup(Ref(store, name), ids, staging, durable=False)
        yield plain
        _carry_verdict(Ref(store, name), plain)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _carry_verdict(src: Ref, plain: Path) -> None:
    from engram.backup.catalog import read_info, update_info

    got, had = read_info(plain), read_info(src)
    if got is None or had is None or got.get("validation") == had.get("validation"):
        return
    update_info(src, validation=got.get("validation"))


def _stored(where: Path | Ref) -> Path | Ref:
    """``where`` as stored: an object read past an ``EncryptedStore`` wrapper."""
    from engram.backup.encrypted import EncryptedStore
    from engram.storage import Ref

    if isinstance(where, Ref) and isinstance(where.store, EncryptedStore):
        return Ref(where.store.inner, where.name)
    return where


def encrypted_result(res: dict[str, Any], where: Path | Ref) -> dict[str, Any]:
    """A backup's result as stored encrypted: ``sha256`` and ``size`` of the stored bytes (what
    its sidecar says) and ``encryption`` as its catalog entry records it."""
    from engram.backup.catalog import read_info

    info = read_info(_stored(where)) or {}
    out = dict(res)
    out["sha256"], out["size"] = info.get("sha256", res["sha256"]), info.get("size", res["size"])
    out["encryption"] = info.get("encryption")
    return out


def ciphertext_validation(where: Path | Ref, ids: list[Any]) -> dict[str, Any] | None:
    """For an encrypted backup given without ``--identity``: what validate-backup can check (the
    stored bytes against the sidecar, the catalog entry), in validate-backup's result shape and
    saying that an identity is needed for the rest. None for a backup it can fully check."""
    from engram.backup.encrypted import check_ciphertext, is_encrypted
    from engram.storage import Ref

    where = _stored(where)
    store, name = _store_and_name(where)
    if ids or (isinstance(where, Path) and not where.is_file()) or not is_encrypted(store, name):
        return None
    info, problems = check_ciphertext(Ref(store, name))
    rcpts = ((info or {}).get("encryption") or {}).get("recipients") or []
    note = (
        f"encrypted (age{', to ' + ', '.join(rcpts) if rcpts else ''}): only the ciphertext's "
        "sha256 and its catalog entry were checked; give --identity FILE to check the rest "
        "(structure, member hashes, restore test, digest)"
    )
    detail = "the stored bytes match their sidecar and entry" if not problems else problems[0]
    return {
        "path": store.describe(name),
        "kind": (info or {}).get("kind"),
        "recorded": None,
        "ok": not problems,
        "level": 2,
        "reason": None if not problems else "; ".join(problems),
        "steps": [{"level": 2, "ok": not problems, "name": "ciphertext", "detail": detail}],
        "warnings": [note],
        "ciphertext_only": True,
    }
