"""One launch per grid store at a time: a lease in the store that a dead launch cannot hold.

`RESULTS/<grid>/_lease.json` names the launch holding the store (host, pid, since). A second
launch of the same store refuses in one line naming the holder, so no trial's compute is
spent twice. Whoever holds the lease owns everything under `_tune/` (Tune's state of running
trials), so a new holder deletes what a killed launch left there.

On a local or mounted folder the lease is an exclusive `flock` on `_lease.lock`, which the
kernel (or, on NFSv4, the server once the client's lease lapses) drops when the holding
process dies, however it dies. Object stores have no locks: there the holder renews a
heartbeat in `_lease.json` every HEARTBEAT_S, and is dead when, on this host, its process is
gone, or, seen from another host, its heartbeat is older than EXPIRY_S. Taking it writes the
lease, waits SETTLE_S and reads it back: of two launches starting within that window, the
one whose write landed last proceeds and the other refuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import psutil
import pyarrow.fs as pafs
from slimsweep.orchestrator.grid import GridError
from slimsweep.orchestrator.store import Store

LEASE_FILE = "_lease.json"
LOCK_FILE = "_lease.lock"
HEARTBEAT_S = 30.0
EXPIRY_S = 180.0  # a holder on another host silent this long is dead
SETTLE_S = 2.0  # object stores: how long a launch waits before reading its lease back
_HELD: set[str] = set()  # tokens of the leases this process holds now


@dataclass(frozen=True)
class Holder:
    token: str  # unique per launch
    host: str
    pid: int
    pid_started: float  # the process's start time: a pid reused by another process is not it
    since: str
    heartbeat: float  # time.time() of the last renewal

    def alive(self) -> bool:
        if self.host == socket.gethostname():
            if self.pid == os.getpid():  # ours: alive while a Lease of this process holds it
                return self.token in _HELD
            return _started(self.pid) == self.pid_started
        return time.time() - self.heartbeat < EXPIRY_S

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.since}"


def _started(pid: int) -> float | None:
    """A live process's start time; None when there is none (a zombie is none)."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.Error:
        return None


def _me() -> Holder:
    pid = os.getpid()
    return Holder(
        token=uuid.uuid4().hex,
        host=socket.gethostname(),
        pid=pid,
        pid_started=psutil.Process(pid).create_time(),
        since=datetime.now(UTC).isoformat(timespec="seconds"),
        heartbeat=time.time(),
    )


class Lease:
    """The store's lease, held by this process until `release` (or the end of a `with`)."""

    def __init__(self, store: Store, me: Holder, lock_fd: int | None):
        self.store, self.me, self._fd = store, me, lock_fd
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @classmethod
    def acquire(cls, store: Store) -> Lease:
        """The lease, or a GridError naming the live launch that holds it."""
        store.fs.create_dir(store.root, recursive=True)
        me = _me()
        if _local(store):
            fd = os.open(f"{store.root}/{LOCK_FILE}", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _refusal(store, _read(store)) from None
            _write(store, me)
            return cls(store, me, fd)
        current = _read(store)
        if current is not None and current.alive():
            raise _refusal(store, current)
        _write(store, me)
        time.sleep(SETTLE_S)
        current = _read(store)
        if current is None or current.token != me.token:
            raise _refusal(store, current)
        lease = cls(store, me, None)
        _HELD.add(me.token)
        lease._beat = threading.Thread(target=lease._renew, name="slimsweep-lease", daemon=True)
        lease._beat.start()
        return lease

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            current = _read(self.store)
            if current is None or current.token != self.me.token:
                return  # taken over (we looked dead): the other launch owns the store now
            with contextlib.suppress(OSError):  # an outage: the next beat tries again
                _write(self.store, dataclasses.replace(self.me, heartbeat=time.time()))

    def release(self) -> None:
        _HELD.discard(self.me.token)
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        current = _read(self.store)
        if current is not None and current.token == self.me.token:
            with contextlib.suppress(OSError):
                self.store.fs.delete_file(_path(self.store))
        if self._fd is not None:
            os.close(self._fd)  # drops the flock (the lock file stays: see holder())

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(store: Store) -> Holder | None:
    """The live launch holding the store's lease, or None."""
    if not _local(store):
        current = _read(store)
        return current if current is not None and current.alive() else None
    try:
        fd = os.open(f"{store.root}/{LOCK_FILE}", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _read(store)
    finally:
        os.close(fd)  # also drops the shared lock if we got it


def _refusal(store: Store, other: Holder | None) -> GridError:
    who = f" ({other.describe()})" if other else ""
    return GridError(
        f"results {store.uri}: another launch of this grid is running{who}; wait for it or "
        f"stop it (a launch that died frees the store at once, or after {EXPIRY_S:g} s "
        f"without heartbeat on an object store)"
    )


def _local(store: Store) -> bool:
    return isinstance(store.fs, pafs.LocalFileSystem)


def _path(store: Store) -> str:
    return f"{store.root}/{LEASE_FILE}"


def _read(store: Store) -> Holder | None:
    try:
        with store.fs.open_input_stream(_path(store)) as f:
            return Holder(**json.loads(f.read()))
    except (OSError, ValueError, TypeError):
        return None


def _write(store: Store, me: Holder) -> None:
    """Whole or not at all: a reader never sees half a lease (local: a rename; object
    stores: an object appears whole)."""
    path = _path(store)
    tmp = f"{path}.{me.token}" if _local(store) else path
    with store.fs.open_output_stream(tmp) as f:
        f.write(json.dumps(dataclasses.asdict(me)).encode())
    if tmp != path:
        store.fs.move(tmp, path)
