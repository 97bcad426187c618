"""MATH-style problems from local JSONL, parquet, or a tensorflow-datasets directory.

Each record needs a question, under ``problem`` or ``question``, and a ground-truth answer, under
``answer`` or, failing that, ``solution`` (whose last ``\\boxed{...}`` is taken as the answer).
Other fields are kept in `MathProblem.metadata`.

tensorflow-datasets without TensorFlow: reading goes through ``tfds.builder_from_directory(dir)``
and ``builder.as_data_source(split)`` (array_record files, decoded with numpy), which needs no
TensorFlow. Writing (`write_tfds_dataset`) uses a ``GeneratorBasedBuilder`` with
``file_format="array_record"``, which also needs no TensorFlow, but tfds 4.9.10 imports the
``importlib_resources`` backport unconditionally while declaring it only for Python < 3.9; when that
package is missing, the standard library's ``importlib.resources`` is registered under its name (the
two agree on what tfds uses). ``tfds.dataset_builders.store_as_tfds_dataset`` cannot be used: it
checks ``isinstance(x, tf.data.Dataset)`` and so imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rl_fp16.rewards.math import extract_last_boxed

QUESTION_FIELDS = ("problem", "question")
ANSWER_FIELDS = ("answer",)
SOLUTION_FIELDS = ("solution",)
ID_FIELDS = ("unique_id", "id", "uid")
TFDS_INFO_FILE = "dataset_info.json"


@dataclasses.dataclass(frozen=True)
class MathProblem:
  """One MATH-style problem.

  Attributes:
    question: the problem statement (LaTeX allowed).
    answer: the ground-truth final answer, LaTeX without the box.
    solution: the worked solution when the source has one, else None.
    uid: an identifier: the source's id field, else "<file name>:<record index>".
    metadata: every other field of the source record (level, subject, pass_rate, ...).
  """

  question: str
  answer: str
  solution: str | None = None
  uid: str = ""
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _first_present(record: Mapping[str, Any], fields: Sequence[str]) -> str | None:
  for name in fields:
    value = record.get(name)
    if value is not None and str(value).strip():
      return name
  return None


def record_to_problem(record: Mapping[str, Any], *, source: str, index: int,
                      uid_prefix: str | None = None) -> MathProblem:
  """A `MathProblem` from one record; errors name `source`, the record and the missing field.

  The uid is the record's id field, else "<uid_prefix>:<index>" (prefix default: the file name).
  """
  q_field = _first_present(record, QUESTION_FIELDS)
  if q_field is None:
    raise ValueError(f"{source}: record {index} has no non-empty question field "
                     f"(looked for {list(QUESTION_FIELDS)}; fields present: {sorted(record)})")
  solution = record.get("solution")
  solution = None if solution is None else str(solution)
  a_field = _first_present(record, ANSWER_FIELDS)
  if a_field is not None:
    answer = str(record[a_field]).strip()
  elif solution is not None:
    answer = extract_last_boxed(solution)
    if not answer:
      raise ValueError(f"{source}: record {index} has no 'answer' field and its 'solution' has no "
                       "\\boxed{...} answer to take instead")
  else:
    raise ValueError(f"{source}: record {index} has neither an 'answer' nor a 'solution' field "
                     f"(fields present: {sorted(record)})")
  id_field = _first_present(record, ID_FIELDS)
  if id_field:
    uid = str(record[id_field])
  else:
    uid = f"{pathlib.Path(source).name if uid_prefix is None else uid_prefix}:{index}"
  used = {q_field, "answer", "solution", *([id_field] if id_field else [])}
  # None values are dropped: in parquet they are mostly fields other rows have.
  metadata = {k: v for k, v in record.items() if k not in used and v is not None}
  return MathProblem(question=str(record[q_field]), answer=answer, solution=solution, uid=uid,
                     metadata=metadata)


def records_to_problems(records: Iterable[Mapping[str, Any]], *, source: str,
                        limit: int | None = None,
                        uid_prefix: str | None = None) -> list[MathProblem]:
  problems = []
  for i, record in enumerate(records):
    if limit is not None and i >= limit:
      break
    if not isinstance(record, Mapping):
      raise ValueError(f"{source}: record {i} is a {type(record).__name__}, expected an object")
    problems.append(record_to_problem(record, source=source, index=i, uid_prefix=uid_prefix))
  return problems


def load_jsonl(path: str | os.PathLike[str], *, limit: int | None = None) -> list[MathProblem]:
  """Problems from a JSONL file, one JSON object a line (blank lines skipped)."""
  path = pathlib.Path(path)
  records = []
  with path.open(encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {line_no} is not valid JSON: {e}") from e
  return records_to_problems(records, source=str(path), limit=limit)


def load_parquet(path: str | os.PathLike[str], *, limit: int | None = None) -> list[MathProblem]:
  """Problems from a parquet file (one row per problem)."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  table = pq.read_table(path)
  if limit is not None:
    table = table.slice(0, limit)
  return records_to_problems(table.to_pylist(), source=str(path))


def _to_python(value: Any) -> Any:
  """numpy scalars/arrays and bytes (as tfds data sources return them) -> plain Python."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if hasattr(value, "tolist"):  # numpy scalar or array
    value = value.tolist()
    if isinstance(value, bytes):
      return value.decode("utf-8")
    if isinstance(value, list):
      return [_to_python(v) for v in value]
  if isinstance(value, Mapping):
    return {k: _to_python(v) for k, v in value.items()}
  return value


def _ensure_importlib_resources() -> None:
  """Lets tfds 4.9.10 import `importlib_resources` where only the stdlib module exists."""
  import importlib.resources  # pylint: disable=g-import-not-at-top
  import importlib.resources.abc  # pylint: disable=g-import-not-at-top,unused-import
  import importlib.util  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  if importlib.util.find_spec("importlib_resources") is None:
    sys.modules.setdefault("importlib_resources", importlib.resources)


def _find_tfds_dir(path: pathlib.Path) -> pathlib.Path:
  """The builder directory (the one holding dataset_info.json) at or one version below `path`."""
  if (path / TFDS_INFO_FILE).is_file():
    return path
  candidates = sorted(p.parent for p in path.glob(f"*/{TFDS_INFO_FILE}"))
  if len(candidates) == 1:
    return candidates[0]
  raise ValueError(f"{path}: not a tensorflow-datasets builder directory (no {TFDS_INFO_FILE} in "
                   f"it{'' if not candidates else f', and several versions: {candidates}'}); "
                   "pass the directory holding dataset_info.json")


def load_tfds(path: str | os.PathLike[str], *, split: str = "train",
              limit: int | None = None) -> list[MathProblem]:
  """Problems from a tensorflow-datasets builder directory, read without TensorFlow.

  Args:
    path: the directory holding `dataset_info.json` (e.g. `data_dir/name/1.0.0`), or its parent
      when that has a single version.
    split: the split to read.
    limit: read at most this many records.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder_dir = _find_tfds_dir(pathlib.Path(path))
  builder = tfds.builder_from_directory(str(builder_dir))
  splits = list(builder.info.splits.keys())
  if split not in splits:
    raise ValueError(f"{builder_dir}: no split {split!r}; available: {splits}")
  source = builder.as_data_source(split=split)
  n = len(source) if limit is None else min(limit, len(source))
  records = (_to_python(source[i]) for i in range(n))
  return records_to_problems(records, source=f"{builder_dir} split {split!r}",
                             uid_prefix=f"{builder.info.name}/{split}")


def load_math_problems(path: str | os.PathLike[str], *, split: str = "train",
                       limit: int | None = None) -> list[MathProblem]:
  """Problems from `path`: a `.jsonl` file, a `.parquet` file, or a tfds builder directory.

  `split` applies to tfds directories only.
  """
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"no such file or directory: {p}")
  if p.is_dir():
    return load_tfds(p, split=split, limit=limit)
  suffix = p.suffix.lower()
  if suffix in (".jsonl", ".json"):
    return load_jsonl(p, limit=limit)
  if suffix in (".parquet", ".pq"):
    return load_parquet(p, limit=limit)
  raise ValueError(f"{p}: unsupported file type {suffix!r}; allowed: .jsonl, .parquet, or a "
                   "tensorflow-datasets builder directory")


def _tfds_feature(name: str, value: Any):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if isinstance(value, str):
    return tfds.features.Text()
  if isinstance(value, bool):
    return tfds.features.Scalar(dtype=np.bool_)
  if isinstance(value, int):
    return tfds.features.Scalar(dtype=np.int64)
  if isinstance(value, float):
    return tfds.features.Scalar(dtype=np.float64)
  raise ValueError(f"field {name!r} has a {type(value).__name__} value; allowed field types: "
                   "str, int, float, bool")


def write_tfds_dataset(data_dir: str | os.PathLike[str],
                       splits: Mapping[str, Sequence[Mapping[str, Any]]], *,
                       name: str = "math_problems", version: str = "1.0.0") -> pathlib.Path:
  """Writes `splits` (split name -> records) as an array_record tfds dataset; no TensorFlow needed.

  All records must have the same fields, each a str, int, float or bool. Returns the builder
  directory (`data_dir/name/version`), which `load_tfds` and `tfds.builder_from_directory` read.
  """
  import types  # pylint: disable=g-import-not-at-top

  _ensure_importlib_resources()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if not splits:
    raise ValueError("splits is empty; pass at least one split name -> records")
  first = next((records[0] for records in splits.values() if records), None)
  if first is None:
    raise ValueError("every split is empty; a tfds dataset needs at least one record")
  fields = sorted(first)
  for split, records in splits.items():
    for i, record in enumerate(records):
      if sorted(record) != fields:
        raise ValueError(f"split {split!r} record {i} has fields {sorted(record)}; every record "
                         f"must have the fields of the first: {fields}")
  features = tfds.features.FeaturesDict({k: _tfds_feature(k, first[k]) for k in fields})

  def body(ns):
    ns["name"] = name
    ns["VERSION"] = tfds.core.Version(version)
    # disable_shuffling keeps the records' order.
    ns["_info"] = lambda self: tfds.core.DatasetInfo(builder=self, features=features,
                                                     disable_shuffling=True)
    ns["_split_generators"] = lambda self, dl_manager: {
        split: self._generate_examples(records) for split, records in splits.items()}
    ns["_generate_examples"] = lambda self, records: (
        (i, dict(record)) for i, record in enumerate(records))

  builder_cls = types.new_class("_InMemoryBuilder", (tfds.core.GeneratorBasedBuilder,),
                                {"skip_registration": True}, body)
  builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return pathlib.Path(str(builder.data_dir))
