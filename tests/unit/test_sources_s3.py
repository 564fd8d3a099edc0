"""S3-compatible sources against a real S3 HTTP API on localhost (moto_server, dev extra)."""

from __future__ import annotations

import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.archive import ArchiveLimits, tree_digest
from adapters.sources import SourceResolver, SourceSettings
from server.errors import LoraplexError
from tests.adapter_factory import files_of, make_adapter, same_files
from tests.servers import moto_s3

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    return make_adapter(tmp_path / "src" / "adapter", base_digest="sha256:" + "1" * 64)


@pytest.fixture
def archive(tmp_path: Path, adapter: Path) -> bytes:
    path = tmp_path / "adapter.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        tf.add(adapter, arcname="my-adapter")
    return path.read_bytes()


async def code_of(coro: Any) -> str:
    with pytest.raises(LoraplexError) as info:
        await coro
    return info.value.error_code


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint: str, tmp_path: Path) -> tuple[SourceSettings, Any]:
    import boto3

    creds = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **creds)
    bucket = f"b{time.monotonic_ns()}"
    client.create_bucket(Bucket=bucket)
    settings = SourceSettings(
        cache_dir=tmp_path / "cache",
        s3_endpoint_url=s3_endpoint,
        s3_region="us-east-1",
        s3_access_key_id="test",
        s3_secret_access_key="test",
    )
    return settings, (client, bucket)


async def test_s3_archive_and_folder(
    s3: tuple[SourceSettings, Any], adapter: Path, archive: bytes
) -> None:
    settings, (client, bucket) = s3
    client.put_object(Bucket=bucket, Key="v1/adapter.tgz", Body=archive)
    for name, data in files_of(adapter).items():
        client.put_object(Bucket=bucket, Key=f"v2/{name}", Body=data)
    client.put_object(Bucket=bucket, Key="v2/", Body=b"")  # a "directory marker"
    resolver = SourceResolver(settings)
    seen: list[tuple[int, int | None]] = []
    got = await resolver.materialize(
        f"s3://{bucket}/v1/adapter.tgz", lambda d, t: seen.append((d, t))
    )
    assert same_files(got.path, adapter)
    assert seen[-1] == (len(archive), len(archive))
    folder = await resolver.materialize(f"s3://{bucket}/v2/")
    assert same_files(folder.path, adapter)
    assert folder.key == tree_digest(adapter)


async def test_s3_failures(s3: tuple[SourceSettings, Any], archive: bytes) -> None:
    settings, (client, bucket) = s3
    resolver = SourceResolver(settings)
    assert await code_of(resolver.materialize(f"s3://{bucket}/missing.tgz")) == "source_not_found"
    assert await code_of(resolver.materialize(f"s3://{bucket}/empty/")) == "source_not_found"
    assert await code_of(resolver.materialize("s3://no-such-bucket-x/a.tgz")) == "source_not_found"
    client.put_object(Bucket=bucket, Key="evil/../../x", Body=b"x")
    assert await code_of(resolver.materialize(f"s3://{bucket}/evil/")) == "archive_unsafe"
    client.put_object(Bucket=bucket, Key="big.tgz", Body=archive)
    tight = SourceSettings(**{**_fields(settings), "limits": ArchiveLimits(max_archive_bytes=100)})
    assert await code_of(SourceResolver(tight).materialize(f"s3://{bucket}/big.tgz")) == (
        "archive_too_large"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    offline = SourceResolver(SourceSettings(**{**_fields(settings), "s3_endpoint_url": dead}))
    assert await code_of(offline.materialize(f"s3://{bucket}/big.tgz")) == "source_unreachable"


def test_s3_error_translation() -> None:
    from botocore.exceptions import ClientError, NoCredentialsError

    from adapters.s3source import _translate

    def client_error(code: str, status: int) -> ClientError:
        body = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(body, "GetObject")

    cases: list[tuple[Exception, str]] = [
        (client_error("AccessDenied", 403), "source_denied"),
        (client_error("InvalidAccessKeyId", 403), "source_denied"),
        (client_error("NoSuchKey", 404), "source_not_found"),
        (client_error("SlowDown", 503), "source_unreachable"),
        (NoCredentialsError(), "source_denied"),
    ]
    for exc, code in cases:
        assert _translate(exc, "s3://b/k").error_code == code


def _fields(settings: SourceSettings) -> dict[str, Any]:
    return {f: getattr(settings, f) for f in settings.__dataclass_fields__}


def test_gateway_import_does_not_pull_boto3() -> None:
    probe = "import sys, adapters.sources, adapters.validate; print('boto3' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
