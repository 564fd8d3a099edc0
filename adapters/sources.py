"""Where adapter files come from: a local path, an HTTP(S) archive, an S3-compatible store.

Every source is materialised into a content-addressed local cache (`SourceResolver`): the bytes
land in a private temporary directory, archives are extracted safely (`adapters.archive`), and
the result is renamed atomically to `<cache_dir>/<sha256>/`, so a reader never sees a partial
entry and a registered version keeps pointing at immutable files. Fetching, hashing and
extraction run in a worker thread (sync httpx / boto3, both imported on first use): the
event loop only waits.
URI forms and error codes are documented in docs/adapters.md.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from adapters.archive import (
    ArchiveLimits,
    TreeWriter,
    adapter_root,
    copy_tree,
    extract_archive,
    sha256_file,
    tree_digest,
)
from adapters.errors import (
    ArchiveTooLarge,
    SourceDenied,
    SourceInvalid,
    SourceNotFound,
    SourceUnreachable,
)

Progress = Callable[[int, int | None], None]
"""Called on the event loop as (bytes done, total bytes or None when unknown)."""

_CHUNK = 1 << 20
_TMP = ".tmp"


@dataclass(frozen=True, slots=True)
class SourceSettings:
    cache_dir: Path
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)
    http_timeout_s: float = 30.0  # connect / between bytes
    max_fetch_s: float = 1800.0  # a whole materialisation, however slowly the bytes drip
    # When non-empty, local paths (and the files their symlinks reach) must lie under one of these.
    local_roots: tuple[Path, ...] = ()
    # S3-compatible store; None falls back to boto3's own chain (AWS_* env vars, profiles, roles).
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = field(default=None, repr=False)


@dataclass(slots=True)
class FetchContext:
    """What a source gets in its worker thread: a private work dir, caps, progress, and
    `check_stop`, to call between chunks (gateway shutdown, overall deadline)."""

    work: Path
    settings: SourceSettings
    stop: threading.Event
    report: Callable[[int, int | None], None]
    deadline: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.settings.max_fetch_s

    @property
    def limits(self) -> ArchiveLimits:
        return self.settings.limits

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise SourceUnreachable("fetch cancelled (gateway shutting down)")
        if time.monotonic() > self.deadline:
            raise SourceUnreachable(
                f"fetch took longer than {self.settings.max_fetch_s:.0f} s (max_fetch_s)"
            )

    def tree(self) -> TreeWriter:
        """A writer for sources that produce a directory of files (local dir, S3 prefix)."""
        return TreeWriter(self.work / "tree", self.limits, self.check_stop)


@dataclass(frozen=True, slots=True)
class Fetched:
    path: Path  # an archive file, or a directory of files, inside the work dir
    is_archive: bool
    fetched_bytes: int


class AdapterSource(Protocol):
    """One adapter location. `fetch` runs in a worker thread and may block."""

    @property
    def uri(self) -> str:
        """The location without credentials or query string (safe to log and store)."""
        ...

    def fetch(self, ctx: FetchContext) -> Fetched: ...


@dataclass(frozen=True, slots=True)
class LocalSource:
    """An absolute path (or file:// URI) to an adapter directory or an archive file."""

    path: Path
    roots: tuple[Path, ...] = ()

    @property
    def uri(self) -> str:
        return str(self.path)

    def fetch(self, ctx: FetchContext) -> Fetched:
        try:
            return self._fetch(ctx)
        except PermissionError as exc:
            raise SourceDenied(f"{self.path}: the gateway may not read {exc.filename}") from None

    def _fetch(self, ctx: FetchContext) -> Fetched:
        roots = tuple(r.resolve() for r in self.roots)
        real = self.path.resolve()
        if roots and not any(real.is_relative_to(r) for r in roots):
            raise SourceDenied(f"{self.path} is outside the allowed local source roots")
        if real.is_dir():
            dest = ctx.work / "tree"
            total = _tree_size(real)
            done = 0

            def on_bytes(n: int) -> None:
                nonlocal done
                done += n
                ctx.report(done, total)

            written = copy_tree(
                real, dest, ctx.limits, within=roots, on_bytes=on_bytes, check=ctx.check_stop
            )
            if not any(dest.iterdir()):
                raise SourceNotFound(f"{self.path} holds no files")
            return Fetched(dest, is_archive=False, fetched_bytes=written)
        if real.is_file():
            dest = ctx.work / "archive"
            size = real.stat().st_size
            if size > ctx.limits.max_archive_bytes:
                raise archive_too_large(size, ctx.limits)
            with real.open("rb") as src:
                stream_to(dest, iter(lambda: src.read(_CHUNK), b""), size, ctx)
            return Fetched(dest, is_archive=True, fetched_bytes=size)
        raise SourceNotFound(f"{self.path} does not exist (or is not a file or directory)")


@dataclass(frozen=True, slots=True)
class HttpSource:
    """An archive at an http(s) URL, streamed with httpx (redirects followed, at most 5)."""

    url: str

    @property
    def uri(self) -> str:
        return redact_url(self.url)

    def fetch(self, ctx: FetchContext) -> Fetched:
        import httpx  # ~0.2 s of import: only when an HTTP source is fetched

        dest = ctx.work / "archive"
        shown = self.uri
        timeout = httpx.Timeout(ctx.settings.http_timeout_s)
        try:
            with (
                httpx.Client(timeout=timeout, follow_redirects=True, max_redirects=5) as client,
                client.stream("GET", self.url, headers={"Accept-Encoding": "identity"}) as r,
            ):
                _check_http_status(r.status_code, shown)
                total = _content_length(r.headers.get("content-length"))
                if total is not None and total > ctx.limits.max_archive_bytes:
                    raise archive_too_large(total, ctx.limits)
                done = stream_to(dest, r.iter_raw(_CHUNK), total, ctx)
        except httpx.TimeoutException:
            raise SourceUnreachable(f"{shown}: timed out") from None
        except httpx.HTTPError as exc:
            raise SourceUnreachable(f"{shown}: {type(exc).__name__}: {exc}") from None
        except httpx.InvalidURL as exc:  # e.g. a redirect to something unparseable
            raise SourceInvalid(f"{shown}: {exc}") from None
        return Fetched(dest, is_archive=True, fetched_bytes=done)


def _check_http_status(status: int, shown: str) -> None:
    if status == 200:
        return
    if status in (404, 410):
        raise SourceNotFound(f"{shown}: HTTP {status}")
    if status in (401, 403):
        raise SourceDenied(f"{shown}: HTTP {status}")
    raise SourceUnreachable(f"{shown}: HTTP {status}")


def _content_length(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def stream_to(dest: Path, chunks: Iterable[bytes], total: int | None, ctx: FetchContext) -> int:
    """Write chunks to `dest`, enforcing the archive cap as bytes arrive; returns bytes written."""
    done = 0
    with dest.open("wb") as out:
        for chunk in chunks:
            done += len(chunk)
            if done > ctx.limits.max_archive_bytes:
                raise archive_too_large(done, ctx.limits)
            ctx.check_stop()
            out.write(chunk)
            ctx.report(done, total)
    return done


def archive_too_large(size: int, limits: ArchiveLimits) -> ArchiveTooLarge:
    return ArchiveTooLarge(
        f"archive is {size} bytes or more, over the limit of {limits.max_archive_bytes}"
    )


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def redact_url(url: str) -> str:
    """scheme://host[:port]/path: no userinfo, no query (presigned URLs carry secrets there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def parse_source(uri: str, settings: SourceSettings) -> AdapterSource:
    """The source for a URI; raises `SourceInvalid` without touching the network or disk."""
    uri = uri.strip()
    if uri.startswith("/"):
        return LocalSource(Path(uri), settings.local_roots)
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise SourceInvalid(f"malformed source URI: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise SourceInvalid("file:// URIs must name an absolute local path")
        return LocalSource(Path(unquote(parts.path)), settings.local_roots)
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise SourceInvalid("http(s) source URI has no host")
        return HttpSource(uri)
    if scheme == "s3":
        from adapters.s3source import S3Source

        if not parts.netloc:
            raise SourceInvalid("s3 URIs look like s3://bucket/key.tar.gz or s3://bucket/prefix/")
        return S3Source(parts.netloc, unquote(parts.path.lstrip("/")), settings)
    raise SourceInvalid(
        "source must be an absolute path, file://, http(s)://, or s3:// URI"
        + (f" (got scheme {scheme!r})" if scheme else " (relative paths are ambiguous)")
    )


SourceFactory = Callable[[str, SourceSettings], AdapterSource]


@dataclass(frozen=True, slots=True)
class Materialized:
    path: Path  # the adapter directory inside the cache entry
    key: str  # the entry's name: sha256 hex of the archive bytes, or of the directory's files
    uri: str  # the source, redacted
    cached: bool  # an identical entry existed already (nothing new written)
    fetched_bytes: int


@dataclass(slots=True)
class _Flight:
    task: asyncio.Task[Materialized] | None = None
    listeners: list[Progress] = field(default_factory=list)

    def publish(self, done: int, total: int | None) -> None:
        for listener in list(self.listeners):
            listener(done, total)


class SourceResolver:
    """Materialises sources into the cache; concurrent calls for one URI share one fetch."""

    def __init__(self, settings: SourceSettings, factory: SourceFactory = parse_source) -> None:
        self.settings = settings
        self._factory = factory
        self._inflight: dict[str, _Flight] = {}
        self._stop = threading.Event()

    async def materialize(self, uri: str, progress: Progress | None = None) -> Materialized:
        source = self._factory(uri, self.settings)
        key = uri.strip()  # not the redacted form: a query string may select other content
        flight = self._inflight.get(key)
        if flight is None:
            flight = self._start(key, source)
        if progress is not None:
            flight.listeners.append(progress)
        assert flight.task is not None
        try:
            # shield: one caller giving up must not cancel the fetch the others wait for
            return await asyncio.shield(flight.task)
        finally:
            if progress is not None:
                flight.listeners.remove(progress)

    def _start(self, key: str, source: AdapterSource) -> _Flight:
        loop = asyncio.get_running_loop()
        flight = _Flight()

        def report(done: int, total: int | None) -> None:
            loop.call_soon_threadsafe(flight.publish, done, total)

        task = loop.create_task(asyncio.to_thread(self.materialize_sync, source, report))
        flight.task = task
        self._inflight[key] = flight

        def done(t: asyncio.Task[Materialized]) -> None:
            if self._inflight.get(key) is flight:
                del self._inflight[key]
            if not t.cancelled():
                t.exception()  # retrieved: no "never retrieved" noise if every waiter left

        task.add_done_callback(done)
        return flight

    def materialize_sync(
        self, source: AdapterSource, report: Callable[[int, int | None], None] | None = None
    ) -> Materialized:
        """The blocking work (also usable from CLI tools): fetch, hash, extract, rename."""
        cache = self.settings.cache_dir
        work = cache / _TMP / uuid.uuid4().hex
        work.mkdir(parents=True)
        try:
            ctx = FetchContext(work, self.settings, self._stop, report or (lambda d, t: None))
            fetched = source.fetch(ctx)
            if fetched.is_archive:
                key = sha256_file(fetched.path)
                tree = work / "extracted"
                if not (cache / key).is_dir():
                    tree.mkdir()
                    extract_archive(fetched.path, tree, self.settings.limits, ctx.check_stop)
            else:
                tree = fetched.path
                key = tree_digest(tree)
            entry = cache / key
            cached = entry.is_dir()
            if not cached:
                tree.chmod(0o755)  # the engine may run as another user
                try:
                    tree.rename(entry)
                except OSError:
                    if not entry.is_dir():
                        raise
                    cached = True  # another process renamed the same content first
            return Materialized(adapter_root(entry), key, source.uri, cached, fetched.fetched_bytes)
        finally:
            _remove(work)

    async def aclose(self) -> None:
        """Stop fetches in flight (they fail with `source_unreachable`) and wait for them."""
        self._stop.set()
        tasks = [f.task for f in self._inflight.values() if f.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def sweep(self, max_age_s: float = 3600.0) -> int:
        """Remove work directories left by killed processes; returns how many were removed."""
        tmp = self.settings.cache_dir / _TMP
        if not tmp.is_dir():
            return 0
        cutoff = time.time() - max_age_s
        stale = [p for p in tmp.iterdir() if p.stat().st_mtime < cutoff]
        for p in stale:
            _remove(p)
        return len(stale)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
