"""The accelerator check (docs/gpu.md): `gpu_check` runs the stages, `config` is its config."""
