"""The ``ObjectStore`` contract, one suite run against every store (STYLE habit 4; restic runs
one backend suite the same way): a local directory, moto's S3 server and SeaweedFS, both
started on 127.0.0.1 by the session fixtures (tests/conftest.py). Then what only S3 does
(errors mapped from botocore, timeouts), the retry wrapper over injected faults, the part
size plan and the ``s3://`` URLs.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from engram.cloud import open_ref, open_store, parse_s3_url
from engram.errors import UsageError
from engram.format.manifest import encode_sidecar
from engram.storage.base import info_name, sidecar_name
from engram.storage.dirobjects import DirObjectStore
from engram.storage.objectbackup import STALE_AFTER, ObjectBackupStore
from engram.storage.objectfaults import FlakyObjects
from engram.storage.objects import (
    DEFAULT_PART,
    MAX_OBJECT,
    MAX_PART,
    MAX_PARTS,
    MIN_PART,
    AccessDenied,
    Meta,
    NoSuchBucket,
    ObjectCorrupt,
    ObjectExists,
    ObjectNotFound,
    ObjectReader,
    ObjectStore,
    ObjectWriter,
    Transient,
    Unreachable,
    part_size,
    read_all,
    sha256_hex,
    upload,
)
from engram.storage.retry import Backoff, RetryingObjectStore
from s3servers import BUCKET, S3Server, s3_store

FAST = Backoff(base=0.01, cap=0.05, budget=0.5)  # tests wait milliseconds, not minutes
PART = MIN_PART  # the smallest part S3 takes: a multipart object in a few MB
SERVERS = {"moto": "moto_s3", "seaweedfs": "seaweed_s3"}


@pytest.fixture(params=["dir", *SERVERS])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def objects(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> ObjectStore:
    if kind == "dir":
        d = tmp_path / "objects"
        d.mkdir()
        return DirObjectStore(d)
    server: S3Server = request.getfixturevalue(SERVERS[kind])
    return s3_store(server)  # type: ignore[no-any-return]


def _put(store: ObjectStore, key: str, data: bytes, **kw: Any) -> str:
    meta = kw.pop("meta", Meta(sha256_hex(data)))
    return store.put(key, data, checksum=sha256_hex(data), meta=meta, **kw)


def _get(store: ObjectStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    with store.get(key, start, end) as f:
        return f.read()


# -- the contract ------------------------------------------------------------------------------


def test_put_head_get_list_delete(objects: ObjectStore) -> None:
    objects.check()
    assert objects.list() == [] and objects.uploads() == []
    _put(objects, "a/x.log", b"hello", meta=Meta(sha256_hex(b"hello"), "w1"))
    _put(objects, "a/y.log", b"")
    _put(objects, "b.log", b"bee")
    assert [i.key for i in objects.list()] == ["a/x.log", "a/y.log", "b.log"]
    assert [i.key for i in objects.list("a/")] == ["a/x.log", "a/y.log"]
    assert [i.size for i in objects.list("a/")] == [5, 0]
    info = objects.head("a/x.log")
    assert (info.size, info.sha256, info.writer) == (5, sha256_hex(b"hello"), "w1")
    assert _get(objects, "a/x.log") == b"hello" and _get(objects, "a/y.log") == b""
    assert objects.describe("a/x.log").endswith("a/x.log")
    objects.delete("a/x.log")
    objects.delete("a/x.log")  # gone already: nothing
    assert [i.key for i in objects.list()] == ["a/y.log", "b.log"]


def test_missing_objects(objects: ObjectStore) -> None:
    for call in (lambda: objects.head("no.log"), lambda: _get(objects, "no.log")):
        with pytest.raises(ObjectNotFound) as e:
            call()
        assert isinstance(e.value, FileNotFoundError) and "no.log" in e.value.message


def test_ranges(objects: ObjectStore) -> None:
    data = bytes(range(256)) * 4
    _put(objects, "r", data)
    assert _get(objects, "r", 10, 20) == data[10:20]
    assert _get(objects, "r", 1000) == data[1000:]
    assert _get(objects, "r", 5, 5) == b""
    etag = objects.head("r").etag
    with objects.get("r", 0, 4, etag=etag) as f:
        assert f.read() == data[:4]
    _put(objects, "r", b"another version")
    with pytest.raises(ObjectCorrupt, match="changed while it was read"):
        objects.get("r", 0, 4, etag=etag).read()


def test_conditional_create_never_replaces(objects: ObjectStore) -> None:
    _put(objects, "c", b"first", if_absent=True)
    with pytest.raises(ObjectExists) as e:
        _put(objects, "c", b"second", if_absent=True)
    assert isinstance(e.value, FileExistsError) and e.value.exit_code == 3
    assert _get(objects, "c") == b"first"
    _put(objects, "c", b"replaced")  # unconditional: replaces
    assert _get(objects, "c") == b"replaced"


def test_multipart_upload_and_verified_download(objects: ObjectStore) -> None:
    data = os.urandom(2 * PART + 12345)
    up = upload(objects, "big.tar.zst", data, first_part=PART)
    assert (up.size, up.sha256, up.existed) == (len(data), sha256_hex(data), False)
    assert objects.uploads() == []
    assert objects.head("big.tar.zst").size == len(data)
    with ObjectReader(objects, "big.tar.zst", sha256=up.sha256, first=1000) as f:
        head = f.read(10)
        assert head == data[:10]
        assert head + f.read() == data
        assert f.verified
    with (
        ObjectReader(objects, "big.tar.zst", sha256="0" * 64) as f,
        pytest.raises(ObjectCorrupt, match="does not hash to the SHA-256 recorded"),
    ):
        f.read()


def test_upload_of_a_stream_of_unknown_size(objects: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(PART + 1))
    with open(src, "rb") as f:
        up = upload(objects, "s.log", f, first_part=PART)
    assert read_all(objects, "s.log", up.sha256) == src.read_bytes()


def test_a_conditional_upload_finds_its_twin_or_refuses(objects: ObjectStore) -> None:
    data = os.urandom(PART + 10)
    upload(objects, "t", data, first_part=PART)
    again = upload(objects, "t", data, first_part=PART)  # same bytes: fine (a resumed copy)
    assert again.existed
    with pytest.raises(ObjectExists):
        upload(objects, "t", data[:-1] + b"!", first_part=PART)
    assert upload(objects, "small", b"x").existed is False
    assert upload(objects, "small", b"x").existed
    with pytest.raises(ObjectExists):
        upload(objects, "small", b"y")
    assert objects.uploads() == []  # no upload left behind by the refusals
    assert read_all(objects, "t") == data


def test_a_failed_multipart_upload_is_aborted(objects: ObjectStore) -> None:
    flaky = FlakyObjects(objects, fail={"put_part": 1})
    with pytest.raises(Transient, match="injected"):
        upload(flaky, "f", os.urandom(2 * PART + 1), first_part=PART)
    assert flaky.calls["abort_upload"] == 1
    assert objects.uploads() == [] and objects.list() == []
    w = ObjectWriter(objects, "g", first_part=PART)
    w.write(os.urandom(PART + 1))
    assert [u.key for u in objects.uploads()] == ["g"]  # in progress, never listed
    assert objects.list() == []
    w.abort()
    w.abort()
    assert objects.uploads() == []


def test_one_part_objects_record_their_hash(objects: ObjectStore) -> None:
    w = ObjectWriter(objects, "h", meta=Meta(None, "tok"))
    w.write(b"small")
    w.publish()
    info = objects.head("h")
    assert (info.sha256, info.writer) == (sha256_hex(b"small"), "tok")
    assert read_all(objects, "h") == b"small"


def test_a_wrong_checksum(objects: ObjectStore, kind: str) -> None:
    """SeaweedFS (like AWS) and the directory refuse bytes that do not match the checksum sent
    with them; moto takes them — which is why the suite runs against more than moto."""
    wrong = sha256_hex(b"other bytes")
    if kind == "moto":
        objects.put("w", b"bytes", checksum=wrong, meta=Meta())
        return
    with pytest.raises(ObjectCorrupt, match="BadDigest|other bytes"):
        objects.put("w", b"bytes", checksum=wrong, meta=Meta())
    uid = objects.start_upload("w", meta=Meta())
    with pytest.raises(ObjectCorrupt):
        objects.put_part("w", uid, 1, b"part", checksum=wrong)
    objects.abort_upload("w", uid)
    with pytest.raises(ObjectNotFound):
        objects.head("w")


def test_bad_keys(objects: ObjectStore) -> None:
    for bad in ("", "/abs", "a//b", "a/../b", ".", "x/./y", "tab\there"):
        with pytest.raises(ValueError):
            objects.head(bad)


# -- S3 only -----------------------------------------------------------------------------------


@pytest.fixture(params=list(SERVERS))
def server(request: pytest.FixtureRequest) -> S3Server:
    return request.getfixturevalue(SERVERS[request.param])  # type: ignore[no-any-return]


def test_a_missing_bucket(server: S3Server) -> None:
    from engram.cloud.s3 import S3ObjectStore

    s = S3ObjectStore("no-such-bucket-here", endpoint_url=server.endpoint, path_style=True)
    with pytest.raises(NoSuchBucket, match="bucket no-such-bucket-here does not exist at http"):
        s.check()
    assert NoSuchBucket().exit_code == 2


def test_wrong_credentials(seaweed_s3: S3Server) -> None:
    import boto3

    from engram.cloud.s3 import S3ObjectStore

    client = boto3.client(
        "s3",
        endpoint_url=seaweed_s3.endpoint,
        aws_access_key_id="nobody",
        aws_secret_access_key="wrong",
    )
    s = S3ObjectStore(BUCKET, client=client)
    with pytest.raises(AccessDenied, match="access denied .*check the credentials"):
        s.check()


def _refusing_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: connections are refused


def test_an_unreachable_endpoint_is_transient_then_one_clear_error() -> None:
    from engram.cloud.s3 import S3ObjectStore

    url = f"http://127.0.0.1:{_refusing_port()}"
    s = S3ObjectStore(BUCKET, endpoint_url=url, path_style=True, connect_timeout=0.5)
    with pytest.raises(Transient, match="check the endpoint"):
        s.head("x")
    with pytest.raises(Transient, match=r"gave up after \d+ attempts") as e:
        RetryingObjectStore(s, FAST).head("x")
    assert "\n" not in e.value.message and url in e.value.message


def test_a_wrong_endpoint_is_given_up_soon_an_outage_after_the_full_budget(
    tmp_path: Path,
) -> None:
    """Failing to connect at all before the endpoint has ever answered is most likely a wrong
    endpoint: given up after Backoff.first_contact of waiting, saying so. Once it has answered,
    the same failure is an outage and rides out the whole budget."""
    waits: list[float] = []
    backoff = Backoff(base=1.0, cap=8.0, budget=120.0, first_contact=5.0)

    class Down:
        """An endpoint that refuses every connection, or answers once ``up`` is set."""

        def __init__(self) -> None:
            self.up = False
            self.inner = DirObjectStore(tmp_path)

        def __getattr__(self, name: str) -> Any:
            def call(*a: Any, **kw: Any) -> Any:
                if not self.up:
                    raise Unreachable("head x at http://127.0.0.1:1: connection refused")
                return getattr(self.inner, name)(*a, **kw)

            return call

    down = Down()
    r = RetryingObjectStore(down, backoff, sleep=waits.append, rng=random.Random(7))  # type: ignore[arg-type]
    with pytest.raises(Transient, match="the endpoint never answered") as e:
        r.list()
    assert sum(waits) <= 5.0 and "\n" not in e.value.message
    down.up = True
    assert r.list() == []  # it answers now
    down.up, waits[:] = False, []
    with pytest.raises(Transient, match=r"gave up after \d+ attempts") as e:
        r.list()
    assert sum(waits) > 5.0 and "never answered" not in e.value.message


def test_a_server_that_never_answers_times_out() -> None:
    """Bounded timeouts: a peer that accepts the connection and says nothing is a Transient
    failure after read_timeout, never a hang."""
    from engram.cloud.s3 import S3ObjectStore

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        s = S3ObjectStore(BUCKET, endpoint_url=url, path_style=True, read_timeout=0.5)
        with pytest.raises(Transient):
            s.head("x")


def test_storage_class_per_put(moto_s3: S3Server) -> None:
    s = s3_store(moto_s3)
    upload(s, "cold.log", b"ice", storage_class="STANDARD_IA")
    h = moto_s3.client().head_object(Bucket=BUCKET, Key=s.prefix + "cold.log")
    assert h["StorageClass"] == "STANDARD_IA"


# -- retries -----------------------------------------------------------------------------------


def test_transient_failures_are_retried(tmp_path: Path) -> None:
    inner = DirObjectStore(tmp_path)
    flaky = FlakyObjects(inner, fail={"put": 2, "head": 1, "list": 3})
    r = RetryingObjectStore(flaky, FAST)
    _put(r, "k", b"v")
    assert r.head("k").size == 1 and [i.key for i in r.list()] == ["k"]
    assert flaky.calls == {"put": 3, "head": 2, "list": 4}


def test_retries_give_up_with_one_clear_error(tmp_path: Path) -> None:
    flaky = FlakyObjects(DirObjectStore(tmp_path), fail={"head": 10_000})
    with pytest.raises(Transient, match=r"injected: head failed .*\(gave up after \d+ attempts"):
        RetryingObjectStore(flaky, FAST).head("k")
    with pytest.raises(ValueError):
        Backoff(base=0)


def test_a_non_transient_failure_is_not_retried(tmp_path: Path) -> None:
    flaky = FlakyObjects(DirObjectStore(tmp_path))
    with pytest.raises(ObjectNotFound):
        RetryingObjectStore(flaky, FAST).head("absent")
    assert flaky.calls["head"] == 1


@pytest.mark.parametrize("op", ["put", "complete_upload"])
def test_a_lost_answer_to_a_conditional_create_is_recognised(objects: ObjectStore, op: str) -> None:
    """The create took effect, its answer was lost, the retry finds the key taken: the writer
    knows its own object by its token and does not fail."""
    flaky = FlakyObjects(objects, lose={op: 1})
    data = os.urandom(PART + 1) if op == "complete_upload" else b"tiny"
    up = upload(RetryingObjectStore(flaky, FAST), "lost", data, first_part=PART)
    assert flaky.calls[op] == 2 and not up.existed
    assert read_all(objects, "lost", sha256_hex(data)) == data
    assert objects.uploads() == []


def test_a_read_cut_mid_body_resumes_where_it_stopped(objects: ObjectStore) -> None:
    data = os.urandom(300_000)
    _put(objects, "cut", data)
    flaky = FlakyObjects(objects, cut_after=100_000, cuts=2)
    with ObjectReader(RetryingObjectStore(flaky, FAST), "cut", first=250_000) as f:
        assert f.read() == data and f.verified
    assert flaky.calls["get"] >= 3


# -- the part size plan ------------------------------------------------------------------------


def test_part_sizes_for_known_sizes() -> None:
    for size in (0, 1, DEFAULT_PART * MAX_PARTS, DEFAULT_PART * MAX_PARTS + 1, 10**12, MAX_OBJECT):
        p = part_size(1, size)
        assert p >= DEFAULT_PART and p % (1 << 20) == 0 and p <= MAX_PART
        assert -(-size // p) <= MAX_PARTS
    with pytest.raises(ValueError, match="5 TiB"):
        part_size(1, MAX_OBJECT + 1)


def test_part_sizes_of_a_stream_reach_the_object_limit() -> None:
    sizes = [part_size(n, None) for n in range(1, MAX_PARTS + 1)]
    assert sizes[0] == DEFAULT_PART and max(sizes) <= MAX_PART
    assert sizes == sorted(sizes) and sum(sizes) >= MAX_OBJECT
    for bad in (0, MAX_PARTS + 1):
        with pytest.raises(ValueError):
            part_size(bad, None)


def test_writer_grows_parts_of_a_stream(tmp_path: Path) -> None:
    store = DirObjectStore(tmp_path)
    w = ObjectWriter(store, "grow", first_part=1000)
    data = os.urandom(1000 * 1000 + 2500 * 2 + 7)  # 1,000 parts of 1000, then larger ones
    for i in range(0, len(data), 4096):
        w.write(data[i : i + 4096])
    w.publish()
    assert [p.size for p in w.parts][998:] == [1000, 1000, 2000, 2000, 1007]
    assert read_all(store, "grow", hashlib.sha256(data).hexdigest()) == data


# -- URLs --------------------------------------------------------------------------------------


def test_s3_urls() -> None:
    assert parse_s3_url("s3://bkt/a/b/").prefix == "a/b/"
    assert parse_s3_url("s3://bkt/a/b").prefix == "a/b/"
    assert parse_s3_url("s3://bkt").prefix == "" == parse_s3_url("s3://bkt/").prefix
    for bad in (
        "/local/dir",
        "s3:/bkt/x",
        "s3://",
        "s3://B/x",
        "s3://ab/x",
        "s3://bkt/a//b",
        "s3://bkt/a/../b",
        "s3://bkt/x?versionId=1",
        "s3://key:secret@bkt/x",
        "s3://bkt:9000/x",
    ):
        with pytest.raises(UsageError, match="is not an S3 URL") as e:
            parse_s3_url(bad)
        assert repr(bad) in e.value.message
    with pytest.raises(UsageError, match="names no object"):
        open_ref("s3://bkt/repo/")


def test_urls_open_stores(moto_s3: S3Server) -> None:
    store = open_store(f"s3://{BUCKET}/url-repo", endpoint_url=moto_s3.endpoint, path_style=True)
    assert store.describe("x.log") == f"s3://{BUCKET}/url-repo/x.log"
    store.create("x.log.sha256", b"not a hash\n")
    ref = open_ref(f"s3://{BUCKET}/url-repo/x.log.sha256", endpoint_url=moto_s3.endpoint)
    assert ref.name == "x.log.sha256" and ref.store.read(ref.name) == b"not a hash\n"


def test_the_endpoint_comes_from_the_environment(
    moto_s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint)
    store = open_store(f"s3://{BUCKET}/env-repo/", path_style=True)
    store.create("e.log.info.json", b"{}")
    assert store.list() == ["e.log.info.json"]


# -- the BackupStore seam over objects (what only an object store does; the shared contract is
# tests/unit/test_backup_store.py) ------------------------------------------------------------


def _backup(store: ObjectBackupStore, name: str, data: bytes, sidecar: bytes | None = None) -> None:
    temp = store.create_temp(name)
    try:
        for i in range(0, len(data), 1 << 20):
            temp.write(data[i : i + (1 << 20)])
        temp.sync_close()
        store.publish(temp)
        side = sidecar if sidecar is not None else encode_sidecar(sha256_hex(data), name)
        store.create(sidecar_name(name), side, temp)
        store.create(info_name(name), b"{}", temp)
    except BaseException:
        store.discard(temp)
        raise
    store.commit(temp)


def test_a_multipart_backup_is_published_whole_and_read_verified(objects: ObjectStore) -> None:
    store = ObjectBackupStore(objects, first_part=PART)
    data = os.urandom(2 * PART + 99)
    temp = store.create_temp("full.tar.zst")
    temp.write(data[: PART + 1])  # a part is uploaded: an upload in progress, not an object
    assert store.list() == [] and not store.exists("full.tar.zst")
    store.discard(temp)
    assert objects.uploads() == []
    _backup(store, "full.tar.zst", data)
    assert store.list() == ["full.tar.zst", "full.tar.zst.info.json", "full.tar.zst.sha256"]
    assert objects.uploads() == [] and store.size("full.tar.zst") == len(data)
    with store.open("full.tar.zst") as f:
        assert f.read(100) == data[:100] and f.read() == data[100:]
    # The archive's hash is recorded by its sidecar: a sidecar naming other bytes fails the read.
    objects.put(
        "full.tar.zst.sha256",
        side := encode_sidecar("ab" * 32, "full.tar.zst"),
        checksum=sha256_hex(side),
        meta=Meta(sha256_hex(side)),
    )
    with store.open("full.tar.zst") as f, pytest.raises(ObjectCorrupt, match="damaged"):
        f.read()


def test_a_sidecar_that_disagrees_with_the_upload_is_refused(objects: ObjectStore) -> None:
    store = ObjectBackupStore(objects, first_part=PART)
    wrong = encode_sidecar("cd" * 32, "x.log")
    with pytest.raises(ObjectCorrupt, match="would record"):
        _backup(store, "x.log", b"records", sidecar=wrong)
    assert store.list() == [] and objects.uploads() == []


def test_prepare_aborts_only_stale_uploads(objects: ObjectStore, kind: str) -> None:
    young = ObjectWriter(objects, "live.tar.zst", first_part=PART)
    young.write(os.urandom(PART + 1))
    store = ObjectBackupStore(objects, first_part=PART)
    if kind != "moto":  # moto reports every upload as begun in 2010: all are stale there
        assert store.prepare() == []
        assert [u.key for u in objects.uploads()] == ["live.tar.zst"]
    later = ObjectBackupStore(objects, clock=time.time() + STALE_AFTER + 3600)
    assert later.prepare() == ["live.tar.zst"]
    assert objects.uploads() == [] and objects.list() == []


def test_a_live_writer_whose_upload_was_aborted_publishes_nothing(
    objects: ObjectStore, kind: str
) -> None:
    if kind == "moto":
        pytest.skip("moto answers 500, not NoSuchUpload, for an upload that was aborted")
    store = ObjectBackupStore(objects, first_part=PART)
    temp = store.create_temp("slow.tar.zst")
    temp.write(os.urandom(PART + 1))
    temp.sync_close()
    ObjectBackupStore(objects, clock=time.time() + 2 * STALE_AFTER).prepare()
    with pytest.raises(ObjectNotFound, match="was aborted before it was completed"):
        store.publish(temp)
    store.discard(temp)
    assert store.list() == [] and objects.uploads() == []


def test_a_missing_bucket_or_directory_fails_prepare(tmp_path: Path) -> None:
    with pytest.raises(NoSuchBucket, match="does not exist; create it first"):
        ObjectBackupStore(DirObjectStore(tmp_path / "nope")).prepare()
