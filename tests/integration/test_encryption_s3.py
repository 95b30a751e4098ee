"""Encrypted backups in a bucket (issue 12 item 4): a full backup and an incremental written
through ``EncryptedStore`` over ``ObjectBackupStore`` on moto and SeaweedFS (started on 127.0.0.1
by tests/conftest.py) are age files whose sidecars hold the stored bytes' sha256; the catalog
lists them without the identity; with it they decrypt, restore and replay to the same state,
and a cut-off object is refused and places nothing."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from pyrage import x25519

from engram.backup.catalog import read_catalog
from engram.backup.encrypted import AGE_MAGIC, EncryptedStore, EncryptionError, decrypt_backup
from engram.backup.full import full_backup
from engram.backup.incremental import incremental_backup
from engram.backup.pitr import Target, restore_pitr
from engram.backup.restore import restore
from engram.graph import Engine
from engram.storage import Ref
from engram.storage.objectbackup import ObjectBackupStore
from engram.storage.retry import Backoff, RetryingObjectStore
from s3servers import s3_store


@pytest.mark.parametrize("server", ["moto_s3", "seaweed_s3"])
def test_an_encrypted_repository_in_a_bucket(
    tmp_path: Path, server: str, request: pytest.FixtureRequest
) -> None:
    srv = request.getfixturevalue(server)
    fast = Backoff(base=0.01, cap=0.05, budget=0.5)
    bucket = ObjectBackupStore(RetryingObjectStore(s3_store(srv), fast), first_part=5 << 20)
    ident = x25519.Identity.generate()
    rcpt = str(ident.to_public())

    e = Engine.open(tmp_path / "data")
    try:
        rnd = random.Random(3)
        for i in range(2000):  # an archive past one part, so the upload is multipart
            e.apply([{"op": "create_memory", "id": f"m{i}", "content": rnd.randbytes(2000).hex()}])
        e.checkpoint()
        enc = EncryptedStore(bucket, recipients=[rcpt])
        full = full_backup(e, Ref(enc, "full.tar.zst"))
        e.apply([{"op": "create_memory", "id": "late", "content": "x"}])
        inc = incremental_backup(e, Ref(enc, "inc.log"))
    finally:
        e.close()

    stored = bucket.read("full.tar.zst")
    assert stored.startswith(AGE_MAGIC) and len(stored) > 5 << 20
    side = bucket.read("full.tar.zst.sha256").decode()
    assert side == f"{hashlib.sha256(stored).hexdigest()}  full.tar.zst\n"

    # Without the identity: listed and chosen from the entries, checksum, sidecar and size.
    cat = read_catalog(bucket)
    assert [x.name for x in cat.entries] == ["full.tar.zst", "inc.log"] and not cat.problems
    # With it: decrypted into a local directory, restored and replayed.
    base = decrypt_backup(Ref(bucket, "full.tar.zst"), [ident], tmp_path / "plain")
    log = decrypt_backup(Ref(bucket, "inc.log"), [ident], tmp_path / "plain")
    r = restore(base, tmp_path / "restored")
    assert (r.snapshot_lsn, r.digest) == (full.snapshot_lsn, full.digest)
    p = restore_pitr(base, [log], Target(lsn=inc.snapshot_lsn), tmp_path / "pitr")
    assert (p.reached_lsn, p.digest) == (inc.snapshot_lsn, inc.digest)

    # A cut-off copy in the bucket is refused and places nothing.
    bucket.create("cut.tar.zst", stored[: len(stored) - 65552 - 100])
    into = tmp_path / "cut"
    with pytest.raises(EncryptionError, match="truncated|authentication"):
        decrypt_backup(Ref(bucket, "cut.tar.zst"), [ident], into)
    assert list(into.iterdir()) == []
