"""Safe extraction of adapter archives (.tar, .tar.gz/.tgz, .tar.bz2/.xz, .zip).

Archives come from outside (an HTTP URL, an object store), so nothing in them is trusted: member
names are checked component by component (no absolute paths, no `..`, no NUL or backslash),
device files and FIFOs are refused, and links are never created on disk — a link whose target
stays inside the archive is materialised as a copy of that file, one that points outside is
refused. Caps on member count and on bytes actually written (not the sizes the headers claim)
stop zip and tar bombs while they decompress. Format is detected from the bytes, not the name.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from adapters.errors import ArchiveInvalid, ArchiveTooLarge, ArchiveUnsafe

_CHUNK = 1 << 20
CONFIG_NAME = "adapter_config.json"  # how an extracted tree's adapter root is found
_MAX_LINK_HOPS = 8


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    """Defaults fit a rank-64 all-module adapter of a 70B model (~1.7 GB in bf16)."""

    max_archive_bytes: int = 4 << 30  # downloaded (compressed) size
    max_extracted_bytes: int = 4 << 30  # bytes written while extracting or copying
    max_members: int = 1000  # files, directories and links


def safe_relpath(name: str) -> PurePosixPath | None:
    """A member name as a path relative to the extraction root; None for the root itself."""
    if "\x00" in name or "\\" in name:
        raise ArchiveUnsafe(f"member name {name!r} contains NUL or a backslash")
    if name.startswith("/"):
        raise ArchiveUnsafe(f"member {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveUnsafe(f"member {name!r} escapes the archive with '..'")
    return PurePosixPath(*parts) if parts else None


class TreeWriter:
    """Writes members under `dest`, counting members and bytes against the limits."""

    def __init__(
        self,
        dest: Path,
        limits: ArchiveLimits,
        check: Callable[[], None] | None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.dest = dest
        self.limits = limits
        self.check = check  # raises to abort (shutdown, deadline)
        self.on_bytes = on_bytes
        self.members = 0
        self.written = 0
        self.files: set[PurePosixPath] = set()
        self.dirs: set[PurePosixPath] = set()
        self.links: dict[PurePosixPath, PurePosixPath] = {}  # link -> target (archive paths)

    def count_member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveTooLarge(f"archive has more than {self.limits.max_members} members")

    def claim(self, rel: PurePosixPath) -> None:
        if rel in self.files or rel in self.links or rel in self.dirs:
            raise ArchiveUnsafe(f"member {str(rel)!r} appears twice")
        for parent in rel.parents:
            if parent in self.files or parent in self.links:
                raise ArchiveUnsafe(f"member {str(rel)!r} lies under a file or link")

    def mkdir(self, rel: PurePosixPath) -> None:
        if rel in self.dirs:
            return
        self.claim(rel)
        self.dirs.add(rel)
        (self.dest / rel).mkdir(mode=0o755, parents=True, exist_ok=True)

    def write(self, rel: PurePosixPath, src: IO[bytes], declared: int | None) -> None:
        self.claim(rel)
        if declared is not None and self.written + declared > self.limits.max_extracted_bytes:
            raise self.too_large()
        target = self.dest / rel
        for parent in list(rel.parents)[:-1]:
            self.dirs.add(parent)
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with target.open("wb") as out:
            while chunk := src.read(_CHUNK):
                self.written += len(chunk)
                if self.written > self.limits.max_extracted_bytes:
                    raise self.too_large()
                if self.check is not None:
                    self.check()
                out.write(chunk)
                if self.on_bytes is not None:
                    self.on_bytes(len(chunk))
        target.chmod(0o644)
        self.files.add(rel)

    def add_link(self, rel: PurePosixPath, target: PurePosixPath) -> None:
        self.claim(rel)
        self.links[rel] = target

    def resolve_links(self) -> None:
        """Second pass: each link becomes a copy of the regular file it finally points to."""
        for link in sorted(self.links):
            target = self.links[link]
            for _ in range(_MAX_LINK_HOPS):
                if target not in self.links:
                    break
                target = self.links[target]
            if target not in self.files:
                raise ArchiveUnsafe(
                    f"link {str(link)!r} does not point to a regular file inside the archive"
                )
            with (self.dest / target).open("rb") as src:
                self.links.pop(link)  # let write() claim the path as a file
                self.write(link, src, (self.dest / target).stat().st_size)

    def too_large(self) -> ArchiveTooLarge:
        return ArchiveTooLarge(
            f"archive expands to more than {self.limits.max_extracted_bytes} bytes"
        )


def extract_archive(
    archive: Path,
    dest: Path,
    limits: ArchiveLimits,
    check: Callable[[], None] | None = None,
) -> int:
    """Extract into the empty directory `dest`; returns the bytes written. `check` is called
    between chunks and may raise to abort."""
    with archive.open("rb") as f:
        magic = f.read(4)
    writer = TreeWriter(dest, limits, check)
    if magic[:2] == b"PK":
        _extract_zip(archive, writer)
    else:
        _extract_tar(archive, writer)
    writer.resolve_links()
    if not writer.files:
        raise ArchiveInvalid("archive holds no files")
    return writer.written


def _extract_tar(archive: Path, w: TreeWriter) -> None:
    try:
        with archive.open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            for m in tf:
                w.count_member()
                rel = safe_relpath(m.name)
                if m.isdir():
                    if rel is not None:
                        w.mkdir(rel)
                    continue
                if rel is None:
                    raise ArchiveUnsafe(f"member {m.name!r} is not a directory")
                if m.isreg() and not m.issparse():
                    src = tf.extractfile(m)
                    if src is None:  # pragma: no cover - isreg() members always have data
                        raise ArchiveInvalid(f"member {m.name!r} has no data")
                    w.write(rel, src, m.size)
                elif m.issym():
                    w.add_link(rel, _symlink_target(rel, m.linkname))
                elif m.islnk():
                    target = safe_relpath(m.linkname)
                    if target is None:
                        raise ArchiveUnsafe(f"hard link {m.name!r} points at the archive root")
                    w.add_link(rel, target)
                else:
                    raise ArchiveUnsafe(f"member {m.name!r} is a device, FIFO or sparse file")
    except OSError as exc:
        if exc.errno is not None:  # the filesystem, not the data (gzip/bz2 errors have no errno)
            raise
        raise ArchiveInvalid(f"not a readable tar or zip archive: {exc}") from None
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:
        raise ArchiveInvalid(f"not a readable tar or zip archive: {exc}") from None


def _symlink_target(link: PurePosixPath, target: str) -> PurePosixPath:
    if target.startswith("/") or "\x00" in target or "\\" in target:
        raise ArchiveUnsafe(f"symlink {str(link)!r} points outside the archive ({target!r})")
    joined = posixpath.normpath(posixpath.join(str(link.parent), target))
    if joined == ".." or joined.startswith("../") or joined == ".":
        raise ArchiveUnsafe(f"symlink {str(link)!r} points outside the archive ({target!r})")
    return PurePosixPath(joined)


def _extract_zip(archive: Path, w: TreeWriter) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > w.limits.max_members:
                raise ArchiveTooLarge(f"archive has more than {w.limits.max_members} members")
            if sum(i.file_size for i in infos) > w.limits.max_extracted_bytes:
                raise w.too_large()
            for info in infos:
                _zip_member(zf, info, w)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, ValueError) as exc:
        raise ArchiveInvalid(f"not a readable zip archive: {exc}") from None
    except NotImplementedError as exc:  # unsupported compression method
        raise ArchiveInvalid(f"zip member uses an unsupported feature: {exc}") from None


def _zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, w: TreeWriter) -> None:
    w.count_member()
    rel = safe_relpath(info.filename)
    if info.flag_bits & 0x1:
        raise ArchiveInvalid(f"zip member {info.filename!r} is encrypted")
    mode = info.external_attr >> 16 if info.create_system == 3 else 0  # 3: Unix
    if info.is_dir() or stat.S_ISDIR(mode):
        if rel is not None:
            w.mkdir(rel)
        return
    if rel is None:
        raise ArchiveUnsafe(f"member {info.filename!r} is not a directory")
    if stat.S_ISLNK(mode):
        if info.file_size > 4096:
            raise ArchiveUnsafe(f"symlink {info.filename!r} has an implausible target")
        target = zf.read(info).decode("utf-8", errors="replace")
        w.add_link(rel, _symlink_target(rel, target))
        return
    if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
        raise ArchiveUnsafe(f"member {info.filename!r} is a device, FIFO or socket")
    with zf.open(info) as src:
        w.write(rel, src, info.file_size)


def copy_tree(
    src: Path,
    dest: Path,
    limits: ArchiveLimits,
    *,
    within: tuple[Path, ...] = (),
    on_bytes: Callable[[int], None] | None = None,
    check: Callable[[], None] | None = None,
) -> int:
    """Copy a local adapter directory's regular files under the same caps as an archive.

    Symlinks to files are followed (a Hugging Face cache snapshot is all symlinks into
    `blobs/`), but when `within` is given their targets must resolve inside one of those roots.
    Returns the bytes copied."""
    writer = TreeWriter(dest, limits, check, on_bytes)
    dest.mkdir(parents=True, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        for dname in dirnames:
            if (Path(dirpath) / dname).is_symlink():
                raise ArchiveUnsafe(f"{dname} is a symlink to a directory; copy refused")
        dirnames.sort()
        for fname in sorted(filenames):
            path = Path(dirpath) / fname
            rel = PurePosixPath(path.relative_to(src).as_posix())
            writer.count_member()
            if not path.is_file():
                raise ArchiveUnsafe(f"{rel} is not a regular file (device, FIFO or dangling link)")
            real = path.resolve()
            if within and not any(real.is_relative_to(root) for root in within):
                raise ArchiveUnsafe(f"{rel} links outside the allowed source roots")
            with real.open("rb") as f:
                writer.write(rel, f, real.stat().st_size)
    return writer.written


def adapter_root(entry: Path) -> Path:
    """The entry itself, or its only top-level folder when the archive wrapped the files in one."""
    if (entry / CONFIG_NAME).is_file():
        return entry
    # Archivers' litter (macOS `__MACOSX/`, `.DS_Store`) does not count as a second folder.
    children = [c for c in entry.iterdir() if not c.name.startswith((".", "__MACOSX"))]
    if len(children) == 1 and children[0].is_dir() and (children[0] / CONFIG_NAME).is_file():
        return children[0]
    return entry


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """sha256 over each regular file, sorted by relative POSIX path: path NUL size NUL bytes."""
    h = hashlib.sha256()
    files = sorted(
        (PurePosixPath(p.relative_to(root).as_posix()), p) for p in root.rglob("*") if p.is_file()
    )
    for rel, path in files:
        h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()
