"""Adapter sources against real servers on localhost: http.server for HTTP, moto_server for S3."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from adapters.archive import ArchiveLimits, adapter_root, tree_digest
from adapters.sources import (
    LocalSource,
    SourceResolver,
    SourceSettings,
    parse_source,
    redact_url,
)
from server.errors import LoraplexError
from tests.adapter_factory import files_of, make_adapter, same_files, zip_of

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


@pytest.fixture
def settings(tmp_path: Path) -> SourceSettings:
    return SourceSettings(cache_dir=tmp_path / "cache", http_timeout_s=2.0)


async def code_of(coro: Any) -> str:
    with pytest.raises(LoraplexError) as info:
        await coro
    return info.value.error_code


# ---- URIs ------------------------------------------------------------------------------------


def test_parse_source_forms(settings: SourceSettings) -> None:
    assert isinstance(parse_source("/abs/dir", settings), LocalSource)
    assert parse_source("file:///abs/my%20dir", settings).uri == "/abs/my dir"
    assert parse_source("file://localhost/abs", settings).uri == "/abs"
    assert parse_source("https://u:p@h:8443/a.tgz?X-Sig=s", settings).uri == "https://h:8443/a.tgz"
    assert parse_source("s3://bucket/pre/fix/", settings).uri == "s3://bucket/pre/fix/"
    for bad in (
        "relative/dir",
        "ftp://h/a",
        "file://host/x",
        "s3:///k",
        "http:///x",
        "http://h:x/",
    ):
        with pytest.raises(LoraplexError) as info:
            parse_source(bad, settings)
        assert (info.value.status, info.value.error_code) == (400, "source_invalid"), bad


def test_redact_url_drops_secrets() -> None:
    assert redact_url("http://user:pw@example.test/x.zip?token=t#f") == "http://example.test/x.zip"


# ---- local paths -----------------------------------------------------------------------------


async def test_local_dir_is_copied_into_the_content_addressed_cache(
    settings: SourceSettings, adapter: Path
) -> None:
    seen: list[tuple[int, int | None]] = []
    resolver = SourceResolver(settings)
    first = await resolver.materialize(str(adapter), lambda d, t: seen.append((d, t)))
    assert first.key == tree_digest(adapter)
    assert first.path == settings.cache_dir / first.key
    assert same_files(first.path, adapter)
    assert not first.cached
    total = sum(len(data) for data in files_of(adapter).values())
    assert seen[-1] == (total, total)
    assert first.fetched_bytes == total
    again = await resolver.materialize(f"file://{adapter}")
    assert (again.path, again.cached) == (first.path, True)
    (adapter / "adapter_config.json").write_text("{}")  # the source changes; the entry does not
    changed = await resolver.materialize(str(adapter))
    assert changed.key != first.key
    assert same_files(first.path, first.path)
    assert not list((settings.cache_dir / ".tmp").iterdir())


async def test_local_archive_file_and_wrapping_folder(
    settings: SourceSettings, tmp_path: Path, adapter: Path, archive: bytes
) -> None:
    path = tmp_path / "upload.bin"  # format comes from the bytes
    path.write_bytes(archive)
    got = await SourceResolver(settings).materialize(str(path))
    assert got.path.name == "my-adapter"
    assert same_files(got.path, adapter)
    assert got.path.parent.name == got.key


def test_adapter_root_ignores_archiver_litter(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    (entry / "inner").mkdir(parents=True)
    (entry / "inner" / "adapter_config.json").write_text("{}")
    (entry / "__MACOSX").mkdir()
    (entry / ".DS_Store").write_bytes(b"")
    assert adapter_root(entry) == entry / "inner"
    (entry / "second").mkdir()
    assert adapter_root(entry) == entry  # ambiguous: validation reports the missing config


async def test_local_errors(settings: SourceSettings, tmp_path: Path, adapter: Path) -> None:
    resolver = SourceResolver(settings)
    assert await code_of(resolver.materialize(str(tmp_path / "nope"))) == "source_not_found"
    (tmp_path / "empty").mkdir()
    assert await code_of(resolver.materialize(str(tmp_path / "empty"))) == "source_not_found"
    fenced = SourceResolver(SourceSettings(settings.cache_dir, local_roots=(tmp_path / "allowed",)))
    assert await code_of(fenced.materialize(str(adapter))) == "source_denied"
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "link").symlink_to(adapter)  # a link out of the roots
    assert await code_of(fenced.materialize(str(tmp_path / "allowed" / "link"))) == "source_denied"
    if os.geteuid() != 0:  # root reads everything
        (adapter / "adapter_config.json").chmod(0)
        assert await code_of(resolver.materialize(str(adapter))) == "source_denied"
        (adapter / "adapter_config.json").chmod(0o644)
    small = SourceSettings(settings.cache_dir, limits=ArchiveLimits(max_extracted_bytes=100))
    assert await code_of(SourceResolver(small).materialize(str(adapter))) == "archive_too_large"


def test_sweep_removes_stale_work_dirs(settings: SourceSettings) -> None:
    stale = settings.cache_dir / ".tmp" / "dead"
    fresh = settings.cache_dir / ".tmp" / "live"
    stale.mkdir(parents=True)
    fresh.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert SourceResolver(settings).sweep(max_age_s=3600) == 1
    assert fresh.exists()
    assert not stale.exists()


# ---- HTTP ------------------------------------------------------------------------------------


class Site:
    """Routes for a real threaded HTTP server: path -> (status, body, headers, delay_s)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes, dict[str, str], float]] = {}
        self.hits: dict[str, int] = {}
        self.base = ""

    def add(self, path: str, body: bytes = b"", status: int = 200, delay: float = 0.0,
            **headers: str) -> str:  # fmt: skip
        self.routes[path] = (status, body, headers, delay)
        return self.base + path


@pytest.fixture
def site() -> Iterator[Site]:
    s = Site()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            s.hits[path] = s.hits.get(path, 0) + 1
            status, body, headers, delay = s.routes.get(path, (404, b"", {}, 0.0))
            time.sleep(delay)
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k.replace("_", "-"), v)
                if "no_length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                drip = float(headers.get("drip", "0"))
                for i in range(0, len(body), 1 << 16):
                    self.wfile.write(body[i : i + (1 << 16)])
                    time.sleep(drip)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up on purpose

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    s.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield s
    server.shutdown()
    server.server_close()
    thread.join()


async def test_http_archive_streams_into_the_cache(
    settings: SourceSettings, site: Site, adapter: Path, archive: bytes
) -> None:
    url = site.add("/a.tgz", archive)
    site.add("/moved", status=302, Location=url)
    seen: list[tuple[int, int | None]] = []
    got = await SourceResolver(settings).materialize(
        site.base + "/moved?sig=secret", lambda d, t: seen.append((d, t))
    )
    assert same_files(got.path, adapter)
    assert seen[-1] == (len(archive), len(archive))
    assert got.uri == site.base + "/moved"
    assert got.fetched_bytes == len(archive)
    assert got.key == hashlib.sha256(archive).hexdigest()


async def test_http_single_flight(settings: SourceSettings, site: Site, archive: bytes) -> None:
    url = site.add("/slow.tgz", archive, delay=0.3)
    resolver = SourceResolver(settings)
    results = await asyncio.gather(*(resolver.materialize(url) for _ in range(5)))
    assert site.hits["/slow.tgz"] == 1
    assert len({r.path for r in results}) == 1
    loser = asyncio.create_task(resolver.materialize(url))
    winner = asyncio.create_task(resolver.materialize(url))
    await asyncio.sleep(0.05)
    loser.cancel()  # one caller leaving must not cancel the fetch the other waits for
    assert (await winner).cached
    assert site.hits["/slow.tgz"] == 2
    with pytest.raises(asyncio.CancelledError):
        await loser


@pytest.mark.parametrize(
    ("status", "code"),
    [(404, "source_not_found"), (410, "source_not_found"), (403, "source_denied"),
     (401, "source_denied"), (500, "source_unreachable"), (503, "source_unreachable")],
)  # fmt: skip
async def test_http_status_codes(
    settings: SourceSettings, site: Site, status: int, code: str
) -> None:
    url = site.add("/x.tgz", b"nope", status=status)
    assert await code_of(SourceResolver(settings).materialize(url)) == code


async def test_http_limits_and_failures(
    settings: SourceSettings, site: Site, archive: bytes
) -> None:
    tight = SourceSettings(
        settings.cache_dir, limits=ArchiveLimits(max_archive_bytes=100), http_timeout_s=0.3
    )
    resolver = SourceResolver(tight)
    big = site.add("/big.tgz", archive)
    assert await code_of(resolver.materialize(big)) == "archive_too_large"
    unsized = site.add("/unsized.tgz", archive, no_length="1")
    assert await code_of(resolver.materialize(unsized)) == "archive_too_large"
    assert await code_of(resolver.materialize(site.add("/junk", b"<html>"))) == "archive_invalid"
    slow = site.add("/slow", archive, delay=1.0)
    assert await code_of(resolver.materialize(slow)) == "source_unreachable"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/a.tgz"
    assert await code_of(resolver.materialize(closed)) == "source_unreachable"
    impatient = SourceSettings(settings.cache_dir, max_fetch_s=0.2)
    dripping = site.add("/drip.tgz", archive + bytes(1 << 20), drip="0.05")
    with pytest.raises(LoraplexError) as info:
        await SourceResolver(impatient).materialize(dripping)
    assert info.value.error_code == "source_unreachable"
    assert "max_fetch_s" in info.value.message
    assert not list((tight.cache_dir / ".tmp").iterdir())


async def test_aclose_stops_a_download_in_flight(
    settings: SourceSettings, site: Site, archive: bytes
) -> None:
    body = archive + bytes(4 << 20)
    url = site.add("/drip.tgz", body, drip="0.05")
    resolver = SourceResolver(settings)
    started = asyncio.Event()
    task = asyncio.create_task(resolver.materialize(url, lambda d, t: started.set()))
    await asyncio.wait_for(started.wait(), 5)
    await resolver.aclose()
    with pytest.raises(LoraplexError) as info:
        await task
    assert info.value.error_code == "source_unreachable"
    assert "cancelled" in info.value.message


# ---- zip over HTTP, then straight into validation --------------------------------------------


async def test_zip_over_http_validates(
    settings: SourceSettings, site: Site, adapter: Path, tmp_path: Path
) -> None:
    from adapters.validate import ValidationLimits, inspect_adapter

    got = await SourceResolver(settings).materialize(site.add("/a.zip", zip_of(adapter)))
    facts = await asyncio.to_thread(inspect_adapter, got.path, ValidationLimits())
    assert facts.declared_base_digest == "sha256:" + "1" * 64
    assert json.loads((got.path / "adapter_config.json").read_text())["r"] == 4
