"""Files: atomic writes (readers see the old file or the new one, never a partial write) and strict
JSON (`jsonable` turns configs, NumPy / JAX values and dtypes into JSON data; the non-finite floats
NaN, +inf and -inf are spelled "NaN", "Infinity" and "-Infinity", as in JavaScript and Python's
non-strict `json`)."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import os
import uuid
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

# JSON spellings of the non-finite floats (strict JSON has no NaN or Infinity).
_NONFINITE_TO_JSON = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_JSON_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically: a temp file in the same directory, then replace.

  Readers see either the old file or the new one, never a partial write. The parent directory is
  created if needed; the new file gets the usual permissions (0o666 minus the umask).
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp_path = os.path.join(
      directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
  fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise


def encode_float(value: float) -> float | str:
  """Returns `value`, or its string spelling ("NaN", "Infinity", "-Infinity") if not finite."""
  if math.isfinite(value):
    return value
  return _NONFINITE_TO_JSON[repr(value)]


def decode_float(value: Any) -> Any:
  """Inverse of `encode_float` for a metric value; None (JSON null) also reads as NaN."""
  if value is None:
    return math.nan
  if isinstance(value, str) and value in _JSON_TO_NONFINITE:
    return _JSON_TO_NONFINITE[value]
  return value



def jsonable(obj: Any) -> Any:
  """Converts a config-like object into plain JSON data (dict / list / str / number / None).

  Handles dataclasses, `ml_collections.ConfigDict` (and FieldReference), mappings, sequences and
  sets (-> list), NumPy and JAX scalars and arrays (-> numbers / nested lists), dtypes and scalar
  types such as `jnp.bfloat16` (-> "bfloat16"), enums (-> name), paths, datetimes, and classes or
  functions (-> "module.qualname"). Non-finite floats become "NaN" / "Infinity" / "-Infinity".
  Anything else is written as its repr(): config.json is a record for people and for `load_runs`,
  not a way to rebuild arbitrary objects.
  """
  if obj is None or isinstance(obj, (bool, str)):
    return obj
  if isinstance(obj, int):
    return int(obj)
  if isinstance(obj, float):
    return encode_float(float(obj))
  if isinstance(obj, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return jsonable(obj.to_dict())
  if isinstance(obj, ml_collections.FieldReference):
    return jsonable(obj.get())
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, Mapping):
    return {str(key): jsonable(value) for key, value in obj.items()}
  if isinstance(obj, enum.Enum):
    return obj.name
  if isinstance(obj, np.dtype):
    return obj.name
  if isinstance(obj, type):
    # NumPy scalar types (np.float32, ml_dtypes.bfloat16) and JAX's (jnp.float32, jnp.bfloat16).
    if issubclass(obj, np.generic):
      return np.dtype(obj).name
    if isinstance(getattr(obj, "dtype", None), np.dtype):
      return obj.dtype.name
    return f"{obj.__module__}.{obj.__qualname__}"
  if isinstance(obj, np.generic):
    if np.iscomplexobj(obj):
      return str(obj)
    item = obj.item()
    return jsonable(item if isinstance(item, (bool, int, float, str)) else float(obj))
  if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):  # NumPy and JAX arrays.
    array = np.asarray(obj)
    if array.ndim == 0:
      return jsonable(array[()])
    return [jsonable(item) for item in array]
  if isinstance(obj, (list, tuple)):
    return [jsonable(item) for item in obj]
  if isinstance(obj, (set, frozenset)):
    return [jsonable(item) for item in sorted(obj, key=repr)]
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  if isinstance(obj, (datetime.date, datetime.time)):
    return obj.isoformat()
  if callable(obj) and hasattr(obj, "__qualname__"):
    return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
  return repr(obj)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes `jsonable(obj)` to `path` as indented, strict JSON, atomically (`write_text_atomic`)."""
  text = json.dumps(jsonable(obj), indent=2, allow_nan=False)
  write_text_atomic(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
  """Reads a JSON file written by `write_json_atomic`; errors name the file."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no JSON file at {path!r}")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"corrupt JSON file {path!r}: {e}") from e

