"""The benchmark suite (docs/performance.md): `benchmark` runs and times the sections, `report`
turns the measured figures into summaries, targets and tables, `config` is its config file and
`peers/` the TRL peer it is compared with."""
