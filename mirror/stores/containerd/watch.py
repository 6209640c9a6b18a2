"""Wake readers of a growing file when it changes: Linux inotify, on the event loop.

Why: a peer's read of a blob the runtime is still receiving (ingest.py) waits for the runtime's
next write. Looking at the file on a timer wakes the node's event loop 20 to 200 times a second
per reader, and a node's wake-ups cost its runtime too where the two share a CPU share
(docs/benchmarks.md: at 16 nodes the watch took the loop from 22 to 16 wake-ups a second).
containerd writes a pull's bytes 1 MiB at a time and commits by renaming the file: inotify
reports each write (`IN_MODIFY`), the commit (`IN_MOVE_SELF`) and the runtime giving up (the
unlink: `IN_ATTRIB`), so a reader wakes once per write instead of once per tick. Readers still
look on their own now and then (the caller's timeout) for a stall, and where inotify is not
available they poll as before.

One inotify descriptor per store; files watched by several readers share one watch (inotify
gives the same watch for the same inode), counted, and removed with the last reader. Each watch
counts its events, so a reader that saw the file at count `n` and then waits returns at once if
anything happened since.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

_IN_MODIFY = 0x00000002
_IN_ATTRIB = 0x00000004
_IN_MOVE_SELF = 0x00000800
_IN_DELETE_SELF = 0x00000400
_IN_IGNORED = 0x00008000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_MASK = _IN_MODIFY | _IN_ATTRIB | _IN_MOVE_SELF | _IN_DELETE_SELF
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of name
_READ_SIZE = 64 * 1024


class _Watched:
    """One inotify watch: its readers, and the events seen on it so far."""

    def __init__(self, descriptor: int) -> None:
        self.descriptor = descriptor
        self.readers = 0
        self.events = 0
        self.changed = asyncio.Event()


class FileWatch:
    """One reader's watch on one file."""

    def __init__(self, watcher: FileWatcher, watched: _Watched) -> None:
        self._watcher = watcher
        self._watched: _Watched | None = watched

    @property
    def events(self) -> int:
        """How many changes the file has seen since it was first watched."""
        return self._watched.events if self._watched is not None else 0

    async def changed_since(self, events: int, timeout: float) -> bool:
        """Whether the file saw more than `events` changes, at once or within `timeout`
        seconds (False: the time ran out)."""
        watched = self._watched
        if watched is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                while watched.events == events:
                    await watched.changed.wait()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        watched, self._watched = self._watched, None
        if watched is not None:
            self._watcher.release(watched)


class FileWatcher:
    """The store's inotify descriptor, opened on first use within the running event loop."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._failed = False
        self._watches: dict[int, _Watched] = {}
        self._libc: ctypes.CDLL | None = None

    def watch(self, path: Path) -> FileWatch | None:
        """A watch on `path` for the caller; None when inotify cannot watch it (the caller
        polls instead)."""
        fd = self._descriptor()
        if fd is None or self._libc is None:
            return None
        descriptor = int(self._libc.inotify_add_watch(fd, os.fsencode(path), _MASK))
        if descriptor < 0:
            log.debug("cannot watch %s: %s", path, os.strerror(ctypes.get_errno()))
            return None
        watched = self._watches.get(descriptor)
        if watched is None:
            watched = self._watches[descriptor] = _Watched(descriptor)
        watched.readers += 1
        return FileWatch(self, watched)

    def release(self, watched: _Watched) -> None:
        watched.readers -= 1
        if watched.readers > 0 or self._watches.get(watched.descriptor) is not watched:
            return
        del self._watches[watched.descriptor]
        if self._fd is not None and self._libc is not None:
            self._libc.inotify_rm_watch(self._fd, watched.descriptor)  # gone already: ignored

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        for watched in self._watches.values():
            watched.events += 1  # wake every reader: they poll from here on
            watched.changed.set()
        self._watches.clear()
        self._failed = True

    def _descriptor(self) -> int | None:
        if self._fd is not None or self._failed:
            return self._fd
        try:
            # The process's own symbols, libc's among them: `ctypes.util.find_library` would
            # run `ldconfig` in a subprocess, on the node's CPU share, mid-rollout.
            libc = ctypes.CDLL(None, use_errno=True)
            fd = int(libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
            why = os.strerror(ctypes.get_errno()) if fd < 0 else None
        except (OSError, AttributeError) as exc:  # not Linux, or no libc to call
            why = str(exc)
        if why is not None:
            log.info("no inotify (%s): readers of growing blobs poll", why)
            self._failed = True
            return None
        asyncio.get_running_loop().add_reader(fd, self._read_events, fd)
        self._libc, self._fd = libc, fd
        return fd

    def _read_events(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        offset = 0
        touched: set[_Watched] = set()
        while offset + _EVENT.size <= len(data):
            descriptor, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size + length
            watched = self._watches.get(descriptor)
            if watched is None:
                continue
            watched.events += 1
            touched.add(watched)
            if mask & _IN_IGNORED:  # the file's inode is gone: no more events will come
                del self._watches[descriptor]
        for watched in touched:
            watched.changed.set()
            watched.changed = asyncio.Event()  # the next wait waits for the next event
