"""MATH path: prompt templates, math-verify reward, JSONL / parquet / tfds loaders."""

import json
import sys
import threading

import pytest

from deps import require

from rl_fp16.data import math_data
from rl_fp16.data import perfectible
from rl_fp16.rewards import math as math_rewards

RECORDS = [
    {"problem": "What is $1/2$ as a fraction?", "answer": "\\frac{1}{2}", "level": "Level 1"},
    {"question": "Compute $2+3$.", "solution": "We add: $2+3=\\boxed{5}$.", "unique_id": "add/1"},
    {"problem": "Simplify $\\sqrt{8}$.",
     "solution": "First \\boxed{4\\cdot 2}, so $\\boxed{2\\sqrt{2}}$."},
]


# --- templates -------------------------------------------------------------------------------


def test_templates():
  q = "What is $\\frac{1}{2}+{x}$?"
  r1 = math_rewards.apply_template("r1_distill", q)
  assert r1 == ("<｜begin▁of▁sentence｜><｜User｜>" + q + "\nPlease reason step by step, and put "
                "your final answer within \\boxed{}.<｜Assistant｜><think>\n")
  qwen = math_rewards.apply_template("qwen_math", q)
  assert qwen == ("<|im_start|>system\nPlease reason step by step, and put your final answer "
                  "within \\boxed{}.<|im_end|>\n<|im_start|>user\n" + q
                  + "<|im_end|>\n<|im_start|>assistant\n")
  assert math_rewards.apply_template("plain", q) == f"Question: {q}\nAnswer:"
  assert math_rewards.template_names() == ["plain", "qwen_math", "r1_distill"]
  with pytest.raises(ValueError, match="'chatml'; allowed: plain, qwen_math, r1_distill"):
    math_rewards.apply_template("chatml", q)


# --- reward ----------------------------------------------------------------------------------


def test_extract_last_boxed():
  extract = math_rewards.extract_last_boxed
  assert extract("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
  assert extract("\\boxed{\\left\\{ 1, 2 \\right\\}}") == "\\left\\{ 1, 2 \\right\\}"
  assert extract("\\boxed{3} then cut \\boxed{\\frac{1}{") == "3"  # open box ignored
  assert extract("so the answer is \\boxed 7.") == "7"
  assert extract("\\fbox{9}") == "9"
  assert extract("no box here") is None


@pytest.mark.parametrize("response, reference, expected", [
    ("So $x = \\boxed{\\frac{1}{2}}$.", "0.5", 1.0),
    ("The answer is \\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("First \\boxed{3}, corrected: \\boxed{4}", "4", 1.0),  # last box counts
    ("First \\boxed{4}, corrected: \\boxed{3}", "4", 0.0),
    ("\\boxed{0.6}", "\\frac{1}{2}", 0.0),
    ("The answer is 1/2.", "\\frac{1}{2}", 0.0),  # no box
    ("\\boxed{}", "1", 0.0),
])
def test_math_reward(response, reference, expected):
  assert math_rewards.math_reward(response, reference, truncated=False) == expected


def test_math_reward_truncated_and_long():
  assert math_rewards.math_reward("\\boxed{5}", "5", truncated=True) == 0.0
  assert math_rewards.math_reward("\\boxed{" + "1+" * 600 + "1}", "1201", truncated=False,
                                  max_answer_chars=1000) == 0.0
  with pytest.raises(ValueError, match="reference_answer is empty"):
    math_rewards.math_reward("\\boxed{5}", " ", truncated=False)


def test_math_reward_outside_main_thread():
  results = []

  def work():
    try:
      results.append(math_rewards.math_reward("\\boxed{\\frac{2}{4}}", "0.5", truncated=False))
    except Exception as e:  # pylint: disable=broad-except
      results.append(e)

  t = threading.Thread(target=work)
  t.start()
  t.join()
  assert results == [1.0]


# --- loaders ---------------------------------------------------------------------------------


def _check_loaded(problems, source_name):
  assert [p.question for p in problems] == [
      RECORDS[0]["problem"], RECORDS[1]["question"], RECORDS[2]["problem"]]
  assert [p.answer for p in problems] == ["\\frac{1}{2}", "5", "2\\sqrt{2}"]
  assert problems[0].metadata == {"level": "Level 1"}
  assert problems[1].uid == "add/1"
  assert problems[2].uid == f"{source_name}:2"
  assert problems[1].solution == RECORDS[1]["solution"]


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def test_jsonl_loader(tmp_path):
  path = _write_jsonl(tmp_path / "math.jsonl", RECORDS)
  _check_loaded(math_data.load_math_problems(path), "math.jsonl")
  assert len(math_data.load_math_problems(path, limit=2)) == 2


def test_parquet_loader(tmp_path):
  pa = require("pyarrow")
  pq = require("pyarrow.parquet")
  # A parquet table has one schema: absent fields become nulls, which the loader skips.
  keys = ["problem", "question", "answer", "solution", "unique_id", "level"]
  table = pa.table({k: [r.get(k) for r in RECORDS] for k in keys})
  path = tmp_path / "math.parquet"
  pq.write_table(table, path)
  problems = math_data.load_math_problems(path)
  assert [p.answer for p in problems] == ["\\frac{1}{2}", "5", "2\\sqrt{2}"]
  assert problems[1].uid == "add/1" and problems[2].uid == "math.parquet:2"
  assert problems[0].metadata == {"level": "Level 1"} and problems[2].metadata == {}


@pytest.mark.parametrize("record, match", [
    ({"answer": "1"}, r"bad.jsonl: record 1 has no non-empty question field \(looked for "
                      r"\['problem', 'question'\]; fields present: \['answer'\]\)"),
    ({"problem": "p"}, "bad.jsonl: record 1 has neither an 'answer' nor a 'solution' field"),
    ({"problem": "p", "solution": "no box"}, "bad.jsonl: record 1 has no 'answer' field and its "
                                             "'solution' has no"),
])
def test_loader_errors_name_file_and_field(tmp_path, record, match):
  path = _write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], record])
  with pytest.raises(ValueError, match=match):
    math_data.load_math_problems(path)


def test_loader_path_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    math_data.load_math_problems(tmp_path / "nope.jsonl")
  (tmp_path / "x.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match="unsupported file type '.csv'"):
    math_data.load_math_problems(tmp_path / "x.csv")
  (tmp_path / "broken.jsonl").write_text('{"problem": "p", "answer": "1"}\n{oops\n')
  with pytest.raises(ValueError, match="broken.jsonl: line 2 is not valid JSON"):
    math_data.load_math_problems(tmp_path / "broken.jsonl")
  with pytest.raises(ValueError, match="not a tensorflow-datasets builder directory"):
    math_data.load_math_problems(tmp_path)


def test_tfds_write_and_read_without_tensorflow(tmp_path):
  require("tensorflow_datasets")
  train = [{"problem": r.get("problem", r.get("question")), "solution": r.get("solution", ""),
            "answer": r.get("answer", ""), "level": i} for i, r in enumerate(RECORDS)]
  builder_dir = math_data.write_tfds_dataset(
      tmp_path / "tfds", {"train": train, "test": train[:1]}, name="tiny_math")
  assert builder_dir == tmp_path / "tfds" / "tiny_math" / "1.0.0"
  assert any(p.name.startswith("tiny_math-train.array_record") for p in builder_dir.iterdir())
  problems = math_data.load_math_problems(builder_dir)
  assert [p.question for p in problems] == [t["problem"] for t in train]  # order kept
  assert [p.answer for p in problems] == ["\\frac{1}{2}", "5", "2\\sqrt{2}"]
  assert [p.metadata["level"] for p in problems] == [0, 1, 2]
  assert problems[0].uid == "tiny_math/train:0"
  # The parent of a single version works too, and splits are selectable.
  assert len(math_data.load_math_problems(tmp_path / "tfds" / "tiny_math", split="test")) == 1
  with pytest.raises(ValueError, match="no split 'validation'; available"):
    math_data.load_tfds(builder_dir, split="validation")
  assert "tensorflow" not in sys.modules


# --- perfectible subset on MATH-style problems -----------------------------------------------


def test_math_perfectible_round_trip(tmp_path):
  problems = math_data.load_math_problems(_write_jsonl(tmp_path / "math.jsonl", RECORDS))
  right = {p.question: f"so \\boxed{{{p.answer}}}" for p in problems}
  n_right = {p.question: i + 1 for i, p in enumerate(problems)}  # 1, 2, 3 of 4

  def sample_fn(prompts, k):
    out = []
    for prompt in prompts:
      q = prompt[len("Question: "):-len("\nAnswer:")]
      out.append([right[q] if j < n_right[q] else "\\boxed{-1}" for j in range(k)])
    return out

  def score_fn(problem, response):
    return math_rewards.math_reward(response, problem.answer, truncated=False)

  subset, rates = perfectible.build_perfectible_subset(
      problems, sample_fn, score_fn, k=4, low=0.5, high=0.75,
      prompt_fn=lambda p: math_rewards.apply_template("plain", p.question))
  assert [p.uid for p in subset] == [problems[1].uid, problems[2].uid] and rates == [0.5, 0.75]
  path = perfectible.write_subset(tmp_path / "perfectible.jsonl", subset, rates)
  reloaded = math_data.load_math_problems(path)
  assert [(p.question, p.answer, p.uid) for p in reloaded] == [
      (p.question, p.answer, p.uid) for p in subset]
  assert [p.metadata["pass_rate"] for p in reloaded] == [0.5, 0.75]
