"""The command line of an experiment module: `python -m MODULE --config=FILE.py --config.key=value`.

`run_main` defines the `--config` flag (an ml_collections config file), lists overrides of keys
the file lacks with the nearest key, checks the config with the module's `validate`, runs it, and
turns the errors a user can fix (a bad value, a run directory holding another config or held by
another process, unreadable checkpoints) into a message and an exit status instead of a
traceback.
"""

from __future__ import annotations

import difflib
import re
import sys
from typing import Any, Callable, Sequence

from rl_fp16.checkpoints.train_state import CheckpointsUnreadable
from rl_fp16.config_checks import ConfigError
from rl_fp16.run_config import ConfigMismatchError
from rl_fp16.run_lock import RunDirectoryLocked


def quiet_logs() -> None:
  """Keeps absl INFO chatter (orbax's per-save lines) out of the experiment's output."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)


# A config override on the command line: --config.key=value, --config.key or --noconfig.key.
_OVERRIDE = re.compile(r"-{1,2}(?:no)?config\.([^=]+)(?:=.*)?", re.DOTALL)


def _unknown_override(config, key: str) -> str | None:
  """What is wrong with the dotted `key` of `config`, or None when every part of it exists."""
  node = config
  parts = key.split(".")
  for depth, part in enumerate(parts):
    parent = ".".join(parts[:depth])
    if not hasattr(node, "keys"):
      return f"no such key; --config.{parent} is a value, not a group of keys"
    if part in node:
      node = node[part]
      continue
    keys = sorted(map(str, node.keys()))
    prefix = f"--config.{parent}." if parent else "--config."
    close = difflib.get_close_matches(part, keys, n=1)
    if close:
      return f"no such key; did you mean {prefix}{close[0]}?"
    where = f"the keys of --config.{parent}" if parent else "the keys"
    return f"no such key; {where} are: {', '.join(keys)}"
  return None


def _unknown_overrides(config, argv: Sequence[str]) -> dict[int, str]:
  """{index in argv: problem line} for each override of a key that `config` lacks."""
  found = {}
  for index, arg in enumerate(argv):
    match = _OVERRIDE.fullmatch(arg)
    problem = match and _unknown_override(config, match.group(1))
    if problem:
      found[index] = f"{arg}: {problem}"
  return found


def unknown_override_problems(config, argv: Sequence[str]) -> list[str]:
  """One line per command-line override in `argv` (`--config.key=value`, `--config.key`,
  `--noconfig.key`) whose key the ConfigDict `config` lacks: the argument as typed, then
  "no such key" with the nearest key (difflib), or the keys there are. Pure."""
  return list(_unknown_overrides(config, argv).values())


def _config_file_arg(argv: Sequence[str]) -> str | None:
  """The value of `--config=FILE` (or `--config FILE`) in `argv`, or None."""
  for index, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and index + 1 < len(argv):
      return argv[index + 1]
  return None


def _split_unknown_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(argv without the overrides of unknown keys, their problem lines). The keys are looked up
  in the config file named by `--config` as it is, before any override; when that file cannot be
  read, argv is returned whole (the flag parser then reports it)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  path = _config_file_arg(argv)
  if path is None:
    return list(argv), []
  only_file = [argv[0], f"--config={path}"]
  file_flags = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=file_flags, lock_config=False,
                                  sys_argv=only_file)
  try:
    file_flags(only_file)
    base = file_flags.config
  except Exception:  # pylint: disable=broad-except
    return list(argv), []
  if not isinstance(base, config_dict.ConfigDict):
    return list(argv), []
  unknown = _unknown_overrides(base, argv)
  return [arg for i, arg in enumerate(argv) if i not in unknown], list(unknown.values())


def run_main(run: Callable[[Any], Any], *, validate: Callable[[Any], Any],
             lock_config: bool = True) -> None:
  """An experiment module's entry point, called under `if __name__ == "__main__":`.

  Defines the required `--config` flag (an ml_collections config file; overrides as
  `--config.key=value`), checks the config with `validate` (raising `ConfigError`), then runs
  `run(config)` under absl with quiet logs. An override of a key the config file lacks
  (`--config.num_minibatch=4`) is listed with the nearest key, together with `validate`'s
  problems. A `ConfigError` (a bad value or key), a `ConfigMismatchError` (a run directory
  holding another config) or a `RunDirectoryLocked` (a run directory another process holds) ends
  the program with its message and exit status 2, without a traceback; `CheckpointsUnreadable`
  (no checkpoint of the run restores) with its message and status 1. Flags are defined here,
  not at import, so that importing an experiment module defines no flags.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  argv, unknown = _split_unknown_overrides(sys.argv)
  config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                  lock_config=lock_config, sys_argv=argv)
  flags.mark_flags_as_required(["config"])

  def main(unused_argv):
    del unused_argv
    quiet_logs()
    try:
      if unknown:
        problems = list(unknown)
        try:
          validate(flags.FLAGS.config)
        except ConfigError as e:
          problems += e.problems
        raise ConfigError.listing(problems)
      validate(flags.FLAGS.config)
      run(flags.FLAGS.config)
    except (ConfigError, ConfigMismatchError, RunDirectoryLocked) as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(2) from None
    except CheckpointsUnreadable as e:  # the run's data, not its config: status 1
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(1) from None

  app.run(main, argv=argv)
