"""Safe extraction: what lands on disk, and every refusal with its code."""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.archive import ArchiveLimits, copy_tree, extract_archive, safe_relpath
from server.errors import LoraplexError

LIMITS = ArchiveLimits(max_archive_bytes=1 << 20, max_extracted_bytes=1 << 20, max_members=20)
Member = tuple[str, bytes, bytes | str]  # (name, tar type, data or link target)


def make_tar(path: Path, members: list[Member], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                info.linkname = str(payload)
                tf.addfile(info)
    return path


def code_of(fn: Callable[[], object]) -> str:
    with pytest.raises(LoraplexError) as info:
        fn()
    return info.value.error_code


F = tarfile.REGTYPE


def test_tar_with_internal_links_extracts_copies_not_links(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "a.tgz",
        [
            ("./ad/", tarfile.DIRTYPE, b""),
            ("./ad/adapter_config.json", F, b"{}"),
            ("./ad/sub/weights", F, b"abc"),
            ("./ad/alias", tarfile.SYMTYPE, "sub/weights"),
            ("./ad/sub/back", tarfile.SYMTYPE, "../alias"),  # a chain, resolved in order
            ("./ad/hard", tarfile.LNKTYPE, "ad/sub/weights"),
        ],
    )
    dest = tmp_path / "out"
    dest.mkdir()
    written = extract_archive(archive, dest, LIMITS)
    for name in ("alias", "sub/back", "hard"):
        p = dest / "ad" / name
        assert not p.is_symlink(), name
        assert p.read_bytes() == b"abc", name
    assert written == 2 + 3 * 4
    assert oct((dest / "ad" / "sub" / "weights").stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("mode", ["w", "w:bz2", "w:xz"])
def test_tar_compressions_detected_from_bytes(tmp_path: Path, mode: str) -> None:
    archive = make_tar(tmp_path / "archive.zip", [("f", F, b"x")], mode)  # the name lies
    dest = tmp_path / "out"
    dest.mkdir()
    extract_archive(archive, dest, LIMITS)
    assert (dest / "f").read_bytes() == b"x"


@pytest.mark.parametrize(
    ("members", "code"),
    [
        ([("../x", F, b"")], "archive_unsafe"),
        ([("a/../../x", F, b"")], "archive_unsafe"),
        ([("/abs", F, b"")], "archive_unsafe"),
        ([("a\\..\\x", F, b"")], "archive_unsafe"),
        ([("l", tarfile.SYMTYPE, "/etc/passwd")], "archive_unsafe"),
        ([("d/l", tarfile.SYMTYPE, "../../x")], "archive_unsafe"),
        ([("l", tarfile.SYMTYPE, "missing")], "archive_unsafe"),
        ([("d/", tarfile.DIRTYPE, b""), ("l", tarfile.SYMTYPE, "d")], "archive_unsafe"),
        ([("l", tarfile.SYMTYPE, "m"), ("m", tarfile.SYMTYPE, "l")], "archive_unsafe"),
        ([("h", tarfile.LNKTYPE, "../x")], "archive_unsafe"),
        ([("c", tarfile.CHRTYPE, b"")], "archive_unsafe"),
        ([("b", tarfile.BLKTYPE, b"")], "archive_unsafe"),
        ([("p", tarfile.FIFOTYPE, b"")], "archive_unsafe"),
        ([("f", F, b"1"), ("f", F, b"2")], "archive_unsafe"),
        ([("f", F, b"1"), ("f/g", F, b"2")], "archive_unsafe"),
        ([(f"f{i}", F, b"") for i in range(21)], "archive_too_large"),
        ([("big", F, bytes((1 << 20) + 1))], "archive_too_large"),
        ([("d/", tarfile.DIRTYPE, b"")], "archive_invalid"),
    ],
)
def test_tar_refusals(tmp_path: Path, members: list[Member], code: str) -> None:
    archive = make_tar(tmp_path / "a.tgz", members)
    dest = tmp_path / "out"
    dest.mkdir()
    assert code_of(lambda: extract_archive(archive, dest, LIMITS)) == code
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "content", [b"", b"not an archive at all" * 50, b"\x1f\x8b\x08\x00garbage", b"PK\x03\x04junk"]
)
def test_garbage_is_archive_invalid(tmp_path: Path, content: bytes) -> None:
    archive = tmp_path / "junk"
    archive.write_bytes(content)
    dest = tmp_path / "out"
    dest.mkdir()
    assert code_of(lambda: extract_archive(archive, dest, LIMITS)) == "archive_invalid"


def test_truncated_gzip_is_archive_invalid(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tgz", [("f", F, bytes(range(256)) * 100)])
    archive.write_bytes(archive.read_bytes()[:200])
    dest = tmp_path / "out"
    dest.mkdir()
    assert code_of(lambda: extract_archive(archive, dest, LIMITS)) == "archive_invalid"


def test_zip_extracts_and_refuses(tmp_path: Path) -> None:
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("ad/", "")
        zf.writestr("ad/adapter_config.json", "{}")
    dest = tmp_path / "out"
    dest.mkdir()
    extract_archive(good, dest, LIMITS)
    assert (dest / "ad" / "adapter_config.json").read_text() == "{}"
    for name, code in [("../evil", "archive_unsafe"), ("/evil", "archive_unsafe")]:
        bad = tmp_path / "bad.zip"
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr(name, "x")
        out = tmp_path / f"out-{code}-{len(name)}"
        out.mkdir()
        assert code_of(lambda b=bad, o=out: extract_archive(b, o, LIMITS)) == code  # type: ignore[misc]


def test_zip_bomb_stops_before_writing_it(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros", bytes(4 << 20))
    assert bomb.stat().st_size < 10_000
    dest = tmp_path / "out"
    dest.mkdir()
    assert code_of(lambda: extract_archive(bomb, dest, LIMITS)) == "archive_too_large"
    assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) == 0


def test_zip_lying_about_sizes_is_caught_while_writing(tmp_path: Path) -> None:
    """The central directory claims 1 byte; the cap counts bytes actually decompressed."""
    bomb = tmp_path / "liar.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("f", bytes(2 << 20))
    raw = bytearray(bomb.read_bytes())
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24 : cd + 28] = (1).to_bytes(4, "little")  # uncompressed size in the CD entry
    bomb.write_bytes(bytes(raw))
    dest = tmp_path / "out"
    dest.mkdir()
    assert code_of(lambda: extract_archive(bomb, dest, LIMITS)) in (
        "archive_too_large",
        "archive_invalid",
    )
    assert (
        sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) <= LIMITS.max_extracted_bytes
    )


def test_safe_relpath() -> None:
    assert str(safe_relpath("./a//b/./c")) == "a/b/c"
    assert safe_relpath("./") is None
    for bad in ("..", "a/..", "/x", "a\x00b", "a\\b"):
        assert code_of(lambda b=bad: safe_relpath(b)) == "archive_unsafe"  # type: ignore[misc]


def test_copy_tree_follows_file_links_within_roots(tmp_path: Path) -> None:
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc").write_bytes(b"weights")
    snap = tmp_path / "hub" / "snapshots" / "1"
    snap.mkdir(parents=True)
    (snap / "adapter_model.safetensors").symlink_to(blobs / "abc")  # Hugging Face cache layout
    out = tmp_path / "out"
    copy_tree(snap, out, LIMITS, within=(tmp_path / "hub",))
    copied = out / "adapter_model.safetensors"
    assert copied.read_bytes() == b"weights"
    assert not copied.is_symlink()
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "secret").write_bytes(b"s")
    (snap / "leak").symlink_to(elsewhere / "secret")
    out2 = tmp_path / "out2"
    assert code_of(lambda: copy_tree(snap, out2, LIMITS, within=(snap,))) == "archive_unsafe"


def test_copy_tree_refuses_dir_links_and_dangling_links(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "d").symlink_to(tmp_path)
    assert code_of(lambda: copy_tree(src, tmp_path / "o1", LIMITS)) == "archive_unsafe"
    (src / "d").unlink()
    (src / "dangling").symlink_to(tmp_path / "nothing")
    assert code_of(lambda: copy_tree(src, tmp_path / "o2", LIMITS)) == "archive_unsafe"


def test_encrypted_zip_member_is_archive_invalid(tmp_path: Path) -> None:
    archive = tmp_path / "locked.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("adapter_config.json", "{}")
    raw = bytearray(archive.read_bytes())
    for magic, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local and central headers
        at = raw.find(magic) + offset
        raw[at] |= 0x1  # "encrypted": we never ask for passwords
    archive.write_bytes(bytes(raw))
    dest = tmp_path / "out"
    dest.mkdir()
    assert code_of(lambda: extract_archive(archive, dest, LIMITS)) == "archive_invalid"
