"""The significand-bits dose-response (docs/dose_response.md): `config` (its arms and `sweep()`),
`analysis` (the registered outcomes per arm) and `report` (keep the finished arms, write the
report and its figures)."""
