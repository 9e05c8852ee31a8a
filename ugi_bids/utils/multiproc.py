"""nipype's MultiProc plugin, made to notice a dead worker and to take its workers with it.

nipype's MultiProc waits forever when a worker process dies, as it does when the kernel's
out-of-memory killer sends it SIGKILL (nipy/nipype#2700): the task's future fails with
``BrokenProcessPool`` inside a done-callback that only logs it, so the scheduler polls, forever,
a task that never reports. On a cluster that burns the job's whole wall time. This subclass:

* turns that failure into the task's result: a traceback text that names the node, the probable
  cause (killed, likely out of memory) and the node's memory estimate, so nipype writes the usual
  crash file for every node that was running;
* then ends the remaining workers and raises :class:`DeadWorkerError` (a ``RuntimeError``, as
  nipype's own node failures are), so ``ugi-bids`` exits 1 within seconds;
* starts its workers with ``PR_SET_PDEATHSIG`` (Linux), so that they die with the main process
  when that is killed, instead of holding their memory forever.

Everything else is nipype's MultiProc unchanged.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from nipype.pipeline.plugins.multiproc import MultiProcPlugin as NipypeMultiProcPlugin
from nipype.pipeline.plugins.multiproc import process_initializer

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class DeadWorkerError(RuntimeError):
    """A MultiProc worker process died (killed) while it ran a node."""


def _worker_initializer(cwd: str, parent_pid: int) -> None:
    """nipype's initializer, and: die (SIGKILL) when the process that started us dies."""
    process_initializer(cwd)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # no prctl: workers may outlive a killed parent
            return
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)


def death_text(node, exitcodes: list, running: int = 1) -> str:
    """The crash-file text for ``node`` when the pool of workers died under it: ``exitcodes``
    of the pool's processes (negative: the signal that ended one), ``running`` nodes at the
    time (the pool cannot tell which worker ran which node)."""
    signals = sorted({-code for code in exitcodes if code is not None and code < 0})
    names = [signal.Signals(s).name for s in signals if s in signal.Signals._value2member_map_]
    how = f" by {'/'.join(names)}" if names else ""
    which = ("its worker process" if running <= 1 else
             f"a worker process (of the {running} running nodes' workers)")
    memory = getattr(node, "mem_gb", None)
    estimate = f" (the node was estimated at {memory:.1f} GB)" if memory is not None else ""
    return (f"ugi-bids: node {node.fullname} failed: {which} was killed{how} while it ran, most "
            f"likely by the kernel's out-of-memory killer{estimate}: give the run more memory "
            f"(--mem, or the job's request), or run fewer nodes at once (--nprocs)\n")


class MultiProcPlugin(NipypeMultiProcPlugin):
    """nipype's MultiProc with dead-worker detection and workers that die with the main process
    (see the module's docstring)."""

    def __init__(self, plugin_args=None):
        super().__init__(plugin_args=plugin_args)
        # nipype's pool, remade with our initializer (no worker has started yet)
        self.pool.shutdown(wait=True)
        self.pool = ProcessPoolExecutor(
            max_workers=self.processors, initializer=_worker_initializer,
            initargs=(self._cwd, os.getpid()),
            mp_context=mp.get_context(self.plugin_args.get("mp_context")))
        self._task_nodes: dict[int, object] = {}
        self._workers: dict = {}  # every worker process started (pid -> Process), for exit codes
        self._dead_nodes: list = []

    def _submit_job(self, node, updatehash=False):
        self._task_nodes[self._taskid + 1] = node
        taskid = super()._submit_job(node, updatehash=updatehash)
        self._workers.update(getattr(self.pool, "_processes", None) or {})
        return taskid

    def _dead_worker_result(self, taskid: int) -> dict:
        """The result of a task whose worker (or a sibling, taking the pool down) died."""
        node = self._task_nodes[taskid]
        if node not in self._dead_nodes:
            self._dead_nodes.append(node)
        deadline = time.monotonic() + 1.0  # the dead process may not be reaped yet
        while True:
            exitcodes = [process.exitcode for process in list(self._workers.values())]
            if any(code is not None and code < 0 for code in exitcodes) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return {"result": None, "taskid": taskid,
                "traceback": [death_text(node, exitcodes, running=len(self._task_obj))]}

    def _async_callback(self, args):
        try:
            result = args.result()
        except Exception:  # noqa: BLE001 - BrokenProcessPool: a worker died (or the pool broke)
            taskid = next((t for t, future in list(self._task_obj.items()) if future is args),
                          None)
            if taskid in self._task_nodes:
                self._taskresult[taskid] = self._dead_worker_result(taskid)
            return
        self._taskresult[result["taskid"]] = result

    def _send_procs_to_workers(self, updatehash=False, graph=None):
        if not self._dead_nodes:
            try:
                return super()._send_procs_to_workers(updatehash=updatehash, graph=graph)
            except BrokenProcessPool:  # a worker died; the running tasks' futures say which
                pass
        # Every running task fails with the pool: write their crash files, end the workers, stop.
        # (Read the futures themselves: their done-callbacks may not have run yet.)
        wait(list(self._task_obj.values()), timeout=10)
        for taskid, jobid in list(self.pending_tasks):
            future = self._task_obj.get(taskid)
            if future is not None and future.done() and future.exception() is not None:
                self._report_crash(self.procs[jobid], result=self._dead_worker_result(taskid))
        self._end_workers()
        names = ", ".join(sorted({node.fullname for node in self._dead_nodes})) or "a node"
        raise DeadWorkerError(
            f"a worker process was killed while it ran {names} (most likely out of memory: "
            f"give the run more memory with --mem, or run fewer nodes at once with --nprocs); "
            f"see the crash files")

    def _end_workers(self) -> None:
        for process in list((getattr(self.pool, "_processes", None) or {}).values()):
            if process.is_alive():
                process.kill()
        self.pool.shutdown(wait=False, cancel_futures=True)
