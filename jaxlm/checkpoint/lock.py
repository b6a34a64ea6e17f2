"""One writer per run: `<workdir>/lock.json`.

A training run (its process 0, for every process of a multi-host run) takes the lock before
it writes anything else into the workdir, and removes it when it ends, however it ends
short of SIGKILL. The file appears atomically and complete (hard-linked into place) and
says who holds it: host, pid,
the process's start time and boot, when it was taken. While the run lives, a thread
refreshes the file's mtime every `lease / 10` (the heartbeat).

A second run that finds the lock stops with `WorkdirLockedError` (exit 2) naming the
holder, unless the holder is provably gone:

- same host: the pid no longer exists, or is another process now (its start time or the
  machine's boot differs) -> the stale lock is taken over with a warning;
- another host: nothing can be asked of that host, so the lease decides: a lock not
  refreshed for `checkpoint.lock_lease_minutes` is taken over with a warning.

Taking over is guarded by `lock.json.takeover` (also O_EXCL), so two newcomers cannot both
take one stale lock. A holder whose lock was taken over (its heartbeat found another
owner, e.g. after the process was stopped for longer than the lease) exits at once
without writing anything more.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
import sys
import threading
import time
import uuid
from typing import Any

from jaxlm.errors import BAD_INPUT, UserError

LOCK_FILE = "lock.json"
_TAKEOVER_STALE_S = 60.0  # a takeover guard older than this was left by a killed process
_TORN_STALE_S = 10.0  # an unreadable lock older than this was left by a killed process


class WorkdirLockedError(UserError):
    """Another live run holds the workdir."""


def _boot_id() -> str:
    try:
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None if unknown."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses.
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the holder's process (on this host) still runs."""
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return False  # the machine rebooted since
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    recorded, now = holder.get("start_ticks"), _start_ticks(pid)
    return recorded is None or now is None or recorded == now


def describe(holder: dict[str, Any]) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
            f"{holder.get('started', '?')}")


def _read(path: pathlib.Path) -> tuple[dict[str, Any], float] | None:
    """(the lock's content, its mtime), None if there is no lock. An unreadable lock (a
    holder killed while writing it) reads as an empty holder."""
    try:
        mtime = path.stat().st_mtime
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        holder = {}
    return (holder if isinstance(holder, dict) else {}), mtime


class RunLock:
    """The lock of one workdir, held from `acquire()` to `release()` (or the `with` block)."""

    def __init__(self, workdir: str | os.PathLike, lease_minutes: float, say=print):
        self.path = pathlib.Path(workdir).absolute() / LOCK_FILE
        self.lease_s = 60.0 * lease_minutes
        self.say = say
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _content(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "start_ticks": _start_ticks(os.getpid()), "boot_id": _boot_id(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "argv": sys.argv, "token": self.token}

    def _create(self) -> bool:
        """Creates the lock file, complete, if there is none; whether it did. The content is
        written beside it first and hard-linked into place (atomic, and fails if the lock
        exists), so no reader sees a half-written lock; without hard links (some network
        file systems) the file is created with O_EXCL and then written."""
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.token}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._content(), f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(tmp.read_text(encoding="utf-8"))
                f.flush()
                os.fsync(f.fileno())
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _stale_reason(self, holder: dict[str, Any], mtime: float) -> str | None:
        """Why the holder is gone, or None if it may still run."""
        if holder.get("token") == self.token:
            return None
        if not holder.get("host"):  # empty or torn: its writer died while taking the lock
            return "unreadable, left by a process killed while taking it" \
                if time.time() - mtime > _TORN_STALE_S else None
        if holder.get("host") == socket.gethostname():
            return None if _alive(holder) else "its process is gone"
        age = time.time() - mtime
        if age >= self.lease_s:
            return (f"not refreshed for {age / 60:.1f} min (checkpoint.lock_lease_minutes="
                    f"{self.lease_s / 60:g})")
        return None

    def _refusal(self, holder: dict[str, Any], mtime: float) -> WorkdirLockedError:
        where = f"{self.path.parent} is in use by another run ({describe(holder)})"
        if holder.get("host") == socket.gethostname():
            return WorkdirLockedError(f"{where}; wait for it to end, or use another --workdir")
        left = self.lease_s - (time.time() - mtime)
        return WorkdirLockedError(
            f"{where}, refreshed {time.time() - mtime:.0f} s ago; if that run was killed, its "
            f"lock counts as stale in {left / 60:.1f} min (checkpoint.lock_lease_minutes="
            f"{self.lease_s / 60:g}), or delete {self.path} once you are sure it is gone")

    def _take_over(self, holder: dict[str, Any], reason: str) -> bool:
        """Replaces the stale lock `holder` under the takeover guard; whether it did."""
        guard = self.path.with_name(LOCK_FILE + ".takeover")
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > _TAKEOVER_STALE_S:
                    guard.unlink()
            except FileNotFoundError:
                pass
            return False
        os.close(fd)
        try:
            current = _read(self.path)
            if current is not None and current[0].get("token") != holder.get("token"):
                return False  # someone else took it over meanwhile
            tmp = self.path.with_name(f"{LOCK_FILE}.{self.token}")
            tmp.write_text(json.dumps(self._content()), encoding="utf-8")
            os.replace(tmp, self.path)
        finally:
            guard.unlink(missing_ok=True)
        self.say(f"warning: took over the stale lock of {self.path.parent} "
                 f"({describe(holder)}): {reason}")
        return True

    def acquire(self) -> "RunLock":
        """Takes the lock, or raises WorkdirLockedError naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # a lost race (a holder leaving, another taking over) retries
            if self._create():
                break
            found = _read(self.path)
            if found is None:
                continue
            holder, mtime = found
            reason = self._stale_reason(holder, mtime)
            if reason is None:
                raise self._refusal(holder, mtime)
            if self._take_over(holder, reason):
                break
            time.sleep(0.05)
        else:
            raise WorkdirLockedError(f"could not take the lock {self.path}: other runs keep "
                                     f"taking it")
        self.held = True
        self._thread = threading.Thread(target=self._heartbeat, name="jaxlm-lock", daemon=True)
        self._thread.start()
        return self

    def beat(self) -> str | None:
        """One heartbeat: refreshes the lock's mtime; None, or why the lock is lost. A
        storage error (EIO, a stale NFS handle) proves nothing: the next beat retries, and
        the lease (10 beats) is long."""
        try:
            found = _read(self.path)
            if found is None or found[0].get("token") != self.token:
                holder = found[0] if found else {}
                return (f"lost the lock of {self.path.parent}"
                        + (f" to {describe(holder)}" if holder else " (lock.json was removed)"))
            os.utime(self.path)
        except OSError:
            pass
        return None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 10):
            lost = self.beat()
            if lost:  # another run writes here now: not one more byte from this one
                print(f"jaxlm: {lost}; stopping at once without writing anything more",
                      file=sys.stderr, flush=True)
                os._exit(BAD_INPUT)

    def release(self) -> None:
        """Removes the lock if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.held:
            self.held = False
            try:
                found = _read(self.path)
                if found is not None and found[0].get("token") == self.token:
                    self.path.unlink(missing_ok=True)
            except OSError as e:  # never in place of the error that ended the run
                print(f"jaxlm: warning: could not remove the lock {self.path}: {e}",
                      file=sys.stderr, flush=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
