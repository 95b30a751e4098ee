"""``S3ObjectStore``: the ``ObjectStore`` seam on any S3-compatible service, through boto3.

One request per method, never retried here (boto3's own retries are off:
``storage.retry.RetryingObjectStore`` retries, around any store), with bounded connect and read
timeouts so that nothing hangs. botocore's failures become the core's few kinds
(``storage.objects``): ``Transient`` (5xx, 408, 429/SlowDown, a dropped connection, a timeout),
``ObjectNotFound``, ``ObjectExists`` (412 on ``If-None-Match: *``), ``AccessDenied`` (refused or
missing credentials), ``NoSuchBucket`` and ``ObjectCorrupt`` (BadDigest: the server received other
bytes than the SHA-256 checksum sent with them), each one line naming the endpoint, bucket and key.

Where it connects: ``endpoint_url`` when given, else what boto3 finds itself — the
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` variables or the AWS config file's
``endpoint_url`` — else AWS. Region and credentials come from the usual AWS chain (variables,
``~/.aws/credentials`` and ``config``, ``profile``, instance roles). ``path_style`` forces
``http://host/bucket/key`` addressing (most self-hosted servers want it); None leaves it to the
config file.
"""

from __future__ import annotations

import base64
import builtins
import io
from datetime import datetime
from typing import Any, BinaryIO

import boto3
import botocore.exceptions as bx
from botocore.config import Config

from engram.storage.objects import (
    META_SHA256,
    META_WRITER,
    AccessDenied,
    Meta,
    NoSuchBucket,
    ObjectCorrupt,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreError,
    Part,
    Transient,
    Unreachable,
    Upload,
    check_key,
    check_prefix,
)

TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "TooManyRequests",
    "ConditionalRequestConflict",  # AWS: concurrent conditional writes, retry
}
DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "AllAccessDisabled",
}
NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchUpload"}
CORRUPT_CODES = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum"}


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _epoch(t: Any) -> float:
    return t.timestamp() if isinstance(t, datetime) else 0.0


class _Body(io.RawIOBase):
    """A GET's body: failures while reading are ``Transient``, and a body that ends before its
    Content-Length is one too (the connection dropped)."""

    def __init__(self, store: S3ObjectStore, key: str, body: Any, length: int) -> None:
        super().__init__()
        self.store = store
        self.key = key
        self.body = body
        self.left = length

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        want = min(len(view), self.left)
        if want <= 0:
            return 0
        try:
            data = self.body.read(want)
        except (bx.BotoCoreError, OSError) as e:
            raise Transient(
                f"reading {self.store.describe(self.key)} from {self.store.endpoint} failed "
                f"({type(e).__name__}: {e}); check the network"
            ) from e
        if not data:
            raise Transient(
                f"{self.store.describe(self.key)} from {self.store.endpoint}: the connection "
                f"ended {self.left} bytes early; check the network"
            )
        n = len(data)
        view[:n] = data
        self.left -= n
        return n

    def close(self) -> None:
        try:
            self.body.close()
        finally:
            super().close()


class S3ObjectStore:
    """The objects under ``prefix`` (``""`` or ending in ``/``) of ``bucket`` (module docstring).
    ``client`` is for tests that bring their own boto3 client."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        path_style: bool | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_connections: int = 10,
        client: Any = None,
    ) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket = bucket
        self.prefix = check_prefix(prefix)
        if client is None:
            s3cfg: dict[str, Any] = {}
            if path_style is not None:
                s3cfg["addressing_style"] = "path" if path_style else "virtual"
            config = Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"total_max_attempts": 1, "mode": "standard"},
                s3=s3cfg or None,
                max_pool_connections=max_connections,
                tcp_keepalive=True,
                # engram sends a SHA-256 with every upload itself and checks every download
                # against the whole object's hash; boto3's own CRCs would be a second pass.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            try:
                session = boto3.session.Session(profile_name=profile, region_name=region)
                client = session.client("s3", endpoint_url=endpoint_url, config=config)
            except bx.ProfileNotFound as e:
                raise AccessDenied(f"{e}; name a profile of ~/.aws/config") from e
            except (bx.BotoCoreError, ValueError) as e:
                raise ObjectStoreError(f"cannot set up the S3 client: {e}") from e
        self.client = client
        self.endpoint = str(client.meta.endpoint_url)

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.describe()!r}, endpoint={self.endpoint!r})"

    def describe(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    # -- errors ----------------------------------------------------------------------------

    def _error(self, e: Exception, op: str, key: str = "") -> ObjectStoreError:
        where = f"{self.describe(key)} at {self.endpoint}"
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            msg = str(err.get("Message", "")) or code
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code == "NoSuchBucket":
                return NoSuchBucket(
                    f"bucket {self.bucket} does not exist at {self.endpoint}; create it or "
                    "name another"
                )
            if code in TRANSIENT_CODES or status >= 500 or status in (408, 429):
                return Transient(f"{op} {where}: {msg} ({code or status}); try again later")
            if code in DENIED_CODES or status == 403:
                return AccessDenied(
                    f"{op} {where}: access denied ({code or status}: {msg}); check the "
                    "credentials and the bucket's policy"
                )
            if code == "PreconditionFailed" or status == 412:
                return ObjectExists(f"{where} already exists; nothing was replaced")
            if code in CORRUPT_CODES:
                return ObjectCorrupt(
                    f"{op} {where}: the server received other bytes than were sent ({code}); "
                    "nothing was stored"
                )
            if code in NOT_FOUND_CODES or status == 404:
                return ObjectNotFound(f"{where} does not exist ({code or status}); check the name")
            return ObjectStoreError(f"{op} {where} failed: {msg} ({code or status})")
        if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return AccessDenied(
                f"{op} {where}: no AWS credentials found ({e}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or a profile"
            )
        if isinstance(e, bx.EndpointConnectionError):
            return Unreachable(
                f"{op} {where}: {type(e).__name__}: {e}; check the endpoint and the network"
            )
        if isinstance(e, (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError)):
            return Transient(
                f"{op} {where}: {type(e).__name__}: {e}; check the endpoint and the network"
            )
        return ObjectStoreError(f"{op} {where} failed: {type(e).__name__}: {e}")

    def _call(self, op: str, key: str, fn: Any, **kw: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, **kw)
        except (bx.BotoCoreError, bx.ClientError) as e:
            raise self._error(e, op, key) from e

    # -- the seam --------------------------------------------------------------------------

    def check(self) -> None:
        self._call("list", "", self.client.list_objects_v2, Prefix=self.prefix, MaxKeys=1)

    def head(self, key: str) -> ObjectInfo:
        r = self._call("head", key, self.client.head_object, Key=self._key(key))
        meta = {k.lower(): v for k, v in (r.get("Metadata") or {}).items()}
        return ObjectInfo(
            key,
            int(r["ContentLength"]),
            str(r["ETag"]),
            _epoch(r.get("LastModified")),
            meta.get(META_SHA256),
            meta.get(META_WRITER),
        )

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)
        out: builtins.list[ObjectInfo] = []
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Prefix": self.prefix + prefix}
            if token:
                kw["ContinuationToken"] = token
            r = self._call("list", prefix, self.client.list_objects_v2, **kw)
            for o in r.get("Contents", []):
                key = str(o["Key"])[len(self.prefix) :]
                out.append(
                    ObjectInfo(key, int(o["Size"]), str(o["ETag"]), _epoch(o["LastModified"]))
                )
            if not r.get("IsTruncated"):
                return sorted(out, key=lambda i: i.key)
            token = r.get("NextContinuationToken")

    def get(
        self, key: str, start: int = 0, end: int | None = None, etag: str | None = None
    ) -> BinaryIO:
        if end is not None and end <= start:
            return io.BytesIO(b"")
        kw: dict[str, Any] = {"Key": self._key(key)}
        if start or end is not None:
            kw["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if etag is not None:
            kw["IfMatch"] = etag
        try:
            r = self._call("get", key, self.client.get_object, **kw)
        except ObjectExists as e:  # 412 on If-Match: another version replaced it
            raise ObjectCorrupt(
                f"{self.describe(key)} changed while it was read; read it again"
            ) from e
        return io.BufferedReader(  # type: ignore[return-value]
            _Body(self, key, r["Body"], int(r["ContentLength"])), 1 << 20
        )

    @staticmethod
    def _meta(meta: Meta) -> dict[str, str]:
        out = {}
        if meta.sha256:
            out[META_SHA256] = meta.sha256
        if meta.writer:
            out[META_WRITER] = meta.writer
        return out

    def put(
        self, key: str, data: bytes, *, checksum: str, meta: Meta, if_absent: bool = False
    ) -> str:
        kw: dict[str, Any] = {
            "Key": self._key(key),
            "Body": data,
            "ChecksumSHA256": _b64(checksum),
            "Metadata": self._meta(meta),
        }
        if meta.storage_class:
            kw["StorageClass"] = meta.storage_class
        if if_absent:
            kw["IfNoneMatch"] = "*"
        return str(self._call("put", key, self.client.put_object, **kw)["ETag"])

    def delete(self, key: str) -> None:
        try:
            self._call("delete", key, self.client.delete_object, Key=self._key(key))
        except ObjectNotFound:
            pass

    def start_upload(self, key: str, *, meta: Meta) -> str:
        kw: dict[str, Any] = {
            "Key": self._key(key),
            "ChecksumAlgorithm": "SHA256",
            "Metadata": self._meta(meta),
        }
        if meta.storage_class:
            kw["StorageClass"] = meta.storage_class
        return str(
            self._call("start upload", key, self.client.create_multipart_upload, **kw)["UploadId"]
        )

    def put_part(
        self, key: str, upload_id: str, number: int, data: bytes, *, checksum: str
    ) -> Part:
        r = self._call(
            f"part {number}",
            key,
            self.client.upload_part,
            Key=self._key(key),
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            ChecksumSHA256=_b64(checksum),
        )
        return Part(number, str(r["ETag"]), checksum, len(data))

    def complete_upload(
        self, key: str, upload_id: str, parts: builtins.list[Part], *, if_absent: bool = False
    ) -> str:
        kw: dict[str, Any] = {
            "Key": self._key(key),
            "UploadId": upload_id,
            "MultipartUpload": {
                "Parts": [
                    {"PartNumber": p.number, "ETag": p.etag, "ChecksumSHA256": _b64(p.sha256)}
                    for p in parts
                ]
            },
        }
        if if_absent:
            kw["IfNoneMatch"] = "*"
        return str(self._call("complete", key, self.client.complete_multipart_upload, **kw)["ETag"])

    def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self._call(
                "abort",
                key,
                self.client.abort_multipart_upload,
                Key=self._key(key),
                UploadId=upload_id,
            )
        except ObjectNotFound:
            pass

    def uploads(self, prefix: str = "") -> builtins.list[Upload]:
        check_prefix(prefix)
        out: builtins.list[Upload] = []
        kw: dict[str, Any] = {"Prefix": self.prefix + prefix}
        while True:
            r = self._call("list uploads", prefix, self.client.list_multipart_uploads, **kw)
            for u in r.get("Uploads", []):
                key = str(u["Key"])[len(self.prefix) :]
                out.append(Upload(key, str(u["UploadId"]), _epoch(u.get("Initiated"))))
            if not r.get("IsTruncated"):
                return sorted(out, key=lambda u: (u.key, u.initiated))
            kw["KeyMarker"] = r.get("NextKeyMarker")
            kw["UploadIdMarker"] = r.get("NextUploadIdMarker")
