"""`scripts/test --quick` is in-process only: while this guard is on, starting a process of any kind (Azurite, a
simulated region, a gateway, `python -m shared.admin`, node) is refused where it is asked for, and recorded, so the test
that tried fails even if it caught the refusal. Such a test belongs to the full run: mark it `@pytest.mark.process`
(or `e2e`), or use the `azurite` fixture, which marks it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import Any

MARK_HINT = "mark it @pytest.mark.process (or e2e) so that `scripts/test --quick` leaves it out"


class ProcessRefused(RuntimeError):
    """Raised where a process would have started under `--quick`."""


class Guard:
    """Refuses every way this interpreter starts a process (subprocess, and so asyncio's subprocesses and every
    helper in tools/stack.py; os.fork, os.posix_spawn, os.system, os.exec*), recording what was asked for."""

    def __init__(self) -> None:
        self.refused: list[str] = []
        self._undo: list[Callable[[], None]] = []

    def _refuse(self, what: str) -> ProcessRefused:
        self.refused.append(what)
        return ProcessRefused(f"scripts/test --quick runs in-process only, and this starts a process ({what}): {MARK_HINT}")

    def install(self) -> None:
        guard = self

        def execute_child(popen: subprocess.Popen[Any], args: Any, *rest: Any, **options: Any) -> None:
            raise guard._refuse(f"subprocess {args!r}"[:300])

        self._patch(subprocess.Popen, "_execute_child", execute_child)
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "execv", "execve", "execvp", "execvpe",
                     "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"):
            if hasattr(os, name):
                self._patch(os, name, self._refuser(f"os.{name}"))

    def _refuser(self, what: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise self._refuse(f"{what} {args[:1]!r}"[:300])

        return refuse

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, replacement)
        self._undo.append(lambda: setattr(owner, name, original))

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def take(self) -> list[str]:
        """What was refused since the last call."""
        refused, self.refused = self.refused, []
        return refused
