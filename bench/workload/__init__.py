"""The workload simulator: simulated users, templates and time, with labelled anomalies.

`templates` (the queries and the data profile their parameters come from), `roles` (who runs
what, over which client path, when), `clock` (simulated time and the activity curve),
`anomalies` (the seeded schedule and its ground truth), `plan` (the deterministic sequence),
`runner` (asyncio clients over the wire) and `cli` (`pgsage workload run`).
"""
