"""Encrypted backups (issue 12 item 4; docs/DESIGN.md "Encryption", docs/FORMAT.md "An encrypted
backup"): backups written through ``EncryptedStore`` are one standard age file under their own
name, with a sidecar of the stored bytes and a readable catalog entry; they restore through
``decrypt_backup``; the age CLI decrypts them and tar reads the result; a truncated or altered
ciphertext and a wrong identity are refused and place nothing; the identity never leaks."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from pyrage import x25519

from engram.backup.catalog import check_entry, read_catalog, read_info
from engram.backup.encrypted import (
    AGE_MAGIC,
    EncryptedStore,
    EncryptionError,
    NeedsIdentity,
    WrongIdentity,
    check_ciphertext,
    decrypt_backup,
    parse_recipients,
    read_identities,
    read_recipients_file,
)
from engram.backup.full import full_backup
from engram.backup.incremental import incremental_backup
from engram.backup.pitr import Target, restore_pitr
from engram.backup.restore import restore
from engram.errors import BackupError, UsageError
from engram.graph import Engine
from engram.storage import LocalBackupStore, Ref
from engram.storage.faults import FaultyStore

AGE_INSTALL = "apt-get install age"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[x25519.Identity, str, Path]:
    ident = x25519.Identity.generate()
    rcpt = str(ident.to_public())
    f = tmp_path / "key.txt"
    f.write_text(f"# created: now\n# public key: {rcpt}\n{ident}\n")
    f.chmod(0o600)
    return ident, rcpt, f


@pytest.fixture
def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    e = Engine.open(tmp_path / "data")
    rnd = random.Random(7)
    for i in range(300):
        e.apply([{"op": "create_memory", "id": f"m{i}", "content": rnd.randbytes(300).hex()}])
    e.apply([{"op": "create_edge", "src": "m0", "dst": "m1"}])
    e.checkpoint()
    yield e
    e.close()


def _bk(tmp_path: Path) -> Path:
    d = tmp_path / "bk"
    d.mkdir(exist_ok=True)
    return d


def test_a_full_backup_is_one_age_file_with_a_sidecar_and_an_entry_of_its_stored_bytes(
    tmp_path: Path, engine: Engine, keys: tuple[x25519.Identity, str, Path]
) -> None:
    ident, rcpt, _ = keys
    bk = _bk(tmp_path)
    store = EncryptedStore(LocalBackupStore(bk), recipients=[rcpt])
    res = full_backup(engine, Ref(store, "full.tar.zst"))
    stored = (bk / "full.tar.zst").read_bytes()
    assert stored.startswith(AGE_MAGIC)
    assert b"ENGRAMAH" not in stored[:4096] and b"manifest.json" not in stored
    sha = hashlib.sha256(stored).hexdigest()
    # The sidecar names the stored bytes: sha256sum -c checks them without the identity.
    assert (bk / "full.tar.zst.sha256").read_text() == f"{sha}  full.tar.zst\n"
    info = json.loads((bk / "full.tar.zst.info.json").read_text())
    assert info["sha256"] == sha and info["size"] == len(stored)
    enc = info["encryption"]
    assert enc["format"] == "age" and enc["recipients"] == [rcpt]
    assert enc["plaintext"] == {"sha256": res.sha256, "size": res.size}
    assert info["snapshot_lsn"] == res.snapshot_lsn and info["digest"] == res.digest
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "-c", "full.tar.zst.sha256"], cwd=bk, check=True,
                       capture_output=True)

    # Listing and base choice without the identity: checksum, sidecar and size.
    cat = read_catalog(LocalBackupStore(bk))
    assert [e.name for e in cat.entries] == ["full.tar.zst"] and not cat.problems
    assert cat.entries[0].to_lsn == res.snapshot_lsn
    # With it: the full check against the header inside the ciphertext.
    dec = EncryptedStore(LocalBackupStore(bk), identities=[ident])
    cat2 = read_catalog(dec)
    assert [e.name for e in cat2.entries] == ["full.tar.zst"] and not cat2.problems
    # A key field changed (checksum recomputed by whoever forged it) is found only with it.
    forged = dict(info, snapshot_lsn=info["snapshot_lsn"] + 1)
    ref = Ref(dec, "full.tar.zst")
    from engram.backup.catalog import entry_checksum, file_facts

    forged["checksum"] = entry_checksum(forged)
    assert any("snapshot_lsn" in p for p in check_entry(ref, forged, file_facts(ref)))

    # Decrypted into a directory of its own, it restores to the same state.
    out = decrypt_backup(Ref(LocalBackupStore(bk), "full.tar.zst"), [ident], tmp_path / "plain")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == res.sha256
    assert read_info(out)["sha256"] == res.sha256 and "encryption" not in read_info(out)
    assert not check_entry(out, read_info(out), file_facts(out))
    r = restore(out, tmp_path / "restored")
    assert (r.snapshot_lsn, r.digest) == (res.snapshot_lsn, res.digest)
    assert r.sidecar_checked


def test_an_incremental_through_the_wrapper_replays(
    tmp_path: Path, engine: Engine, keys: tuple[x25519.Identity, str, Path]
) -> None:
    ident, rcpt, _ = keys
    bk = _bk(tmp_path)
    store = EncryptedStore(LocalBackupStore(bk), recipients=[rcpt])
    full_backup(engine, Ref(store, "full.tar.zst"))
    engine.apply([{"op": "create_memory", "id": "late", "content": "after the full"}])
    inc = incremental_backup(engine, Ref(store, "inc.log"))
    assert (bk / "inc.log").read_bytes().startswith(AGE_MAGIC)
    # The chain's parent is the name as it is stored (unchanged by encryption).
    assert read_info(bk / "inc.log")["parent"] == "full.tar.zst"
    src = LocalBackupStore(bk)
    base = decrypt_backup(Ref(src, "full.tar.zst"), [ident], tmp_path / "plain")
    log = decrypt_backup(Ref(src, "inc.log"), [ident], tmp_path / "plain")
    got = restore_pitr(base, [log], Target(lsn=inc.snapshot_lsn), tmp_path / "pitr")
    assert (got.reached_lsn, got.digest) == (inc.snapshot_lsn, inc.digest)


@pytest.mark.skipif(not shutil.which("age"), reason=f"the age CLI is missing: {AGE_INSTALL}")
def test_the_age_cli_decrypts_what_engram_wrote_and_tar_reads_it(
    tmp_path: Path, engine: Engine, keys: tuple[x25519.Identity, str, Path]
) -> None:
    ident, rcpt, keyfile = keys
    bk = _bk(tmp_path)
    res = full_backup(engine, Ref(EncryptedStore(LocalBackupStore(bk), [rcpt]), "f.tar.gz"))
    plain = tmp_path / "f.tar.gz"
    subprocess.run(["age", "-d", "-i", str(keyfile), "-o", str(plain), str(bk / "f.tar.gz")],
                   check=True, capture_output=True)
    assert hashlib.sha256(plain.read_bytes()).hexdigest() == res.sha256
    listing = subprocess.run(["tar", "-tzf", str(plain)], check=True, capture_output=True,
                             text=True).stdout.split()
    assert "manifest.json" in listing and "warm/engram.db" in listing


def _one_backup(tmp_path: Path, engine: Engine, rcpt: str) -> Path:
    bk = _bk(tmp_path)
    full_backup(engine, Ref(EncryptedStore(LocalBackupStore(bk), [rcpt]), "full.tar.zst"))
    return bk


@pytest.mark.parametrize("damage", ["truncate-chunk", "truncate-mid", "flip", "flip-header"])
def test_a_damaged_ciphertext_is_refused_and_places_nothing(
    tmp_path: Path, engine: Engine, keys: tuple[x25519.Identity, str, Path], damage: str
) -> None:
    ident, rcpt, _ = keys
    bk = _one_backup(tmp_path, engine, rcpt)
    p = bk / "full.tar.zst"
    data = bytearray(p.read_bytes())
    chunk = 65536 + 16  # an age payload chunk and its tag
    start = data.index(b"\n---") + 1
    start = data.index(b"\n", start) + 1 + 16  # the header, then the payload's nonce
    assert len(data) - start > 2 * chunk, "the backup must span several age chunks"
    if damage == "truncate-chunk":  # a cut on a chunk boundary: found only at the end
        del data[start + chunk * ((len(data) - start - 1) // chunk) :]
    elif damage == "truncate-mid":
        del data[len(data) - 1000 :]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x40
    else:
        data[30] ^= 0x01
    p.write_bytes(bytes(data))
    (bk / "full.tar.zst.sha256").unlink()  # the age layer alone must refuse it
    into = tmp_path / "plain"
    into.mkdir()
    with pytest.raises((EncryptionError, WrongIdentity, UsageError, BackupError)) as ei:
        decrypt_backup(Ref(LocalBackupStore(bk), "full.tar.zst"), [ident], into)
    assert "\n" not in str(ei.value) and str(p) in str(ei.value)
    assert list(into.iterdir()) == [], "a damaged ciphertext placed something"


def test_the_stored_sidecar_is_checked_while_decrypting(
    tmp_path: Path, engine: Engine, keys: tuple[x25519.Identity, str, Path]
) -> None:
    ident, rcpt, _ = keys
    bk = _one_backup(tmp_path, engine, rcpt)
    (bk / "full.tar.zst.sha256").write_text("0" * 64 + "  full.tar.zst\n")
    into = tmp_path / "plain"
    into.mkdir()
    with pytest.raises(Exception, match="checksum mismatch"):
        decrypt_backup(Ref(LocalBackupStore(bk), "full.tar.zst"), [ident], into)
    assert list(into.iterdir()) == []


def test_a_wrong_identity_is_one_line_naming_the_backup(
    tmp_path: Path, engine: Engine, keys: tuple[x25519.Identity, str, Path]
) -> None:
    _, rcpt, _ = keys
    bk = _one_backup(tmp_path, engine, rcpt)
    other = x25519.Identity.generate()
    into = tmp_path / "plain"
    into.mkdir()
    with pytest.raises(WrongIdentity) as ei:
        decrypt_backup(Ref(LocalBackupStore(bk), "full.tar.zst"), [other], into)
    msg = ei.value.message
    assert str(bk / "full.tar.zst") in msg and "does not match" in msg and "\n" not in msg
    assert ei.value.exit_code == 1
    assert str(other) not in msg
    assert list(into.iterdir()) == []


def test_reading_an_encrypted_backup_without_an_identity_says_to_give_one(
    tmp_path: Path, engine: Engine, keys: tuple[x25519.Identity, str, Path]
) -> None:
    _, rcpt, _ = keys
    bk = _one_backup(tmp_path, engine, rcpt)
    store = EncryptedStore(LocalBackupStore(bk), recipients=[rcpt])
    with pytest.raises(NeedsIdentity, match="--identity"):
        store.open("full.tar.zst")
    # Metadata stays readable without it.
    assert json.loads(store.read("full.tar.zst.info.json"))["encryption"]["format"] == "age"


def test_the_identity_never_leaks(
    tmp_path: Path, engine: Engine, keys: tuple[x25519.Identity, str, Path]
) -> None:
    ident, rcpt, keyfile = keys
    secret = str(ident)
    bk = _one_backup(tmp_path, engine, rcpt)
    store = EncryptedStore(LocalBackupStore(bk), identities=read_identities(keyfile))
    assert secret not in repr(store)
    out = decrypt_backup(Ref(store.inner, "full.tar.zst"), [ident], tmp_path / "plain")
    for d in (bk, out.parent):
        for f in d.iterdir():
            assert secret.encode() not in f.read_bytes(), f"{f} holds the identity"
    bad = tmp_path / "bad-key.txt"
    bad.write_text(secret[:-3] + "QQQ\n")
    with pytest.raises(UsageError) as ei:
        read_identities(bad)
    assert secret[:20] not in ei.value.message and "line 1" in ei.value.message


def test_key_files_and_bad_recipients(tmp_path: Path,
                                      keys: tuple[x25519.Identity, str, Path]) -> None:
    ident, rcpt, keyfile = keys
    two = str(x25519.Identity.generate().to_public())
    rf = tmp_path / "recipients.txt"
    rf.write_text(f"# ops team\n{rcpt}\n\n  {two}  \n{rcpt}\n")
    assert read_recipients_file(rf) == [rcpt, two]
    assert [str(i.to_public()) for i in read_identities(keyfile)] == [rcpt]
    for bad in ("age1nope", "ssh-ed25519 AAAA", ""):
        with pytest.raises(UsageError, match="not an age X25519 recipient"):
            parse_recipients([bad])
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(UsageError, match="no age recipient"):
        read_recipients_file(empty)
    with pytest.raises(UsageError, match="no age identity"):
        read_identities(empty)
    with pytest.raises(UsageError, match="cannot read"):
        read_identities(tmp_path / "missing.txt")
    with pytest.raises(UsageError):
        EncryptedStore(LocalBackupStore(tmp_path), recipients=["age1bad"])


def test_a_failing_medium_under_encryption_fails_the_backup_and_leaves_nothing(
    tmp_path: Path, engine: Engine, keys: tuple[x25519.Identity, str, Path]
) -> None:
    _, rcpt, _ = keys
    bk = _bk(tmp_path)
    faulty = FaultyStore(LocalBackupStore(bk), after_bytes=50_000)
    with pytest.raises(BackupError, match="disk full"):
        full_backup(engine, Ref(EncryptedStore(faulty, [rcpt]), "full.tar.zst"))
    assert faulty.fired and list(bk.iterdir()) == []
    # The engine is fine and a later backup works.
    full_backup(engine, Ref(EncryptedStore(LocalBackupStore(bk), [rcpt]), "full.tar.zst"))
    assert (bk / "full.tar.zst").read_bytes().startswith(AGE_MAGIC)


def test_a_store_read_hands_on_nothing_before_the_last_chunk_authenticated(
    tmp_path: Path, engine: Engine, keys: tuple[x25519.Identity, str, Path]
) -> None:
    ident, rcpt, _ = keys
    bk = _one_backup(tmp_path, engine, rcpt)
    store = EncryptedStore(LocalBackupStore(bk), identities=[ident])
    plain = store.read("full.tar.zst")
    info = read_info(bk / "full.tar.zst")
    assert hashlib.sha256(plain).hexdigest() == info["encryption"]["plaintext"]["sha256"]
    p = bk / "full.tar.zst"
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(EncryptionError, match="truncated|authentication"):
        store.open("full.tar.zst")
    # The header is still readable (its chunk authenticated), so is the catalog's listing.
    with store.open_head("full.tar.zst") as f:
        assert f.read(4) == b"\x28\xb5\x2f\xfd"


def test_without_the_identity_only_the_ciphertext_is_checked(
    tmp_path: Path, engine: Engine, keys: tuple[x25519.Identity, str, Path]
) -> None:
    _, rcpt, _ = keys
    bk = _one_backup(tmp_path, engine, rcpt)
    ref = Ref(LocalBackupStore(bk), "full.tar.zst")
    info, problems = check_ciphertext(ref)
    assert info is not None and problems == []
    p = bk / "full.tar.zst"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))
    _, problems = check_ciphertext(ref)
    assert any("checksum mismatch" in x for x in problems)


def test_the_listing_says_a_backup_is_encrypted_without_the_identity(
    tmp_path: Path, engine: Engine, keys: tuple[x25519.Identity, str, Path]
) -> None:
    from engram.backup.repository import list_backups

    _, rcpt, _ = keys
    bk = _one_backup(tmp_path, engine, rcpt)
    (b,) = list_backups(bk).backups
    assert b.encrypted and b.usable and b.problem is None and "legacy" not in b.flags
    assert list_backups(bk).to_json()["backups"][0]["encrypted"] is True
    code, out = _cli("backups", "--repo", str(bk))
    assert code == 0 and "full (age)" in out, out


# -- the commands ---------------------------------------------------------------------------------


def _cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from engram.cli.main import app

    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output  # stdout and stderr as the user sees them


def test_the_commands_read_encrypted_backups_with_an_identity_and_never_show_it(
    tmp_path: Path, engine: Engine, keys: tuple[x25519.Identity, str, Path]
) -> None:
    ident, rcpt, keyfile = keys
    secret = str(ident)
    bk = _bk(tmp_path)
    store = EncryptedStore(LocalBackupStore(bk), [rcpt])
    full = full_backup(engine, Ref(store, "full.tar.zst"))
    engine.apply([{"op": "create_memory", "id": "late", "content": "after"}])
    inc = incremental_backup(engine, Ref(store, "inc.log"))
    enc, key = str(bk / "full.tar.zst"), str(keyfile)
    outputs: list[str] = []

    # Without the identity: restore says to give one; validation checks the ciphertext only.
    code, out = _cli("restore", "--from", enc, "--to", str(tmp_path / "r0"))
    outputs.append(out)
    assert code == 2 and "is encrypted (age); give --identity" in out
    assert not (tmp_path / "r0").exists()
    code, out = _cli("validate-backup", enc)
    outputs.append(out)
    assert code == 0 and "only the ciphertext" in out and "--identity" in out
    assert read_info(bk / "full.tar.zst")["validation"] is None  # no verdict from that

    # With it: validation proves the identity decrypts; its verdict lands in the stored entry.
    code, out = _cli("validate-backup", enc, "--identity", key, "--level", "3", "--json")
    outputs.append(out)
    assert code == 0, out
    v = json.loads(out[out.index("{"):])
    assert v["ok"] and v["path"] == enc
    info = read_info(bk / "full.tar.zst")
    assert info["validation"]["status"] == "passed" and "encryption" in info
    assert info["sha256"] == hashlib.sha256((bk / "full.tar.zst").read_bytes()).hexdigest()
    assert not read_catalog(LocalBackupStore(bk)).problems

    code, out = _cli("restore", "--from", enc, "--identity", key, "--to", str(tmp_path / "r1"))
    outputs.append(out)
    assert code == 0, out
    assert f"restored {enc} into" in out and f"LSN {full.snapshot_lsn}" in out
    code, out = _cli("restore-pitr", "--base-backup", enc, "--operation-log", str(bk / "inc.log"),
                     "--target-lsn", str(inc.snapshot_lsn), "--identity", key,
                     "--output", str(tmp_path / "r2"), "--json")
    outputs.append(out)
    assert code == 0, out
    assert json.loads(out[out.index("{"):])["digest"] == inc.digest
    code, out = _cli("restore-pitr", "--repo", str(bk), "--latest", "--identity", key,
                     "--output", str(tmp_path / "r4"), "--json")
    outputs.append(out)
    assert code == 0, out
    assert json.loads(out[out.index("{"):])["digest"] == inc.digest
    code, out = _cli("restore", "--repo", str(bk), "--latest", "--to", str(tmp_path / "r5"))
    outputs.append(out)
    assert code == 2 and "is encrypted (age); give --identity" in out, out
    assert not (tmp_path / "r5").exists()
    code, out = _cli("restore", "--repo", str(bk), "--latest", "--identity", key,
                     "--to", str(tmp_path / "r5"))
    outputs.append(out)
    assert code == 0, out
    assert f"restored {enc} into" in out and f"LSN {full.snapshot_lsn}" in out
    code, out = _cli("restore", "--repo", str(bk), "--backup", "full.tar.zst", "--identity",
                     key, "--to", str(tmp_path / "r6"), "--json")
    outputs.append(out)
    assert code == 0 and json.loads(out[out.index("{"):])["digest"] == full.digest, out
    code, out = _cli("apply-log", "--log", str(bk / "inc.log"), "--identity", key,
                     "--data-dir", str(tmp_path / "r1"))
    outputs.append(out)
    assert code == 0, out
    # A directory of them (the runbook's `apply-log --log="$BACKUP_DIR"`): each log decrypted.
    code, out = _cli("apply-log", "--log", str(bk), "--identity", key,
                     "--data-dir", str(tmp_path / "r5"), "--json")
    outputs.append(out)
    assert code == 0, out
    assert json.loads(out[out.index("{"):])["to_lsn"] == inc.snapshot_lsn

    # A wrong identity: one line naming the backup, exit 1, nothing placed.
    other = tmp_path / "other.txt"
    other.write_text(f"{x25519.Identity.generate()}\n")
    other.chmod(0o600)
    code, out = _cli("restore", "--from", enc, "--identity", str(other), "--to",
                     str(tmp_path / "r3"))
    outputs.append(out)
    assert code == 1 and "does not match any of its recipients" in out and enc in out
    assert [ln for ln in out.splitlines() if ln.strip()] == [out.strip()], out
    assert not (tmp_path / "r3").exists()
    assert not list(tmp_path.glob(".engram-decrypt-*")), "a decrypted copy was left behind"

    for o in outputs:
        assert secret not in o and secret.lower() not in o.lower()
    for f in [*bk.rglob("*"), *(tmp_path / "r1").rglob("*"), *(tmp_path / "r2").rglob("*")]:
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f"{f} holds the identity"


def test_identity_file_errors_are_usage_errors(tmp_path: Path) -> None:
    code, out = _cli("restore", "--from", str(tmp_path / "x.tar.zst"), "--identity",
                     str(tmp_path / "missing.txt"), "--to", str(tmp_path / "r"))
    assert code == 2 and "cannot read the identity file" in out


def test_backup_encrypt_to_writes_an_age_file_and_validates_its_ciphertext(
    tmp_path: Path, keys: tuple[x25519.Identity, str, Path]
) -> None:
    ident, rcpt, keyfile = keys
    data = tmp_path / "data"
    with Engine.open(data) as e:
        for i in range(50):
            e.apply([{"op": "create_memory", "id": f"m{i}", "content": f"memory {i}"}])
    bk = _bk(tmp_path)
    rf = tmp_path / "recipients.txt"
    rf.write_text(f"# the offsite key\n{rcpt}\n")
    out = bk / "full.tar.zst"
    code, text = _cli("backup", "--full", "--output", str(out), "--recipients-file", str(rf),
                      "--data-dir", str(data), "--json")
    assert code == 0, text
    res = json.loads(text[text.index("{"):])
    stored = out.read_bytes()
    assert stored.startswith(AGE_MAGIC)
    assert res["sha256"] == hashlib.sha256(stored).hexdigest() and res["size"] == len(stored)
    assert res["encryption"]["recipients"] == [rcpt]
    assert res["validation"]["ok"] and res["validation"]["ciphertext_only"]
    assert "--identity" in res["validation"]["warnings"][0]
    assert read_info(out)["validation"] is None  # only a full validation records a verdict
    code, text = _cli("validate-backup", str(out), "--identity", str(keyfile), "--level", "3")
    assert code == 0 and "PASS" in text, text
    assert read_info(out)["validation"]["status"] == "passed"

    code, text = _cli("backup", "--full", "--output", str(bk / "x.tar.zst"), "--encrypt-to",
                      "age1notakey", "--data-dir", str(data))
    assert code == 2 and "not an age X25519 recipient" in text
    assert not (bk / "x.tar.zst").exists()


def test_push_and_sync_encrypt_and_stay_idempotent_and_pull_decrypts(
    tmp_path: Path, engine: Engine, keys: tuple[x25519.Identity, str, Path]
) -> None:
    ident, rcpt, keyfile = keys
    local, off, back = _bk(tmp_path), tmp_path / "offsite", tmp_path / "back"
    off.mkdir()
    back.mkdir()
    full = full_backup(engine, local / "full.tar.zst")
    engine.apply([{"op": "create_memory", "id": "late", "content": "after"}])
    incremental_backup(engine, local / "inc.log")

    code, out = _cli("sync", "--repo", str(local), "--to", str(off), "--encrypt-to", rcpt)
    assert code == 0, out
    for name in ("full.tar.zst", "inc.log"):
        stored = (off / name).read_bytes()
        assert stored.startswith(AGE_MAGIC)
        assert (off / f"{name}.sha256").read_text().split()[0] == hashlib.sha256(
            stored).hexdigest()
        assert read_info(off / name)["encryption"]["recipients"] == [rcpt]
    assert not read_catalog(LocalBackupStore(off)).problems
    # A second sync and a push of the same backup find them there: nothing copied, no error.
    before = {p.name: p.read_bytes() for p in off.iterdir()}
    code, out = _cli("sync", "--repo", str(local), "--to", str(off), "--encrypt-to", rcpt)
    assert code == 0 and "nothing to copy" in out, out
    code, out = _cli("push", str(local / "full.tar.zst"), "--to", str(off), "--encrypt-to", rcpt)
    assert code == 0, out
    assert {p.name: p.read_bytes() for p in off.iterdir()} == before

    # pull --identity decrypts into a local directory: the very bytes of the original.
    code, out = _cli("pull", str(off / "full.tar.zst"), str(back), "--identity", str(keyfile))
    assert code == 0 and "decrypted" in out, out
    assert (back / "full.tar.zst").read_bytes() == (local / "full.tar.zst").read_bytes()
    r = restore(back / "full.tar.zst", tmp_path / "r")
    assert (r.snapshot_lsn, r.digest) == (full.snapshot_lsn, full.digest)
    # Without it, pull copies the ciphertext as it is.
    code, out = _cli("pull", str(off / "inc.log"), str(back))
    assert code == 0 and (back / "inc.log").read_bytes().startswith(AGE_MAGIC), out
