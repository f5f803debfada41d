"""How pgsage starts a Python process of its own (the query log worker, training runs, jobs).

`-P` (Python 3.11's "safe path") keeps the current directory off the child's `sys.path`. With
`python -m`, the directory pgsage was started in came first, and a folder there named like one
of our packages shadowed it: a model directory called `models` (the benchmark's is its working
directory's `models/`) holding `cost/` made `models.cost` an empty namespace package in the
child, so the log worker's cost server failed to import and served no predictions, and a
retraining run failed. The packages now come from the installed distribution (or PYTHONPATH).
"""

from __future__ import annotations

import sys

#: the interpreter and its flags, to put before `-m module ...` or a script
PYTHON: tuple[str, ...] = (sys.executable, "-P")
