"""Pipeline stages: each module exposes Config-driven `plan`, `run_shard` and `main`."""
