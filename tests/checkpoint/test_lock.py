"""One writer per run: the workdir lock (jaxlm.checkpoint.lock)."""

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jaxlm.checkpoint import lock as lock_lib


def lock_of(workdir, lease_minutes=10.0, said=None):
    return lock_lib.RunLock(workdir, lease_minutes, say=(said.append if said is not None
                                                          else print))


def holder_file(workdir, **fields):
    path = workdir / lock_lib.LOCK_FILE
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"started": "2026-12-01T00:00:00+00:00", "token": "t", **fields}))
    return path


def test_a_live_holder_on_this_host_refuses_naming_it(tmp_path):
    first = lock_of(tmp_path).acquire()
    content = json.loads((tmp_path / "lock.json").read_text())
    assert (content["host"], content["pid"]) == (socket.gethostname(), os.getpid())
    with pytest.raises(lock_lib.WorkdirLockedError) as refused:
        lock_of(tmp_path).acquire()
    assert str(refused.value) == (
        f"{tmp_path} is in use by another run (host {socket.gethostname()}, pid {os.getpid()}, "
        f"started {content['started']}); wait for it to end, or use another --workdir")
    first.release()
    assert not (tmp_path / "lock.json").exists()
    lock_of(tmp_path).acquire().release()  # free again


def test_the_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path):
    script = (f"import os, signal, sys; sys.path.insert(0, {str(tmp_path)!r}); "
              f"from jaxlm.checkpoint import lock; "
              f"lock.RunLock({str(tmp_path)!r}, 10.0).acquire(); "
              f"os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", script])
    assert done.returncode == -9
    dead = json.loads((tmp_path / "lock.json").read_text())
    said = []
    lock = lock_of(tmp_path, said=said).acquire()
    assert said == [f"warning: took over the stale lock of {tmp_path} (host {dead['host']}, "
                    f"pid {dead['pid']}, started {dead['started']}): its process is gone"]
    assert json.loads((tmp_path / "lock.json").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_reused_pid_does_not_keep_a_dead_holder_alive(tmp_path):
    # This very process's pid, but another start time: the holder was another process.
    holder_file(tmp_path, host=socket.gethostname(), pid=os.getpid(), start_ticks=1,
                boot_id=lock_lib._boot_id())
    said = []
    lock_of(tmp_path, said=said).acquire().release()
    assert said and said[0].endswith("its process is gone")


def test_another_hosts_lock_holds_for_its_lease_then_is_taken_over(tmp_path):
    path = holder_file(tmp_path, host="node-7", pid=123)
    with pytest.raises(lock_lib.WorkdirLockedError,
                       match=r"in use by another run \(host node-7, pid 123, started .*\), "
                             r"refreshed \d+ s ago; if that run was killed, its lock counts as "
                             r"stale in (9\.9|10\.0) min \(checkpoint.lock_lease_minutes=10\)"):
        lock_of(tmp_path).acquire()
    eleven_minutes_ago = time.time() - 11 * 60
    os.utime(path, (eleven_minutes_ago, eleven_minutes_ago))
    said = []
    lock = lock_of(tmp_path, said=said).acquire()
    assert said[0].startswith(f"warning: took over the stale lock of {tmp_path} (host node-7, "
                              f"pid 123") and "not refreshed for 11.0 min" in said[0]
    lock.release()


def test_a_torn_lock_is_stale_only_once_its_writer_had_time(tmp_path):
    path = tmp_path / "lock.json"
    path.write_text('{"host": ')  # a process killed while writing it
    with pytest.raises(lock_lib.WorkdirLockedError):
        lock_of(tmp_path).acquire()
    old = time.time() - 60
    os.utime(path, (old, old))
    said = []
    lock_of(tmp_path, said=said).acquire().release()
    assert "unreadable, left by a process killed while taking it" in said[0]


def test_heartbeat_refreshes_and_notices_a_takeover(tmp_path):
    lock = lock_of(tmp_path).acquire()
    path = tmp_path / "lock.json"
    old = time.time() - 300
    os.utime(path, (old, old))
    assert lock.beat() is None and path.stat().st_mtime > old + 200
    holder_file(tmp_path, host="node-2", pid=9)  # another run took it over
    assert lock.beat() == f"lost the lock of {tmp_path} to host node-2, pid 9, started " \
                          f"2026-12-01T00:00:00+00:00"
    lock.release()  # not ours any more: left in place
    assert json.loads(path.read_text())["host"] == "node-2"


def test_a_takeover_in_progress_is_not_doubled(tmp_path):
    path = holder_file(tmp_path, host="node-7", pid=123)
    stale = time.time() - 3600
    os.utime(path, (stale, stale))
    (tmp_path / "lock.json.takeover").touch()  # another newcomer is taking it over
    # That newcomer is mid-takeover; this one retries and finds the guard each time.
    with pytest.raises(lock_lib.WorkdirLockedError, match="other runs keep taking it"):
        lock_of(tmp_path).acquire()
    assert json.loads(path.read_text())["host"] == "node-7"


def test_a_storage_error_in_a_heartbeat_is_retried_not_fatal(tmp_path, monkeypatch):
    """EIO or a stale NFS handle while reading lock.json proves nothing: the beat reports
    no loss (the next one retries), and releasing the lock never raises in place of the
    run's own error."""
    lock = lock_lib.RunLock(tmp_path, 10.0, lambda *a: None).acquire()
    real_read = lock_lib._read

    def failing(path):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(lock_lib, "_read", failing)
    assert lock.beat() is None
    lock.release()  # prints a warning, does not raise
    monkeypatch.setattr(lock_lib, "_read", real_read)
    assert (tmp_path / "lock.json").exists()  # not removed: it could not be read as ours
