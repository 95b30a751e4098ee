"""Object storage in the cloud: the S3 adapter (``s3.S3ObjectStore``, the only module that
imports boto3) and the ``s3://bucket/prefix/`` URLs that name a repository or a backup in it.

``open_store(url)`` is what a command calls for a repository URL, ``open_ref(url)`` for the URL
of one backup: both give the ``BackupStore`` seam (``storage.ObjectBackupStore``) over S3 with
every request retried (``storage.retry.RetryingObjectStore``). A URL that is not one is a
``UsageError`` naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from engram.errors import UsageError
from engram.storage.base import Ref
from engram.storage.objectbackup import ObjectBackupStore
from engram.storage.objects import check_key, check_prefix
from engram.storage.retry import Backoff, RetryingObjectStore

SCHEME = "s3://"
# S3's bucket naming rules (3-63 characters: lowercase letters, digits, dots and hyphens,
# starting and ending with a letter or digit).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def is_s3_url(text: str) -> bool:
    return str(text).startswith(SCHEME)


@dataclass(frozen=True)
class S3Url:
    bucket: str
    path: str  # what follows the bucket, without the leading "/" (may be "")

    @property
    def prefix(self) -> str:
        """The path as a repository prefix: "" or ending in "/"."""
        return self.path if not self.path or self.path.endswith("/") else self.path + "/"


def parse_s3_url(url: str) -> S3Url:
    """``s3://bucket/path`` split; UsageError naming the URL when it is not one."""

    def bad(why: str) -> UsageError:
        return UsageError(f"{url!r} is not an S3 URL ({why}); write s3://BUCKET/PREFIX/")

    if not is_s3_url(url):
        raise bad("it must start with s3://")
    parts = urlsplit(url)
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise bad("it holds a query or fragment")
    if "@" in parts.netloc or ":" in parts.netloc:
        raise bad("credentials and endpoints go in the AWS configuration or --endpoint-url")
    bucket = parts.netloc
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise bad(f"{bucket!r} is not a bucket name: 3-63 of a-z 0-9 . -")
    path = parts.path.removeprefix("/")
    try:
        if path:
            check_prefix(path if path.endswith("/") else path + "/")
    except ValueError:
        raise bad("its path has an empty, '.' or '..' part") from None
    return S3Url(bucket, path)


def _objects(
    bucket: str,
    prefix: str,
    *,
    endpoint_url: str | None,
    region: str | None,
    profile: str | None,
    path_style: bool | None,
    backoff: Backoff | None,
) -> RetryingObjectStore:
    from engram.cloud.s3 import S3ObjectStore  # boto3 is imported only when S3 is used

    s3 = S3ObjectStore(
        bucket,
        prefix,
        endpoint_url=endpoint_url,
        region=region,
        profile=profile,
        path_style=path_style,
    )
    return RetryingObjectStore(s3, backoff)


def open_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    path_style: bool | None = None,
    storage_class: str | None = None,
    backoff: Backoff | None = None,
) -> ObjectBackupStore:
    """The repository at ``url`` (``s3://bucket/prefix/``; the prefix may be empty)."""
    u = parse_s3_url(url)
    objects = _objects(
        u.bucket,
        u.prefix,
        endpoint_url=endpoint_url,
        region=region,
        profile=profile,
        path_style=path_style,
        backoff=backoff,
    )
    return ObjectBackupStore(objects, storage_class=storage_class)


def open_ref(
    url: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    path_style: bool | None = None,
    storage_class: str | None = None,
    backoff: Backoff | None = None,
) -> Ref:
    """The backup object at ``url`` (``s3://bucket/prefix/NAME``) in the store of its prefix."""
    u = parse_s3_url(url)
    if not u.path or u.path.endswith("/"):
        raise UsageError(f"{url!r} names no object; write s3://BUCKET/PREFIX/NAME")
    prefix, _, name = u.path.rpartition("/")
    check_key(name)
    store = open_store(
        f"{SCHEME}{u.bucket}/{prefix}",
        endpoint_url=endpoint_url,
        region=region,
        profile=profile,
        path_style=path_style,
        storage_class=storage_class,
        backoff=backoff,
    )
    return Ref(store, name)
