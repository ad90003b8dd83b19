"""One pretraining process per run directory: `run.lock` in --model_dir names its holder.

A second process on the same directory fails at once with a `RunLockedError` naming the holder
(host, PID, start time, command). A lock left behind by a process that can no longer release it
(SIGKILL, a crash, a power cut) never blocks a restart for long:

  - same host: the lock is also an exclusive `flock` on the file, which the kernel drops when its
    process dies, so a free flock means the holder is gone (the recorded PID is checked as well, for
    file systems without flock; a PID reused after a reboot is told apart by the boot id and the
    process start time). The restart takes the lock over and says whose it was.
  - another host (a shared --model_dir on NFS): the holder refreshes the file's modification time
    every `heartbeat_s` (30 s); a lock whose heartbeat is older than `stale_after_s` (300 s, ten
    missed beats, far above NFS attribute-cache delays and clock skew between hosts) is taken over.
    Until then the message says when it will be, or that deleting run.lock frees the directory.

Takeover between two processes of different hosts within the same instant is not excluded (NFS
gives no atomic compare-and-swap of file contents); restarts of one run are not started that way.
"""

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Optional

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RunLockedError(ValueError):
  """The run directory is held by another live process; the message names it."""


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _process_start(pid: int) -> str:
  """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), '' if unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return ""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def describe_holder(holder: dict) -> str:
  return (f"PID {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')}; "
          f"command: {holder.get('command', '?')})")


class RunLock:
  """`with RunLock(model_dir):` holds the directory for one process; see the module docstring.

  `acquire()` returns a notice when it took over a lock left by a dead process (also logged), else
  None; it raises RunLockedError when a live process holds the directory.
  """

  def __init__(self, model_dir: str, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
    if not 0 < heartbeat_s < stale_after_s:
      raise ValueError(f"Need 0 < heartbeat_s < stale_after_s, got {heartbeat_s}, {stale_after_s}")
    self.model_dir, self.path = model_dir, os.path.join(model_dir, LOCK_FILE)
    self.heartbeat_s, self.stale_after_s = float(heartbeat_s), float(stale_after_s)
    self._fd: Optional[int] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  # ---- holder record ------------------------------------------------------------------------------
  def _record(self) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
            "process_start": _process_start(os.getpid()),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}

  def _read(self, fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
      holder = json.loads(raw) if raw.strip() else {}
    except ValueError:
      holder = {"unparsable": raw[:200].decode("utf-8", "replace")}
    return holder if isinstance(holder, dict) else {}

  def _why_stale(self, holder: dict, age_s: float) -> Optional[str]:
    """Why the recorded holder can no longer hold the lock, or None if it may be alive."""
    if not holder:
      return "empty lock file"
    if "unparsable" in holder:
      return "unreadable lock file"
    if holder.get("host") == socket.gethostname():
      pid = int(holder.get("pid", -1))
      if holder.get("boot_id") and holder.get("boot_id") != _boot_id():
        return f"host {holder['host']} rebooted since"
      if not _alive(pid):
        return f"PID {pid} is no longer running"
      if holder.get("process_start") and holder["process_start"] != _process_start(pid):
        return f"PID {pid} now belongs to another process"
      return None
    if age_s > self.stale_after_s:
      return f"its heartbeat stopped {age_s:.0f} s ago (> {self.stale_after_s:g} s)"
    return None

  # ---- acquire / release ----------------------------------------------------------------------------
  def check_free(self) -> None:
    """Raises RunLockedError if a live process holds the directory; reads only (writes nothing), so
    a second process fails at once, before its slow start-up (`acquire` still decides later)."""
    try:
      fd = os.open(self.path, os.O_RDONLY)
    except FileNotFoundError:
      return
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
      except OSError:
        raise RunLockedError(self._held_message(self._read(fd), None)) from None
      holder = self._read(fd)
      age_s = time.time() - os.fstat(fd).st_mtime
      if self._why_stale(holder, age_s) is None:
        raise RunLockedError(self._held_message(holder, age_s))
    finally:
      os.close(fd)  # also drops the shared flock

  def acquire(self) -> Optional[str]:
    os.makedirs(self.model_dir, exist_ok=True)
    for _ in range(100):  # retried only when a releasing holder unlinked the file under us
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      if not self._flock_exclusive(fd):  # a live process of this host (or of an NFS client) holds it
        holder = self._read(fd)
        os.close(fd)
        raise RunLockedError(self._held_message(holder, None))
      try:
        same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same_file = False
      if same_file:
        break
      os.close(fd)
    else:
      raise RuntimeError(f"Could not lock {self.path}: it keeps being replaced")
    holder = self._read(fd)
    age_s = time.time() - os.fstat(fd).st_mtime
    why = self._why_stale(holder, age_s)
    if why is None:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)
      raise RunLockedError(self._held_message(holder, age_s))
    notice = None
    if holder and why != "empty lock file":
      notice = (f"Took over {self.path} from {describe_holder(holder)}: {why}. Resuming from its "
                "newest checkpoint.")
      log.warning(notice)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(self._record(), sort_keys=True).encode())
    os.fsync(fd)
    self._fd = fd
    self._stop.clear()
    self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
    self._thread.start()
    return notice

  @staticmethod
  def _flock_exclusive(fd: int, tries: int = 10) -> bool:
    """Non-blocking exclusive flock, retried briefly: `check_free` of another starting process
    holds a shared one for a moment."""
    for attempt in range(tries):
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
      except OSError:
        if attempt + 1 < tries:
          time.sleep(0.05)
    return False

  def _held_message(self, holder: dict, age_s: Optional[float]) -> str:
    if holder.get("host") not in (None, socket.gethostname()) and age_s is not None:
      when = (f"it counts as abandoned once its heartbeat (every {self.heartbeat_s:g} s) is "
              f"{self.stale_after_s:g} s old, in {max(0.0, self.stale_after_s - age_s):.0f} s")
    else:
      when = "stop that process first"
    return (f"--model_dir {self.model_dir} is in use by {describe_holder(holder)}: {when}, or use "
            f"another --model_dir (if that process is surely gone, delete {self.path}).")

  def _heartbeat(self):
    while not self._stop.wait(self.heartbeat_s):
      try:
        os.utime(self.path)
      except OSError as e:  # a vanished file or a lost NFS mount: the next start decides
        if not self._stop.is_set():  # (not the file `release` has just removed)
          log.warning("Could not refresh %s: %s", self.path, e)

  def release(self) -> None:
    """Frees the directory (idempotent). Safe from any thread."""
    fd, self._fd = self._fd, None
    if fd is None:
      return
    self._stop.set()
    try:
      if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
        os.unlink(self.path)  # while still holding the flock: a waiter re-checks the inode
    except OSError:
      pass
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
