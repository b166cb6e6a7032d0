"""What the test servers started as subprocesses (redis-server, Janus) share: whether they run,
their PID, and stopping them by it (SIGTERM, then SIGKILL after 10 s)."""

from __future__ import annotations

import os
import signal
import subprocess
from abc import ABC, abstractmethod


class ServerProcess(ABC):
    """Mixed into a server's dataclass, which holds ``process`` and says how to ``start``."""

    process: subprocess.Popen[bytes] | None

    @abstractmethod
    def start(self) -> None:
        """Start the server and wait until it answers."""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop_process(self) -> None:
        """Stop the server by its PID; nothing when it is not running."""
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def ensure_running(self) -> None:
        if not self.running:
            self.start()
