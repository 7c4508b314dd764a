"""Shadow testing: replay stored traffic against candidate models, and a replay server to stand in for them.

- `shadowjudge.shadow.engine`: `run_shadow(...) -> ShadowReport`, `summarize_run`, `build_request_body`.
- `shadowjudge.shadow.metrics`: `latency_percentiles`, `request_cost`, `cost_per_request`, `cost_per_accepted_answer`.
- `shadowjudge.shadow.replay_server`: `ReplayServer` (context manager), `replay_server_cli` (typer).
- `shadowjudge.shadow.loadtest`: `run_loadtest(...)`, `loadtest_cli` (typer).

Submodules are imported directly (nothing is re-exported here) so the replay server process stays light.
"""
