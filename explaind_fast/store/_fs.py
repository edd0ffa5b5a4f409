"""File-system primitives of the store that never follow a link out of the trajectory directory.

Everything is relative to a descriptor of the directory (``dir_fd``); names are single directory
entries (never paths). Threat model: :mod:`.format`. POSIX only.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Optional, Tuple

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CHUNK = 1 << 22


class UnsafeEntry(OSError):
    """A directory entry the store refuses to use (a link, not a regular file, replaced while
    being opened, several hard links); ``reason`` says which, for the caller's message."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def kind_of(mode: int) -> str:
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def open_dir(path) -> int:
    """A descriptor of the directory ``path`` (the caller's path: a link to a directory is fine).
    FileNotFoundError / NotADirectoryError otherwise; never blocks (O_NONBLOCK)."""
    fd = os.open(path, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NONBLOCK)
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
    return fd


def lstat(dir_fd: int, name: str) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def identity(st: os.stat_result) -> Tuple[int, ...]:
    """Changes whenever the file is replaced or written (ctime cannot be set by users)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def open_regular(dir_fd: int, name: str) -> Tuple[int, os.stat_result]:
    """Open entry ``name`` for reading: a regular file only (lstat, open with O_NOFOLLOW |
    O_NONBLOCK, fstat: the same inode). FileNotFoundError when absent, UnsafeEntry otherwise."""
    st0 = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(st0.st_mode):
        raise UnsafeEntry(kind_of(st0.st_mode))
    try:
        fd = os.open(name, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise UnsafeEntry(f"cannot be opened ({e.strerror}); it was replaced while being opened"
                          if e.errno in (errno.ELOOP, errno.EMLINK) else
                          f"cannot be opened ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not same_file(st, st0):
        os.close(fd)
        raise UnsafeEntry("replaced while being opened")
    return fd, st


def pread_exact(fd: int, n: int, offset: int) -> bytes:
    """Exactly ``n`` bytes at ``offset``; EOFError if the file ends first."""
    parts, got = [], 0
    while got < n:
        b = os.pread(fd, min(n - got, _CHUNK), offset + got)
        if not b:
            raise EOFError(f"file ends at byte {offset + got}, {n - got} bytes short")
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill the writable byte buffer ``buf`` from ``offset``; EOFError if the file ends first."""
    got, n = 0, len(buf)
    while got < n:
        if hasattr(os, "preadv"):
            k = os.preadv(fd, [buf[got:]], offset + got)
        else:   # pragma: no cover - platforms without preadv
            b = os.pread(fd, n - got, offset + got)
            buf[got:got + len(b)] = b
            k = len(b)
        if k == 0:
            raise EOFError(f"file ends at byte {offset + got}, {n - got} bytes short")
        got += k


def sha256_of(fd: int, size: int) -> str:
    """sha256 (hex) of the first ``size`` bytes, read in 4 MiB chunks; EOFError if shorter."""
    import hashlib
    h = hashlib.sha256()
    buf = bytearray(min(size, _CHUNK))
    view = memoryview(buf)
    pos = 0
    while pos < size:
        k = min(len(buf), size - pos)
        pread_into(fd, view[:k], pos)
        h.update(view[:k])
        pos += k
    return h.hexdigest()


# ---------------------------------------------------------------------------------- writing
def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(dir_fd: int) -> None:
    try:
        os.fsync(dir_fd)
    except OSError:   # some platforms cannot fsync a directory; the rename is still atomic
        pass


def unlink_entry(dir_fd: int, name: str) -> None:
    """Remove entry ``name`` if present; a link is removed itself, never followed. A directory
    is not ours to remove: UnsafeEntry."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except (IsADirectoryError, PermissionError) as e:
        st = lstat(dir_fd, name)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise UnsafeEntry("a directory (the store never removes directories; remove it "
                              "by hand)") from None
        raise e


def atomic_write_at(dir_fd: int, name: str, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to entry ``name``: a fresh ``name.tmp`` (any old entry of that name is
    unlinked, not followed; O_CREAT | O_EXCL | O_NOFOLLOW, so a link planted in between fails the
    open), fsync, rename over ``name`` inside the directory (replaces a link, never follows it)."""
    tmp = name + ".tmp"
    unlink_entry(dir_fd, tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o666,
                 dir_fd=dir_fd)
    try:
        write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    if fsync:
        fsync_dir(dir_fd)


def open_for_writing(dir_fd: int, name: str, flags: int) -> int:
    """Open entry ``name`` with ``flags`` (O_WRONLY | O_APPEND | O_CREAT, O_RDWR, ...) only if it is
    (or becomes) a regular file with a single link: a symlink, FIFO, device or a hard link to a
    file elsewhere is refused (UnsafeEntry), never followed, truncated or appended to."""
    try:
        fd = os.open(name, flags | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0o666, dir_fd=dir_fd)
    except OSError as e:
        st = lstat(dir_fd, name)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise UnsafeEntry(kind_of(st.st_mode)) from None
        raise e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeEntry(kind_of(st.st_mode))
    if st.st_nlink != 1:
        os.close(fd)
        raise UnsafeEntry(f"a file with {st.st_nlink} hard links (it may be a file elsewhere)")
    return fd


# ---------------------------------------------------------------------------------- the lock
class LockHeld(Exception):
    def __init__(self, holder: Optional[int]):
        super().__init__(holder)
        self.holder = holder


def acquire_lock(dir_fd: int, name: str) -> int:
    """Take an exclusive flock on entry ``name`` (created if absent) and return its descriptor.

    LockHeld when another open file description holds it (another process, or another writer in
    this one). A lock file left by a killed process is simply locked again (the kernel released
    it). The holder unlinks the file while still holding the lock (:func:`release_lock`); a
    locker that won the lock on such an unlinked file sees that the name no longer refers to its
    file and retries, so two writers can never both hold "the" lock.
    """
    import fcntl
    for _ in range(1000):
        fd = open_for_writing(dir_fd, name, os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                try:
                    holder = int(os.pread(fd, 32, 0).split()[0])
                except (ValueError, IndexError, OSError):
                    holder = None
                raise LockHeld(holder) from None
            now = lstat(dir_fd, name)
            if now is None or not same_file(now, os.fstat(fd)):
                os.close(fd)    # its holder removed it as we opened it: lock the new one
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        except BaseException:
            os.close(fd)
            raise
    raise LockHeld(None)   # pragma: no cover - only under a sustained lock/unlink storm


def release_lock(dir_fd: int, name: str, fd: int) -> None:
    """Unlink the lock file (if the name is still ours) while holding the lock, then release."""
    try:
        now = lstat(dir_fd, name)
        if now is not None and same_file(now, os.fstat(fd)):
            os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
    finally:
        os.close(fd)
