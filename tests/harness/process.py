"""A child process owned by a test, with its output in a log file and a reliable stop.

Daemons write to a file rather than a pipe: a pipe nobody drains fills up and blocks the
daemon, and a file can be read after the fact when a test fails.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol


class ManagedProcess:
    """Start ``argv`` with stdout+stderr appended to ``log_dir/<name>.log``.

    With ``stdout_path`` set, stdout goes there instead (the registry writes its access log
    to stdout and its application log to stderr; keeping them apart makes counting easy).

    ``stop()`` sends SIGTERM, waits ``term_timeout`` seconds, then SIGKILLs; it is
    idempotent so fixtures may call it unconditionally at teardown.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_dir: Path,
        name: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout_path: Path | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._env = dict(os.environ if env is None else env)
        self._cwd = cwd
        self.stdout_path = stdout_path
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Launch the process (again, if it was stopped). The log file is appended to."""
        if self.running:
            raise RuntimeError(f"{self.name} already running (pid {self.pid})")
        out_path = self.stdout_path or self.log_path
        # Append mode (O_APPEND): a restart keeps earlier output, and the file may be
        # truncated by the test while the daemon writes without leaving a hole.
        with self.log_path.open("ab") as log, out_path.open("ab") as out:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                env=self._env,
                cwd=self._cwd,
                # Own session: a Ctrl-C aimed at pytest must not kill daemons before teardown.
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return None if self._popen is None else self._popen.pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def returncode(self) -> int | None:
        """Exit status if the process has ended, else ``None``."""
        return None if self._popen is None else self._popen.poll()

    def log_text(self) -> str:
        """Everything the process wrote so far (for assertions and failure messages)."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def ensure_running(self) -> None:
        """Raise with the log tail if the process died, e.g. while waiting for readiness."""
        code = self.returncode()
        if self._popen is not None and code is not None:
            tail = self.log_text()[-4000:]
            raise RuntimeError(f"{self.name} exited with {code}; log tail:\n{tail}")

    def stop(self, term_timeout: float = 10.0) -> None:
        """Terminate, then kill after ``term_timeout``; safe to call repeatedly."""
        popen = self._popen
        if popen is None:
            return
        if popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(timeout=term_timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=term_timeout)
        self._popen = None

    def __enter__(self) -> ManagedProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class Stoppable(Protocol):
    def stop(self) -> None: ...


def stop_all(stoppables: Iterable[Stoppable]) -> None:
    """Stop every one, last started first; one failing does not leave the others running.

    The first failure is raised once all were asked to stop.
    """
    errors: list[Exception] = []
    for stoppable in reversed(list(stoppables)):
        try:
            stoppable.stop()
        except Exception as exc:  # keep stopping the others
            errors.append(exc)
    if errors:
        raise errors[0]
