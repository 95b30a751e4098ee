"""Repositories on S3 (issue 12, item 3): every command that takes a backup or a repository
takes an s3:// URL too — `engram backup --output=s3://…` (validated from the store), `backups`,
`history`, `restore --repo | --from`, `restore-pitr --repo`, `validate-backup`, `apply-log` —
run as an operator runs them (the real `engram` command, in bash) against moto and SeaweedFS
on 127.0.0.1 (the session fixtures of tests/conftest.py). Then each bad input, and that a
restore from S3 never writes a local copy of the archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engram.backup.archive import extract_stream
from engram.backup.full import full_backup
from engram.backup.restore import restore
from engram.cloud import open_ref
from engram.errors import BadArchive
from engram.format.manifest import encode_sidecar
from engram.graph import Engine, EngineConfig
from engram.storage import Ref
from engram.storage.dirobjects import DirObjectStore
from engram.storage.objectbackup import ObjectBackupStore
from engram.storage.objects import ObjectReader, upload
from engram.storage.retry import Backoff
from netutil import free_port
from s3servers import BUCKET, S3Server, s3_prefix

BIN = Path(sys.executable).parent
SERVERS = {"moto": "moto_s3", "seaweedfs": "seaweed_s3"}


def run(
    cwd: Path, script: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k != "ENGRAM_TOKEN"}
    e.update(PATH=f"{BIN}:{e.get('PATH', '')}", ENGRAM_DATA_DIR=str(cwd / "data"))
    e.update(env or {})
    return subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=cwd,
        env=e,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, f"{p.args}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    return p.stdout


def keys(server: S3Server, prefix: str) -> list[str]:
    c = server.client()
    got = c.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"][len(prefix) :] for o in got)


def uploads(server: S3Server, prefix: str) -> list[str]:
    c = server.client()
    return [
        u["Key"] for u in c.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])
    ]


@pytest.fixture(params=list(SERVERS))
def s3(request: pytest.FixtureRequest) -> S3Server:
    return request.getfixturevalue(SERVERS[request.param])  # type: ignore[no-any-return]


@pytest.fixture
def moto(moto_s3: S3Server) -> S3Server:
    return moto_s3


def site_env(server: S3Server) -> dict[str, str]:
    # The endpoint as boto3 finds it itself (AWS_ENDPOINT_URL); --s3-path-style on each command.
    return {"AWS_ENDPOINT_URL": server.endpoint}


def test_a_repository_on_s3_from_backup_to_pitr(s3: S3Server, tmp_path: Path) -> None:
    prefix = s3_prefix()
    url = f"s3://{BUCKET}/{prefix}"
    env = site_env(s3)
    out = ok(
        run(
            tmp_path,
            f"""
            S3=--s3-path-style
            engram init >/dev/null
            engram put --id a --content one >/dev/null
            engram backup --full --output={url}full-1.tar.zst --level=3 $S3 \\
                --storage-class=STANDARD --json > full.json
            engram put --id b --content two >/dev/null
            engram backup --incremental --output={url}inc-1.log --level=3 $S3 --json > inc1.json
            engram put --id c --content three >/dev/null
            engram backup --incremental --output={url}inc-2.log --level=3 $S3 --json > inc2.json
            engram backups --repo {url} $S3 --json > list.json
            engram history --repo {url} $S3 --json > history.json
            engram restore --repo {url} --latest --to=r-latest $S3 --json > latest.json
            engram restore --from {url}full-1.tar.zst --to=r-from $S3 >/dev/null
            engram apply-log --log={url} --data-dir=r-from $S3 >/dev/null
            engram query --id c --data-dir=r-from
            engram restore-pitr --repo {url} --latest --output=r-pitr $S3 --json > pitr.json
            engram restore-pitr --repo {url} --target-lsn=2 --output=r-pitr2 $S3 --json > pitr2.json
            engram validate-backup {url}full-1.tar.zst --level=3 $S3 --json > validate.json
            """,
            env,
        )
    )
    assert '"c"' in out or "three" in out
    w = tmp_path
    full = json.loads((w / "full.json").read_text())
    assert full["path"] == f"{url}full-1.tar.zst"
    assert full["validation"]["ok"] and full["validation"]["level"] == 3
    for name in ("inc1", "inc2"):
        assert json.loads((w / f"{name}.json").read_text())["validation"]["ok"]
    assert keys(s3, prefix) == [
        "full-1.tar.zst",
        "full-1.tar.zst.info.json",
        "full-1.tar.zst.sha256",
        "inc-1.log",
        "inc-1.log.info.json",
        "inc-1.log.sha256",
        "inc-2.log",
        "inc-2.log.info.json",
        "inc-2.log.sha256",
    ]
    assert uploads(s3, prefix) == []
    listing = json.loads((w / "list.json").read_text())
    got = {b["id"]: b for b in listing["backups"]}
    assert list(got) == ["full-1.tar.zst", "inc-1.log", "inc-2.log"]
    assert all(b["validation"] == "passed" and b["flags"] == [] for b in got.values())
    assert listing["repository"] == url
    history = json.loads((w / "history.json").read_text())
    assert [b["name"] for h in history["histories"] for b in h["backups"]] == list(got)
    latest = json.loads((w / "latest.json").read_text())
    assert (latest["backup"], latest["archive"]) == ("full-1.tar.zst", f"{url}full-1.tar.zst")
    assert latest["verification"] == "deferred"  # validated at level 3 from the store
    pitr = json.loads((w / "pitr.json").read_text())
    assert (pitr["base_lsn"], pitr["reached_lsn"]) == (1, 3)
    assert pitr["logs"] == [f"{url}inc-1.log", f"{url}inc-2.log"]
    pitr2 = json.loads((w / "pitr2.json").read_text())
    assert pitr2["reached_lsn"] == 2 and pitr2["logs"] == [f"{url}inc-1.log"]
    v = json.loads((w / "validate.json").read_text())
    assert v["ok"] and v["path"] == f"{url}full-1.tar.zst"
    q = ok(
        run(
            w,
            "engram query --id b --data-dir=r-pitr2 --json; engram stats --data-dir=r-pitr2 --json",
        )
    )
    assert '"b"' in q and '"memories": 2' in q
    # Nothing was left beside the targets: no staging dir, no fetched logs.
    assert sorted(p.name for p in w.iterdir() if p.name.startswith(".")) == []


def test_a_name_already_taken_in_the_bucket_is_refused_and_leaves_nothing(
    moto: S3Server, tmp_path: Path
) -> None:
    prefix = s3_prefix()
    url = f"s3://{BUCKET}/{prefix}full.tar.zst"
    script = f"engram backup --full --output={url} --no-validate --s3-path-style"
    ok(
        run(
            tmp_path,
            "engram init >/dev/null; engram put --id a --content one >/dev/null",
            site_env(moto),
        )
    )
    ok(run(tmp_path, script, site_env(moto)))
    before = moto.client().head_object(Bucket=BUCKET, Key=prefix + "full.tar.zst")["ETag"]
    p = run(tmp_path, script, site_env(moto))
    assert p.returncode == 3
    assert (
        p.stderr.strip()
        .splitlines()[-1]
        .endswith("full.tar.zst already exists; choose a new name (backups are never overwritten)")
    )
    assert moto.client().head_object(Bucket=BUCKET, Key=prefix + "full.tar.zst")["ETag"] == before
    assert len(keys(moto, prefix)) == 3 and uploads(moto, prefix) == []


def test_bad_endpoints_credentials_and_buckets_are_one_line_errors(
    moto: S3Server, seaweed_s3: S3Server, tmp_path: Path
) -> None:
    ok(run(tmp_path, "engram init >/dev/null; engram put --id a --content one >/dev/null"))
    dead = f"http://127.0.0.1:{free_port()}"
    cases = [
        # An endpoint nobody answers at: retried for --s3-retry-for, then one error.
        (
            f"engram backup --full --output=s3://{BUCKET}/x/f.tar.zst --endpoint-url={dead} "
            "--s3-path-style --s3-retry-for=1s",
            {},
            1,
            dead,
        ),
        # Credentials SeaweedFS does not know.
        (
            f"engram backups --repo s3://{BUCKET}/x/ --s3-path-style",
            {"AWS_ENDPOINT_URL": seaweed_s3.endpoint, "AWS_SECRET_ACCESS_KEY": "wrong"},
            1,
            "access denied",
        ),
        # A bucket that does not exist, for a write and for a read.
        (
            "engram backup --full --output=s3://no-such-bucket-e/x/f.tar.zst --s3-path-style",
            site_env(moto),
            2,
            "bucket no-such-bucket-e does not exist",
        ),
        (
            "engram restore --repo s3://no-such-bucket-e/x/ --latest --to=r --s3-path-style",
            site_env(moto),
            2,
            "bucket no-such-bucket-e does not exist",
        ),
    ]
    for script, env, code, says in cases:
        p = run(tmp_path, script, env)
        # One error line; before it, only the retry wrapper's warnings of each retry.
        *retries, last = p.stderr.strip().splitlines()
        assert p.returncode == code, f"{script}\n{p.stderr}"
        assert last.startswith("error: ") and says in last, f"{script}\n{p.stderr}"
        assert all(r.startswith("WARNING: ") and "; attempt " in r for r in retries), p.stderr
    # Nothing partial locally: no target, no staging dir, no temp file.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert keys(moto, "x/") == [] and uploads(moto, "x/") == []


def test_a_prefix_that_is_not_a_repository_is_named_as_such(moto: S3Server, tmp_path: Path) -> None:
    prefix = s3_prefix()
    moto.client().put_object(Bucket=BUCKET, Key=prefix + "notes.txt", Body=b"not a backup")
    url = f"s3://{BUCKET}/{prefix}"
    for script in (
        f"engram backups --repo {url} --s3-path-style",
        f"engram history --repo {url} --s3-path-style",
        f"engram restore --repo {url} --latest --to=r --s3-path-style",
    ):
        p = run(tmp_path, script, site_env(moto))
        assert p.returncode == 2, p.stderr
        assert "is not an engram repository: no catalog entries" in p.stderr
        assert "notes.txt" in p.stderr
    # An empty prefix is a repository with no backups yet.
    empty = f"s3://{BUCKET}/{s3_prefix()}"
    assert "0 backups" in ok(
        run(tmp_path, f"engram backups --repo {empty} --s3-path-style", site_env(moto))
    )


def test_an_object_that_does_not_hash_to_its_record_is_refused(
    s3: S3Server, tmp_path: Path
) -> None:
    prefix = s3_prefix()
    url = f"s3://{BUCKET}/{prefix}full.tar.zst"
    env = site_env(s3)
    ok(run(tmp_path, "engram init >/dev/null; engram put --id a --content one >/dev/null"))
    ok(run(tmp_path, f"engram backup --full --output={url} --no-validate --s3-path-style", env))
    c = s3.client()
    key = prefix + "full.tar.zst"
    obj = c.get_object(Bucket=BUCKET, Key=key)
    data = bytearray(obj["Body"].read())
    data[len(data) // 2] ^= 0xFF
    c.put_object(Bucket=BUCKET, Key=key, Body=bytes(data), Metadata=obj["Metadata"])
    p = run(tmp_path, f"engram restore --from {url} --to=r --s3-path-style", env)
    assert p.returncode == 1 and "checksum mismatch" in p.stderr, p.stderr
    assert not (tmp_path / "r").exists()
    p = run(tmp_path, f"engram validate-backup {url} --level=2 --s3-path-style --json", env)
    assert p.returncode == 1
    assert "checksum mismatch" in json.loads(p.stdout)["reason"]
    p = run(
        tmp_path,
        f"engram restore --repo s3://{BUCKET}/{prefix} --latest --to=r --s3-path-style",
        env,
    )
    assert p.returncode == 1 and "full.tar.zst" in p.stderr, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["data"]


# -- in process ----------------------------------------------------------------------------------

CFG = EngineConfig(checkpoint_interval=3600)
FAST = Backoff(base=0.01, cap=0.05, budget=1.0)


def _io() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v)
    return out


def test_a_restore_from_s3_writes_no_local_copy_of_the_archive(
    moto: S3Server, tmp_path: Path
) -> None:
    """The observable: the bytes this process hands to write() (``wchar`` in /proc/self/io).
    A restore streamed from S3 writes what a restore of the same archive from a local file
    writes (the extracted data dir), not that plus the archive."""
    eng = Engine.open(tmp_path / "data", CFG, create=True)
    try:
        for i in range(1500):  # incompressible content: the archive is a few MB
            eng.apply([{"op": "create_memory", "id": f"m{i}", "content": os.urandom(3000).hex()}])
        ref = open_ref(
            f"s3://{BUCKET}/{s3_prefix()}full.tar.zst",
            endpoint_url=moto.endpoint,
            path_style=True,
            backoff=FAST,
        )
        res = full_backup(eng, ref)
    finally:
        eng.close()
    local = tmp_path / "copy.tar.zst"
    local.write_bytes(ref.store.read(ref.name))
    (tmp_path / "copy.tar.zst.sha256").write_bytes(ref.store.read(ref.name + ".sha256"))
    assert res.size > 4 << 20
    before = _io()["wchar"]
    restore(local, tmp_path / "from-file", verify="before-ready")
    from_file = _io()["wchar"] - before
    before = _io()["wchar"]
    got = restore(ref, tmp_path / "from-s3", verify="before-ready")
    from_s3 = _io()["wchar"] - before
    assert got.archive == ref.describe() and got.sidecar_checked
    assert from_s3 - from_file < res.size // 4, (from_s3, from_file, res.size)


def test_a_truncated_archive_streamed_from_a_store_is_refused(tmp_path: Path) -> None:
    """Without a sidecar or a recorded hash, only the zstd frames say the stream was cut:
    the walk over the streamed bytes refuses it, and nothing is placed."""
    eng = Engine.open(tmp_path / "data", CFG, create=True)
    try:
        eng.apply([{"op": "create_memory", "id": "a", "content": "one"}])
        full_backup(eng, tmp_path / "full.tar.zst")
    finally:
        eng.close()
    whole = (tmp_path / "full.tar.zst").read_bytes()
    (tmp_path / "objects").mkdir()
    objects = DirObjectStore(tmp_path / "objects")
    store = ObjectBackupStore(objects)
    from engram.storage.objects import upload

    upload(objects, "cut.tar.zst", whole[:-3])  # inside the frame's checksum
    with pytest.raises(BadArchive, match="truncated: it ends inside a zstd frame checksum"):
        restore(Ref(store, "cut.tar.zst"), tmp_path / "r")
    assert not (tmp_path / "r").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "data",
        "full.tar.zst",
        "full.tar.zst.info.json",
        "full.tar.zst.sha256",
        "objects",
    ]


class _Readers(ObjectBackupStore):
    """An ObjectBackupStore that keeps every reader it made, to look at what each checked."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.made: list[ObjectReader] = []

    def reader(self, name: str, sha256: str | None = None) -> ObjectReader:
        r = super().reader(name, sha256)
        self.made.append(r)
        return r


def _archive_in_objects(tmp_path: Path) -> tuple[bytes, str, DirObjectStore]:
    eng = Engine.open(tmp_path / "data", CFG, create=True)
    try:
        for i in range(300):  # incompressible: a multipart object of several parts
            eng.apply([{"op": "create_memory", "id": f"m{i}", "content": os.urandom(20000).hex()}])
        full_backup(eng, tmp_path / "full.tar.zst")
    finally:
        eng.close()
    whole = (tmp_path / "full.tar.zst").read_bytes()
    (tmp_path / "objects").mkdir()
    objects = DirObjectStore(tmp_path / "objects")
    return whole, hashlib.sha256(whole).hexdigest(), objects


def test_a_streamed_restore_hashes_the_archive_once_in_the_stores_reader(tmp_path: Path) -> None:
    """The store's reader is told the sidecar's hash and checks the whole object against it at
    its end; the extraction hashes nothing again (its result has no hash of its own)."""
    whole, sha, objects = _archive_in_objects(tmp_path)
    store = _Readers(objects, first_part=5 << 20)
    upload(objects, "full.tar.zst", whole, first_part=5 << 20)
    store.create("full.tar.zst.sha256", encode_sidecar(sha, "full.tar.zst"))
    assert objects.head("full.tar.zst").sha256 is None  # multipart: only the sidecar records it
    got = restore(Ref(store, "full.tar.zst"), tmp_path / "r", verify="before-ready")
    assert got.sidecar_checked
    (archive,) = [r for r in store.made if r.key == "full.tar.zst"]
    assert archive.expected == sha and archive.sha256 == sha and archive.verified
    with ObjectBackupStore(objects).open("full.tar.zst") as f:
        streamed = extract_stream(f, "full.tar.zst", tmp_path / "x", durable=False, hashed=False)
    assert streamed.sha256 == ""


def test_a_sidecar_naming_other_bytes_is_refused_when_the_objects_own_record_agrees(
    tmp_path: Path,
) -> None:
    """A one-part object records its own hash, which its bytes match; the sidecar names other
    bytes: the streamed restore compares the sidecar (what the reader checked), and places
    nothing."""
    whole, sha, objects = _archive_in_objects(tmp_path)
    store = ObjectBackupStore(objects)
    upload(objects, "full.tar.zst", whole, first_part=64 << 20)
    assert objects.head("full.tar.zst").sha256 == sha
    store.create("full.tar.zst.sha256", encode_sidecar("0" * 64, "full.tar.zst"))
    with pytest.raises(BadArchive, match=r"checksum mismatch: full.tar.zst.sha256 says 0000"):
        restore(Ref(store, "full.tar.zst"), tmp_path / "r")
    assert not (tmp_path / "r").exists()
