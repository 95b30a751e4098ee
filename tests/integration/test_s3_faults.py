"""Network faults between engram and S3 (issue 12, item 5; the seed's week-3 drill "block cloud
backup upload mid-transfer"): tests/netfault.py's proxy sits between engram and SeaweedFS on
127.0.0.1 and cuts, resets, stalls or answers with S3 errors. Uploads and downloads finish
byte-identical after cuts at random offsets and exactly at part boundaries, no multipart
upload is left behind, nothing hangs (bounded timeouts), and a fault that outlasts the
retries is one clear error with a non-zero exit — for the storage layer and for `engram push`
and `engram pull` as an operator runs them. First, the parallel parts and the read-ahead
themselves, on a directory store.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engram.backup.full import full_backup
from engram.graph import Engine, EngineConfig
from engram.storage.dirobjects import DirObjectStore
from engram.storage.objectfaults import FlakyObjects
from engram.storage.objects import (
    MIN_PART,
    READ_AHEAD,
    ObjectCorrupt,
    ObjectReader,
    ObjectStore,
    ObjectWriter,
    OrderedHash,
    Part,
    Transient,
    read_all,
    sha256_hex,
    upload,
)
from engram.storage.retry import Backoff, RetryingObjectStore
from netfault import FaultProxy
from s3servers import BUCKET, S3Server, s3_prefix

PART = MIN_PART
FAST = Backoff(base=0.05, cap=0.2, budget=3.0)  # tests wait seconds, not minutes
BIN = Path(sys.executable).parent
rng = random.Random(12)


# -- parallel parts and read-ahead ---------------------------------------------------------------


class _Gate(FlakyObjects):
    """Counts the parts in flight at once; the part ``fail_at`` fails (after the others began)."""

    def __init__(self, inner: ObjectStore, fail_at: int | None = None) -> None:
        super().__init__(inner)
        self.lock = threading.Lock()
        self.now = self.most = 0
        self.fail_at = fail_at
        self.after_abort: list[int] = []
        self.aborted = False

    def put_part(
        self, key: str, upload_id: str, number: int, data: bytes, *, checksum: str
    ) -> Part:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            threading.Event().wait(0.05)  # long enough for the writer to hand out the next parts
            if number == self.fail_at:
                raise Transient(f"injected: part {number} failed")
            return super().put_part(key, upload_id, number, data, checksum=checksum)
        finally:
            with self.lock:
                self.now -= 1
                if self.aborted:
                    self.after_abort.append(number)

    def abort_upload(self, key: str, upload_id: str) -> None:
        with self.lock:
            self.aborted = True
        super().abort_upload(key, upload_id)


def test_the_hash_taken_on_a_thread_keeps_the_order() -> None:
    pieces = [os.urandom(n) for n in (10, 70_000, 5, 200_000, 64 * 1024, 1, 300_000)]
    h = OrderedHash(backlog=1)
    for i, p in enumerate(pieces):
        (h.update_now if i % 3 == 2 else h.update)(p)
    assert h.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_parts_go_up_in_parallel_within_the_bound(tmp_path: Path) -> None:
    store = _Gate(DirObjectStore(tmp_path))
    data = os.urandom(6 * 1000 + 17)
    w = ObjectWriter(store, "p", first_part=1000, threads=3)
    for i in range(0, len(data), 700):
        w.write(data[i : i + 700])
    w.publish()
    assert 1 < store.most <= 3
    assert [p.number for p in w.parts] == list(range(1, 8))
    assert read_all(store, "p", sha256_hex(data)) == data


def test_a_failed_part_aborts_once_every_part_in_flight_is_done(tmp_path: Path) -> None:
    inner = DirObjectStore(tmp_path)
    store = _Gate(inner, fail_at=2)
    with pytest.raises(Transient, match="part 2 failed"):
        upload(store, "f", io.BytesIO(os.urandom(8 * 1000)), first_part=1000, threads=4)
    assert store.calls["abort_upload"] == 1 and store.after_abort == []
    assert inner.uploads() == [] and inner.list() == []


def test_read_ahead_is_verified_in_order_and_a_bad_range_fails(tmp_path: Path) -> None:
    store = DirObjectStore(tmp_path)
    data = os.urandom(3 * 1000 * 1000 + 5)
    up = upload(store, "r", data, first_part=PART)
    with ObjectReader(store, "r", sha256=up.sha256, first=1000, window=300_000, ahead=3) as f:
        got = b"".join(iter(lambda: f.read(77_777), b""))
    assert got == data and f.verified
    with (
        ObjectReader(store, "r", sha256="0" * 64, first=1000, window=300_000) as f,
        pytest.raises(ObjectCorrupt, match="does not hash"),
    ):
        f.read()
    # A range that cannot be read (a body cut past the retries) fails the read that reaches it.
    flaky = FlakyObjects(store, cut_after=10, cuts=100)
    with (
        ObjectReader(RetryingObjectStore(flaky, Backoff(0.001, 0.001, 0.005)), "r", first=100) as f,
        pytest.raises(Transient),
    ):
        f.read()
    # A reader closed half way drops its ranges fetched ahead.
    with ObjectReader(store, "r", first=1000, window=300_000) as f:
        assert f.read(1000) == data[:1000]  # the first range, streamed
        assert f.read(10) == data[1000:1010]  # the next, fetched ahead with the ones after it
        assert len(f._fetching) == READ_AHEAD  # refilled as one is taken


# -- through the fault proxy ---------------------------------------------------------------------


@pytest.fixture
def proxy(seaweed_s3: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", seaweed_s3.port)) as p:
        yield p


def _store(proxy: FaultProxy, prefix: str, **kw: Any) -> RetryingObjectStore:
    from engram.cloud.s3 import S3ObjectStore

    s3 = S3ObjectStore(
        BUCKET,
        prefix,
        endpoint_url=proxy.url,
        path_style=True,
        connect_timeout=2.0,
        read_timeout=kw.pop("read_timeout", 5.0),
    )
    return RetryingObjectStore(s3, kw.pop("backoff", FAST))


def _uploads(server: S3Server, prefix: str) -> list[Any]:
    return server.client().list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])


def _direct_sha(server: S3Server, key: str) -> str:
    body = server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return hashlib.sha256(body).hexdigest()


DATA = os.urandom(3 * PART + 4321)
# Where the upload's body is cut: random offsets, and exactly at the first and second part
# boundaries (one part at a time, so the body bytes counted are those of the parts in order).
UP_CUTS = [
    ("random", rng.randrange(1, len(DATA)), 4, False),
    ("random-rst", rng.randrange(1, len(DATA)), 4, True),
    ("boundary-1", PART, 1, False),
    ("boundary-2", 2 * PART, 1, True),
    ("in-last-part", 3 * PART + 100, 1, False),
]


@pytest.mark.parametrize(("where", "at", "threads", "reset"), UP_CUTS, ids=[c[0] for c in UP_CUTS])
def test_an_upload_cut_mid_transfer_finishes_byte_identical(
    seaweed_s3: S3Server, proxy: FaultProxy, where: str, at: int, threads: int, reset: bool
) -> None:
    prefix = s3_prefix()
    store = _store(proxy, prefix)
    proxy.cut_after(at, "up", reset=reset, body_only=True)
    up = upload(store, "cut.tar.zst", DATA, first_part=PART, threads=threads)
    assert proxy.stats().cuts == 1, where
    assert up.sha256 == sha256_hex(DATA) and up.size == len(DATA)
    assert _direct_sha(seaweed_s3, prefix + "cut.tar.zst") == up.sha256
    assert _uploads(seaweed_s3, prefix) == []


@pytest.mark.parametrize(
    "at",
    [rng.randrange(1000, len(DATA)), 256 * 1024, 256 * 1024 + 1024 * 1024, len(DATA) - 10],
    ids=["random", "first-range", "second-range", "near-the-end"],
)
def test_a_download_cut_mid_transfer_finishes_byte_identical(
    seaweed_s3: S3Server, proxy: FaultProxy, at: int
) -> None:
    prefix = s3_prefix()
    store = _store(proxy, prefix)
    up = upload(store, "dl.tar.zst", DATA, first_part=PART)
    before = proxy.stats().down_bytes
    proxy.cut_after(at, "down", reset=at % 2 == 1)
    with ObjectReader(store, "dl.tar.zst", sha256=up.sha256) as f:
        got = f.read()
        assert f.verified
    assert got == DATA
    assert proxy.stats().cuts == 1 and proxy.stats().down_bytes > before + at


@pytest.mark.parametrize("status", [503, 500, 408, 429])
def test_injected_s3_errors_are_retried(
    seaweed_s3: S3Server, proxy: FaultProxy, status: int
) -> None:
    prefix = s3_prefix()
    store = _store(proxy, prefix)
    proxy.inject(status, count=3)
    up = upload(store, "e.tar.zst", DATA, first_part=PART)
    assert proxy.stats().injected == 3
    assert read_all(store, "e.tar.zst", up.sha256) == DATA
    assert _uploads(seaweed_s3, prefix) == []


def test_a_stall_times_out_and_an_outage_past_the_retries_is_one_error(
    seaweed_s3: S3Server, proxy: FaultProxy
) -> None:
    prefix = s3_prefix()
    store = _store(proxy, prefix, read_timeout=1.0, backoff=Backoff(0.05, 0.1, 0.5))
    up = upload(store, "s.tar.zst", DATA[: PART + 1], first_part=PART)
    proxy.stall("down")
    with pytest.raises(Transient, match="gave up after"):
        read_all(store, "s.tar.zst", up.sha256)
    proxy.clear()
    proxy.cut_after(1000, "up", body_only=True, times=None)  # every request body is cut
    with pytest.raises(Transient, match="gave up after") as e:
        upload(store, "never.tar.zst", DATA, first_part=PART)
    assert "\n" not in str(e.value)
    proxy.clear()
    assert _uploads(seaweed_s3, prefix) == []
    keys = seaweed_s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    assert [o["Key"] for o in keys] == [prefix + "s.tar.zst"]


# -- engram push and pull through the proxy --------------------------------------------------------


@pytest.fixture(scope="module")
def backup_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full backup of a few MB (several parts at the smallest part size)."""
    d = tmp_path_factory.mktemp("faults")
    r = d / "repo"
    r.mkdir()
    gen = random.Random(7)
    with Engine.open(d / "data", EngineConfig(checkpoint_interval=3600), create=True) as e:
        for i in range(400):
            text = "".join(gen.choice("abcdefghij klmnopqrst") for _ in range(4000))
            e.apply([{"op": "create_memory", "id": f"m{i}", "content": text}])
        full_backup(e, r / "full.tar.zst")
    return r / "full.tar.zst"


def _engram(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_TOKEN"}
    return subprocess.run(
        [str(BIN / "engram"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_push_and_pull_through_cuts_and_a_lasting_outage(
    seaweed_s3: S3Server, proxy: FaultProxy, backup_file: Path, tmp_path: Path
) -> None:
    prefix = s3_prefix()
    url = f"s3://{BUCKET}/{prefix}"
    opts = ["--endpoint-url", proxy.url, "--s3-path-style", "--s3-retry-for", "3s"]
    size = backup_file.stat().st_size
    proxy.cut_after(rng.randrange(1, size), "up", body_only=True)
    p = _engram(tmp_path, "push", str(backup_file), "--to", url, *opts)
    assert p.returncode == 0, p.stderr
    assert proxy.stats().cuts == 1
    sha = hashlib.sha256(backup_file.read_bytes()).hexdigest()
    assert _direct_sha(seaweed_s3, prefix + "full.tar.zst") == sha
    home = tmp_path / "home"
    home.mkdir()
    proxy.cut_after(rng.randrange(1000, size), "down", reset=True)
    p = _engram(tmp_path, "pull", url + "full.tar.zst", str(home), *opts)
    assert p.returncode == 0, p.stderr
    assert proxy.stats().cuts == 2
    assert (home / "full.tar.zst").read_bytes() == backup_file.read_bytes()
    # An outage that outlasts the retries: one line, exit 1, nothing left at either end.
    proxy.cut_after(100, "up", times=None)
    other = f"s3://{BUCKET}/{s3_prefix()}"
    p = _engram(tmp_path, "push", str(backup_file), "--to", other, *opts)
    assert p.returncode == 1
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and p.stderr.splitlines()[-1] == errors[0], p.stderr
    assert "gave up after" in errors[0]
    proxy.clear()
    assert _uploads(seaweed_s3, other.split("/", 3)[3]) == []
    home2 = tmp_path / "home2"
    home2.mkdir()
    proxy.cut_after(100, "down", times=None)
    p = _engram(tmp_path, "pull", url + "full.tar.zst", str(home2), *opts)
    assert p.returncode == 1 and p.stderr.splitlines()[-1].startswith("error: "), p.stderr
    proxy.clear()
    assert [n for n in os.listdir(home2)] == []
