"""`--dist loadgroup` that survives a crashed worker: the crash is one failed test, not a hang.

pytest-xdist 3.8's scheduler for `loadgroup` (its `LoadScopeScheduling`) mishandles a worker
that dies mid-run (a segfault in a C extension, an `os._exit`), and a CI run waited out its
whole time limit at 99% instead of reporting one red test:

- it puts the dead worker's whole workload back in the queue, the groups it had finished
  included; each is later sent as an empty batch that never completes, and the run waits
  for it at its end (pytest-xdist#1378, #1323);
- the replacement worker is given a single group, and a one-test group never starts: a
  worker runs a test only once it knows the next one, or that none comes (#1327);
- the test the worker died in, already reported failed, runs again on the replacement
  (#1371), and a test that always crashes spends every restart.

No released xdist has all three fixes; this subclass carries them until one does.
"""

from __future__ import annotations

from typing import Any

from xdist.scheduler import LoadGroupScheduling
from xdist.workermanage import WorkerController


class CrashSafeLoadGroupScheduling(LoadGroupScheduling):
    """xdist's `loadgroup` scheduler, with a dead worker's unfinished groups alone put back."""

    def remove_node(self, node: WorkerController) -> str | None:
        """Forget `node`; if it died with tests still to run, return the one it died in
        (xdist reports that one failed) and queue the rest of its unfinished groups."""
        workload = self.assigned_work.pop(node)
        unfinished = {scope: unit for scope, unit in workload.items() if not all(unit.values())}
        if not unfinished:
            return None
        # A worker runs its tests in the order they were sent: the first not done is the
        # one it died in.
        crashed = next(
            nodeid for unit in unfinished.values() for nodeid, done in unit.items() if not done
        )
        for scope, unit in unfinished.items():
            if crashed in unit:
                unit[crashed] = True
            if not all(unit.values()):
                self.workqueue[scope] = unit
        for other in self.assigned_work:
            self._reschedule(other)
        return crashed

    def _reschedule(self, node: WorkerController) -> None:
        super()._reschedule(node)
        # Only a replacement worker given a one-test group holds a single test: it is told
        # the next, or that none comes, else it waits for a second forever.
        if node.shutting_down or self._pending_of(self.assigned_work[node]) != 1:
            return
        if self.workqueue:
            self._assign_work_unit(node)
        else:
            node.shutdown()


def make_scheduler(config: Any, log: Any) -> CrashSafeLoadGroupScheduling | None:
    """The scheduler for `--dist loadgroup` (`make test`'s); xdist's own for any other."""
    if config.getvalue("dist") == "loadgroup":
        return CrashSafeLoadGroupScheduling(config, log)
    return None
