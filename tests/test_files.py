"""Crash-safe writes: the new file's bytes and its rename are both flushed to disk."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from fedpeft.common import files


@pytest.mark.skipif(not hasattr(os, "O_DIRECTORY"), reason="directories are fsynced on POSIX only")
def test_the_file_and_then_its_directory_are_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", recording_fsync)
    files.atomic_write_bytes(tmp_path / "sub" / "state.bin", b"moments")
    assert synced == ["file", "dir"]
    assert (tmp_path / "sub" / "state.bin").read_bytes() == b"moments"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["state.bin"]  # no temp file left


@pytest.mark.skipif(not hasattr(os, "O_DIRECTORY"), reason="directories are fsynced on POSIX only")
@pytest.mark.parametrize(("code", "tolerated"), [(errno.EINVAL, True), (errno.EIO, False)])
def test_a_file_system_that_cannot_fsync_a_directory_keeps_the_write(tmp_path, monkeypatch, code, tolerated):
    real_fsync = os.fsync

    def directory_fsync_fails(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", directory_fsync_fails)
    if tolerated:  # (some FUSE/network mounts: the rename itself stands)
        files.atomic_write_bytes(tmp_path / "state.bin", b"moments")
    else:  # a real I/O error is not swallowed
        with pytest.raises(OSError):
            files.atomic_write_bytes(tmp_path / "state.bin", b"moments")
    assert (tmp_path / "state.bin").read_bytes() == b"moments"
