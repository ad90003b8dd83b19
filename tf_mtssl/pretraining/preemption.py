"""Preemption: SIGTERM/SIGINT stop a run after a checkpoint (`StopRequest`), also when the input pipeline is
starved; the process then exits with PREEMPTED_EXIT_CODE ("restart me")."""

import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)

# Exit code of a run stopped by SIGTERM/SIGINT after saving a checkpoint: "restart me". Non-zero so
# that schedulers do not take the run as finished; 42 is the restart code TF's
# PreemptionCheckpointHandler uses by default outside Google Cloud.
PREEMPTED_EXIT_CODE = 42



class StopRequest:
  """SIGTERM/SIGINT -> finish the current step, save a checkpoint, stop (preemption).

  The flag is shared with every worker by the next step (see the module doc). While it is active it
  replaces TF's own C++ SIGTERM notifier, which MultiWorkerMirroredStrategy installs (and which
  otherwise swallows SIGTERM).

  A Python signal handler only runs once the main thread is back in the interpreter, which it is
  not while a step (or the input check) waits on a starved input pipeline. So the signal also wakes
  a watcher thread (`signal.set_wakeup_fd`) that sets the flag itself and, depending on `phase`:
    "inputs"   (nothing written yet): exits at once;
    "starting", "training": waits for the main thread to save and stop; if it is still in one of
               these phases max(grace_s, 3 x the longest step seen) after the signal, it exits
               without saving, naming the newest checkpoint the restart will resume from;
    "saving":  lets the checkpoint being written finish (the deadline moves on).
  A second signal exits at once. Exits run the `add_cleanup` callbacks first (the run lock) and use
  PREEMPTED_EXIT_CODE: the run is resumable from its newest checkpoint.
  """

  def __init__(self, grace_s: float = 60.0, describe_resume=lambda: ""):
    self.requested = False
    self.phase = "inputs"
    self.grace_s = float(grace_s)
    self._describe_resume = describe_resume
    self._previous = {}
    self._cleanups = []
    self._longest_step = 0.0
    self._wakeup = None       # (read fd, write fd, previous wakeup fd)
    self._watcher = None
    self._timer = None
    self._signals = 0

  def add_cleanup(self, fn) -> None:
    self._cleanups.append(fn)

  def step_done(self, seconds: float) -> None:
    self._longest_step = max(self._longest_step, seconds)

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handler, the run is simply not preemption-aware
        pass
    if self._previous:
      read_fd, write_fd = os.pipe()
      os.set_blocking(write_fd, False)
      self._wakeup = (read_fd, write_fd, signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False))
      self._watcher = threading.Thread(target=self._watch, name="signal-watcher", daemon=True)
      self._watcher.start()
    return self

  def _handle(self, signum, frame):
    del signum, frame  # the watcher thread logs and acts; here only the flag, for the main thread
    self.requested = True

  def _watch(self):
    read_fd = self._wakeup[0]
    while True:
      try:
        data = os.read(read_fd, 64)
      except OSError:
        return
      for signum in data:
        if signum == 0:  # __exit__ wakes the watcher to end it
          return
        if signum not in (signal.SIGTERM, signal.SIGINT):
          continue
        self._signals += 1
        self.requested = True
        if self._signals > 1:
          self._exit(f"Stopped at once by a second signal ({signum}) without saving.")
        if self.phase == "inputs":
          self._exit(f"Stopped by signal {signum} while reading the first examples: nothing was written.")
        wait_s = max(self.grace_s, 3.0 * self._longest_step)
        log.warning("Received signal %d: saving a checkpoint after this step and stopping (at the "
                    "latest in %.0f s; send it again to stop at once without saving).", signum, wait_s)
        self._timer = threading.Timer(wait_s, self._on_deadline, args=(signum, wait_s))
        self._timer.daemon = True
        self._timer.start()

  def _on_deadline(self, signum, wait_s):
    if self.phase == "saving":  # a checkpoint is being written: wait for it, then for the next step
      self._timer = threading.Timer(wait_s, self._on_deadline, args=(signum, wait_s))
      self._timer.daemon = True
      self._timer.start()
    elif self.phase in ("starting", "training"):
      self._exit(f"Stopped by signal {signum}: no step finished within {wait_s:.0f} s (the input "
                 f"pipeline is starved, or a step is that slow); exiting without a checkpoint."
                 f"{self._describe_resume()}")

  def _exit(self, message: str):
    for fn in self._cleanups:
      try:
        fn()
      except Exception:  # noqa: BLE001 - exiting anyway; the next start reports what is left
        pass
    print(message, file=sys.stderr, flush=True)
    os._exit(PREEMPTED_EXIT_CODE)

  def __exit__(self, *exc):
    self.phase = "done"  # a deadline timer still pending does nothing now
    if self._timer is not None:
      self._timer.cancel()
    if self._wakeup is not None:
      read_fd, write_fd, previous_fd = self._wakeup
      signal.set_wakeup_fd(previous_fd)
      os.write(write_fd, b"\0")
      self._watcher.join(timeout=5)
      os.close(read_fd)
      os.close(write_fd)
      self._wakeup = None
    for sig, handler in self._previous.items():
      # None: the previous handler was installed outside Python (TF's); the default is what is left.
      signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
