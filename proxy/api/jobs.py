"""Background jobs started over /api/v1 (training, data generation, ETL) and their outcomes.

A job is an asyncio task on the service's loop; heavy work runs in a child process (as
`proxy/retrain.py` does for training) so the relay never stalls. The table keeps the newest
`keep` jobs in memory: status is `running`, `succeeded` or `failed`, with the result or error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..child import PYTHON

#: what a child prints last on stderr is kept as the error (bounded)
MAX_ERROR_CHARS = 2_000


@dataclass
class Job:
    id: int
    kind: str
    target: str
    status: str = "running"
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    result: Any = None
    error: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        seconds = None
        if self.finished_at is not None:
            seconds = round((self.finished_at - self.started_at).total_seconds(), 3)
        return {
            "job_id": self.id,
            "kind": self.kind,
            "target": self.target,
            "status": self.status,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "seconds": seconds,
            "result": self.result,
            "error": self.error,
        }


class JobRunning(RuntimeError):
    def __init__(self, job: Job) -> None:
        super().__init__(f"a {job.kind} job for {job.target!r} is already running: {job.id}")
        self.job = job


class JobFailed(RuntimeError):
    """Work that ran but failed; `result` is kept on the job next to the message."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class Jobs:
    def __init__(self, keep: int = 200) -> None:
        self.keep = keep
        self._jobs: OrderedDict[int, Job] = OrderedDict()
        self._ids = itertools.count(1)

    def start(self, kind: str, target: str, work: Callable[[], Awaitable[Any]]) -> Job:
        """Run `work()` as a job; JobRunning if the same kind and target is still running."""
        for job in self._jobs.values():
            if job.kind == kind and job.target == target and job.status == "running":
                raise JobRunning(job)
        job = Job(next(self._ids), kind, target)
        self._jobs[job.id] = job
        while len(self._jobs) > self.keep:
            oldest = next(iter(self._jobs.values()))
            if oldest.status == "running":
                break
            self._jobs.popitem(last=False)
        job.task = asyncio.ensure_future(self._run(job, work))
        return job

    async def _run(self, job: Job, work: Callable[[], Awaitable[Any]]) -> None:
        try:
            job.result = await work()
            job.status = "succeeded"
        except asyncio.CancelledError:
            job.status, job.error = "failed", "cancelled"
            raise
        except JobFailed as exc:
            job.status, job.error, job.result = "failed", str(exc), exc.result
        except Exception as exc:
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        finally:
            job.finished_at = datetime.now(UTC)

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def list(self, kinds: tuple[str, ...] | None = None) -> list[Job]:
        jobs = [j for j in self._jobs.values() if kinds is None or j.kind in kinds]
        return sorted(jobs, key=lambda j: j.id, reverse=True)

    async def cancel_all(self) -> None:
        for job in self._jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await job.task


async def run_child(args: list[str], timeout: float) -> tuple[int, str, str]:
    """Run `python args...`; (return code, stdout, stderr). Killed when cancelled or late."""
    proc = await asyncio.create_subprocess_exec(
        *PYTHON, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (asyncio.CancelledError, TimeoutError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return int(proc.returncode or 0), out.decode(errors="replace"), err.decode(errors="replace")


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:MAX_ERROR_CHARS]


def json_output(out: str) -> Any:
    """The last line of a child's stdout that is JSON (None when there is none)."""
    for line in reversed(out.strip().splitlines()):
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(line)
    return None
