"""The pre-registered long runs (docs/long_runs.md): `config` (the registered arms and engine
rule; `python -m launch.long_runs` runs them) and `report` (their registered outcomes)."""
