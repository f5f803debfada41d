"""Ctrl-C during the demo's simulated users is an interruption, whatever their cleanup raised."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import asyncio, os, signal, sys
from proxy.demo import _interruptible

def users():
    async def main():
        asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGINT)
        try:
            await asyncio.sleep(10)
        finally:  # what a user's cleanup met once pgsage serve had closed its connection
            raise RuntimeError("cannot perform operation: connection is closed")
    return asyncio.run(main())

try:
    _interruptible(users) if sys.argv[1] == "demo" else users()
except KeyboardInterrupt:
    print("interrupted")
except RuntimeError as exc:
    print("error:", exc)
"""


def _run(how: str) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT, how], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    return out.stdout.strip()


def test_a_cleanup_error_after_ctrl_c_still_reads_as_an_interruption() -> None:
    assert _run("demo") == "interrupted"


def test_without_it_asyncio_run_raises_the_cleanup_error() -> None:
    """Why the demo needs it: asyncio.run turns SIGINT into a cancellation, and an exception
    raised while the task is cancelled replaces the KeyboardInterrupt."""
    assert _run("plain") == "error: cannot perform operation: connection is closed"
