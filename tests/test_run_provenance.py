"""A run directory holds one experiment; a resume may not change what it is."""

import json
import os

import ml_collections
import pytest

from rl_fp16 import fileio, results, run_config


def test_config_differences_lists_changed_added_and_removed_keys():
  old = {"learning_rate": 1e-4, "steps": 2, "loss": {"clip_eps_low": 0.2, "aggregation": "tm"},
         "targets": ["q", "k"], "gone": 1}
  new = ml_collections.ConfigDict({
      "learning_rate": 1e-2, "steps": 3, "loss": {"clip_eps_low": 0.2, "aggregation": "tsn"},
      "targets": ("q", "k"), "added": True})
  diffs = run_config.config_differences(old, new, allowed=("steps",))
  assert [(d.key, d.old, d.new) for d in diffs] == [
      ("added", run_config.MISSING, True), ("gone", 1, run_config.MISSING),
      ("learning_rate", 1e-4, 1e-2), ("loss.aggregation", "tm", "tsn")]
  assert str(diffs[2]) == "learning_rate: 0.0001 -> 0.01"
  # A tuple and the list config.json stores are equal, so are 1 and 1.0; True and 1 are not.
  assert run_config.config_differences({"a": [1, 2], "b": 1, "c": 1}, {"a": (1, 2), "b": 1.0,
                                                                        "c": True}) == [
      run_config.ConfigDifference("c", 1, True)]
  # An allowed entry covers the keys under it.
  assert not run_config.config_differences({"logging": {"level": "INFO"}},
                                            {"logging": {"level": "DEBUG"}}, allowed=("logging",))


def test_run_writer_refuses_another_config_and_never_rewrites_config_json(tmp_path):
  run_dir = tmp_path / "run"
  with results.RunWriter(run_dir, {"learning_rate": 1e-4, "steps": 2}) as writer:
    writer.write(1, {"reward/mean": 0.5})
  stored = (run_dir / "config.json").read_text()
  with pytest.raises(ValueError, match=r"(?s)learning_rate: 0.0001 -> 0.01.*output_dir"):
    results.RunWriter(run_dir, {"learning_rate": 1e-2, "steps": 2}, resume=True)
  assert (run_dir / "config.json").read_text() == stored
  # Only allowed keys changed: the resume goes on, config.json stays, the change is recorded.
  with results.RunWriter(run_dir, {"learning_rate": 1e-4, "steps": 3}, resume=True,
                         resume_step=2) as writer:
    writer.write(2, {"reward/mean": 0.6})
  assert (run_dir / "config.json").read_text() == stored
  [record] = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
  assert record["changed"] == {"steps": [2, 3]} and record["resume_step"] == 2
  assert record["last_logged_step"] == 1


def _tiny_config(model_dir, out_dir, **overrides):
  from experiments.configs import sanity  # pylint: disable=g-import-not-at-top
  config = sanity.get_config()
  config.update(dict(model=model_dir, engine="jax", precision="fp16", steps=1, prompts_per_step=2,
                     samples_per_prompt=2, num_minibatches=1, max_new_tokens=16,
                     checkpoint_every=1, learning_rate=1e-3, output_dir=str(out_dir)))
  config.update(overrides)
  return config


def test_rerun_into_a_run_directory_with_another_config_is_refused(tiny_task_model_dir, tmp_path):
  from experiments import rl  # pylint: disable=g-import-not-at-top

  out = tmp_path / "run"
  rl.run(_tiny_config(tiny_task_model_dir, out))
  config_json = (out / "config.json").read_text()
  metrics = (out / "metrics.jsonl").read_text()

  # The reported case: other learning rate and temperature. Refused, naming both, before any step.
  with pytest.raises(ValueError) as error:
    rl.run(_tiny_config(tiny_task_model_dir, out, learning_rate=1e-2, temperature=0.7))
  assert type(error.value).__name__ == "ConfigMismatchError", repr(error.value)
  message = str(error.value)
  assert "learning_rate: 0.001 -> 0.01" in message and "temperature: 1.0 -> 0.7" in message
  assert "--config.output_dir" in message
  # Another algorithm with more steps; another precision (used to be blamed on LoRA).
  with pytest.raises(ValueError, match="algorithm: \"grpo\" -> \"gspo\""):
    rl.run(_tiny_config(tiny_task_model_dir, out, algorithm="gspo", steps=2))
  with pytest.raises(ValueError, match="precision: \"fp16\" -> \"bf16\"") as e:
    rl.run(_tiny_config(tiny_task_model_dir, out, precision="bf16"))
  assert "LoRA" not in str(e.value)
  assert (out / "config.json").read_text() == config_json
  assert (out / "metrics.jsonl").read_text() == metrics
  assert not (out / "resumes.jsonl").exists()

  # Allowed keys (more steps, vLLM's log level) resume the run; config.json keeps the settings
  # that produced the steps on disk and resumes.jsonl records the change.
  summary = rl.run(_tiny_config(tiny_task_model_dir, out, steps=2, vllm_log_level="INFO"))
  assert list(results.read_metrics(summary["run_dir"])["step"]) == [1, 2]
  assert (out / "config.json").read_text() == config_json
  [record] = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
  assert record["changed"] == {"steps": [1, 2], "vllm_log_level": ["WARNING", "INFO"]}


def test_sanity_compare_checks_every_run_directory_first(tiny_task_model_dir, tmp_path):
  """experiments.sanity refuses a clash in its second run's directory before the first runs."""
  from experiments import sanity  # pylint: disable=g-import-not-at-top

  fp16_dir = tmp_path / "fp16"
  fileio.write_json_atomic(fp16_dir / "config.json", _tiny_config(tiny_task_model_dir, fp16_dir))
  config = _tiny_config(tiny_task_model_dir, tmp_path / "{precision}", learning_rate=5e-3)
  with pytest.raises(ValueError, match="learning_rate: 0.001 -> 0.005"):
    sanity.compare(config, ["bf16", "fp16"])
  assert not os.path.exists(tmp_path / "bf16")
