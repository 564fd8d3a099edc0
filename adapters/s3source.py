"""S3-compatible object stores (AWS S3, MinIO, Ceph RGW, moto): an archive object or a prefix.

`s3://bucket/key` is one archive object; `s3://bucket/prefix/` (trailing slash) is a folder whose
objects become the adapter's files. boto3 is imported only when an s3:// source is fetched, so
the gateway's import stays light (tests/unit/test_import_weight.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapters.archive import safe_relpath
from adapters.errors import (
    ArchiveInvalid,
    ArchiveTooLarge,
    SourceDenied,
    SourceError,
    SourceNotFound,
    SourceUnreachable,
)
from adapters.sources import FetchContext, Fetched, SourceSettings, archive_too_large, stream_to

_CHUNK = 1 << 20
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "401",
    "403",
}


@dataclass(frozen=True, slots=True)
class S3Source:
    bucket: str
    key: str  # "" or ending in "/" for a folder
    settings: SourceSettings

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def is_folder(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def fetch(self, ctx: FetchContext) -> Fetched:
        try:
            client = self._client()
            if self.is_folder:
                return self._fetch_folder(client, ctx)
            return self._fetch_object(client, ctx)
        except SourceError:
            raise
        except Exception as exc:  # botocore's exception tree, imported lazily
            raise _translate(exc, self.uri) from None

    def _client(self) -> Any:
        import boto3
        from botocore.config import Config

        s = self.settings
        config = Config(
            connect_timeout=s.http_timeout_s,
            read_timeout=s.http_timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
            # MinIO, Ceph and moto serve buckets by path; AWS itself chooses virtual hosts.
            s3={"addressing_style": "path" if s.s3_endpoint_url else "auto"},
        )
        session = boto3.session.Session()  # per fetch: the default session is not thread-safe
        return session.client(
            "s3",
            endpoint_url=s.s3_endpoint_url,
            region_name=s.s3_region,
            aws_access_key_id=s.s3_access_key_id,
            aws_secret_access_key=s.s3_secret_access_key,
            config=config,
        )

    def _fetch_object(self, client: Any, ctx: FetchContext) -> Fetched:
        dest = ctx.work / "archive"
        resp = client.get_object(Bucket=self.bucket, Key=self.key)
        body = resp["Body"]
        try:
            total = int(resp.get("ContentLength", 0)) or None
            if total is not None and total > ctx.limits.max_archive_bytes:
                raise archive_too_large(total, ctx.limits)
            done = stream_to(dest, iter(lambda: body.read(_CHUNK), b""), total, ctx)
        finally:
            body.close()
        return Fetched(dest, is_archive=True, fetched_bytes=done)

    def _fetch_folder(self, client: Any, ctx: FetchContext) -> Fetched:
        objects: list[tuple[str, int]] = []
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.key):
            for obj in page.get("Contents", []):
                key, size = obj["Key"], int(obj["Size"])
                if key.endswith("/"):
                    continue  # "directory marker" objects some tools create
                objects.append((key, size))
                if len(objects) > ctx.limits.max_members:
                    raise ArchiveTooLarge(f"{self.uri} holds more than {ctx.limits.max_members}")
        if not objects:
            raise SourceNotFound(f"{self.uri}: no objects under this prefix")
        total = sum(size for _, size in objects)
        if total > ctx.limits.max_extracted_bytes:
            raise ArchiveTooLarge(
                f"{self.uri} holds {total} bytes, over the limit of "
                f"{ctx.limits.max_extracted_bytes}"
            )
        tree = ctx.tree()
        tree.dest.mkdir()
        done = 0
        for key, size in sorted(objects):
            rel = safe_relpath(key[len(self.key) :])
            if rel is None:
                raise ArchiveInvalid(f"{self.uri}: object {key!r} has an empty name")
            tree.count_member()
            body = client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                tree.write(rel, body, size)
            finally:
                body.close()
            done += size
            ctx.report(done, total)
        return Fetched(tree.dest, is_archive=False, fetched_bytes=tree.written)


def _translate(exc: Exception, uri: str) -> SourceError:
    """botocore failures to our codes; messages carry the store's error code, never secrets."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return SourceDenied(f"{uri}: no S3 credentials configured")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _NOT_FOUND or status == "404":
            return SourceNotFound(f"{uri}: {code or 'not found'}")
        if code in _DENIED or status in ("401", "403"):
            return SourceDenied(f"{uri}: {code or 'access denied'}")
        return SourceUnreachable(f"{uri}: store answered {code or status}")
    return SourceUnreachable(f"{uri}: {type(exc).__name__}: {exc}")
