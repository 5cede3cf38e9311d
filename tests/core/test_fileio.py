"""core.fileio: atomic writes that planted symlinks cannot redirect, bounded reads, printable text."""

from __future__ import annotations

import os
import stat

import pytest

from monolith_torch.core.fileio import (
    SymlinkTargetError,
    append_file,
    atomic_write,
    printable,
    read_limited,
    temp_files,
)


@pytest.fixture
def victim(tmp_path):
    """A file a planted symlink points at; no write may change it."""
    path = tmp_path / "elsewhere" / "victim.txt"
    path.parent.mkdir()
    path.write_text("precious")
    return path


def _plant_old_temp_names(target, victim, names):
    for name in names:
        os.symlink(victim, target.parent / name)


def test_write_replaces_the_target_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_write(target, "wb") as f:
        f.write(b"new bytes")
    assert target.read_bytes() == b"new bytes"
    with atomic_write(target, "w") as f:
        f.write("text\n")
    assert target.read_text() == "text\n"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_symlinks_at_predictable_temp_names_are_never_written_through(tmp_path, victim):
    target = tmp_path / "ckpt"
    pid = os.getpid()
    # Every name the writers used to open without O_EXCL.
    _plant_old_temp_names(target, victim, [f".ckpt.tmp-{pid}", f"ckpt.tmp.{pid}", f"ckpt.tmp-{pid}"])
    with atomic_write(target, "wb") as f:
        f.write(b"checkpoint")
    assert victim.read_text() == "precious"
    assert target.read_bytes() == b"checkpoint" and not target.is_symlink()


def test_temp_names_are_unpredictable_and_recognisable(tmp_path):
    target = tmp_path / "data.tsv"
    seen = set()
    for _ in range(3):
        with atomic_write(target, "wb") as f:
            (name,) = [n for n in os.listdir(tmp_path) if n != "data.tsv"]
            seen.add(name)
            assert temp_files(target) == [str(tmp_path / name)]
            f.write(b"x")
    assert len(seen) == 3 and all(n.startswith(".data.tsv.tmp-") for n in seen)
    assert temp_files(target) == []


@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlink_at_the_target_is_refused_before_anything_is_created(tmp_path, victim, dangling):
    target = tmp_path / "scores.tsv"
    os.symlink(tmp_path / "nowhere" if dangling else victim, target)
    with pytest.raises(SymlinkTargetError, match="scores.tsv' is a symbolic link"):
        with atomic_write(target, "w") as f:
            f.write("overwritten")
    assert victim.read_text() == "precious"
    assert target.is_symlink() and sorted(os.listdir(tmp_path)) == ["elsewhere", "scores.tsv"]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_failed_or_interrupted_write_keeps_the_old_file_and_removes_the_temp(tmp_path, error):
    target = tmp_path / "out"
    target.write_text("old")
    with pytest.raises(error):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise error()
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_bad_targets_and_modes(tmp_path):
    with pytest.raises(IsADirectoryError):
        with atomic_write(tmp_path, "wb"):
            pass
    with pytest.raises(FileNotFoundError):
        with atomic_write(tmp_path / "missing" / "x", "wb"):
            pass
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "x", "ab"):
            pass
    assert os.listdir(tmp_path) == []


def test_permissions_follow_the_umask_like_open(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o644


def test_append_file_refuses_a_symlink(tmp_path, victim):
    log = tmp_path / "train.log"
    with append_file(log) as f:
        f.write("one\n")
    with append_file(log) as f:
        f.write("two\n")
    assert log.read_text() == "one\ntwo\n"
    link = tmp_path / "planted.log"
    os.symlink(victim, link)
    with pytest.raises(SymlinkTargetError):
        append_file(link)
    assert victim.read_text() == "precious"


def test_read_limited_stops_at_the_limit(tmp_path):
    small = tmp_path / "small"
    small.write_bytes(b"x" * 10)
    assert read_limited(small, 10) == b"x" * 10
    with pytest.raises(ValueError, match="larger than 9 bytes"):
        read_limited(small, 9)
    if os.path.exists("/dev/zero"):
        with pytest.raises(ValueError, match="larger than"):
            read_limited("/dev/zero", 1 << 20)


@pytest.mark.parametrize(
    "text, shown",
    [
        ("plain text, é", "plain text, é"),
        ("a\x1b]0;pwned\x07b", "a\\x1b]0;pwned\\x07b"),
        ("\x1b[2J\x9b1m\u202e", "\\x1b[2J\\x9b1m\\u202e"),
        ("tab\there\r\n", "tab\\there\\r\\n"),
        (b"bytes \xff\xfe \x1b", "bytes \\xff\\xfe \\x1b"),
    ],
)
def test_printable_escapes_what_could_drive_a_terminal(text, shown):
    out = printable(text)
    assert out == shown
    assert out.isprintable()


def test_printable_cuts_before_escaping():
    assert printable("abcdef", limit=3) == "abc..."
    assert printable("\x1b" * 10, limit=2) == "\\x1b\\x1b..."
