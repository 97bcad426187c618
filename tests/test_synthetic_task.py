"""Synthetic chained-arithmetic task: generator, verifier, lengths; perfectible subset on it."""

import dataclasses
import json

import numpy as np
import pytest

from rl_fp16.data import perfectible
from rl_fp16.data import synthetic
from rl_fp16.data import tokenizer as tok_lib


@pytest.fixture(scope="module")
def tokenizer():
  return tok_lib.build_tokenizer()


def test_generator_is_deterministic_and_seed_dependent():
  config = synthetic.SyntheticTaskConfig(seed=3)
  a = synthetic.generate_problems(config, 50)
  b = synthetic.generate_problems(config, 50)
  assert a == b
  assert synthetic.generate_problems(config, 50, seed=3) == a
  other = synthetic.generate_problems(config, 50, seed=4)
  assert [p.prompt for p in other] != [p.prompt for p in a]
  # A prefix does not depend on how many problems were asked for.
  assert synthetic.generate_problems(config, 10) == a[:10]
  assert len({p.prompt for p in a}) == 50


def test_problem_text_format():
  p = synthetic.make_problem([3, 5, 2, 8, 1], "++++")
  assert p.prompt == "q: 3+5+2+8+1\n"
  assert p.solution == "3+5=8; 8+2=10; 10+8=18; 18+1=19\na: 19"
  assert p.answer == "19"
  m = synthetic.make_problem([7, 6, 4], "*-", modulus=10)
  assert m.solution == "7*6=2; 2-4=8\na: 8"


@pytest.mark.parametrize("config", [
    synthetic.SyntheticTaskConfig(),
    synthetic.SyntheticTaskConfig(operators="+-", seed=1),
    synthetic.SyntheticTaskConfig(operators="+-*", modulus=10, seed=2),
])
def test_solutions_are_correct_and_accepted(config):
  for p in synthetic.generate_problems(config, 100):
    value = p.terms[0]
    for op, t in zip(p.operators, p.terms[1:]):
      value = {"+": value + t, "-": value - t, "*": value * t}[op]
      if config.modulus:
        value %= config.modulus
    assert p.answer == str(value)
    assert config.min_terms <= len(p.terms) <= config.max_terms
    assert all(0 <= t <= config.max_operand for t in p.terms)
    assert synthetic.score(p, p.solution) == 1.0
    assert synthetic.score(p.answer, p.solution) == 1.0
    assert synthetic.score(int(p.answer), p.solution + "\n") == 1.0


def test_verifier_rejects_wrong_missing_and_truncated():
  p = synthetic.make_problem([3, 5, 2, 8, 1], "++++")
  steps = p.solution.split("\n")[0]
  assert synthetic.score(p, steps + "\na: 18") == 0.0  # wrong answer
  assert synthetic.score(p, steps) == 0.0  # no final-answer marker
  assert synthetic.score(p, "19") == 0.0  # bare number, no marker
  assert synthetic.score(p, p.solution[:-1]) == 0.0  # cut inside the answer ("a: 1")
  assert synthetic.score(p, p.solution[:20]) == 0.0  # cut mid-steps
  assert synthetic.score(p, p.solution, truncated=True) == 0.0  # hit the length limit
  assert synthetic.score(p, p.solution + "; 19+1=20") == 0.0  # junk after the answer
  assert synthetic.score(p, "") == 0.0
  # Only the final line counts, whatever the steps say.
  assert synthetic.score(p, "a: 19") == 1.0
  assert synthetic.extract_answer("x\na: -12 \n") == "-12"
  with pytest.raises(ValueError, match="reference answer 'x' is not an integer"):
    synthetic.score("x", "a: 1")


def test_response_lengths_in_tokens(tokenizer):
  assert set(synthetic.ALPHABET) <= set(tokenizer.alphabet)
  default = synthetic.generate_problems(synthetic.SyntheticTaskConfig(), 300)
  lengths = np.array([len(tokenizer.encode(p.solution, add_eos=True)) for p in default])
  assert 90 <= lengths.min() and lengths.max() <= 300, (lengths.min(), lengths.max())
  assert 130 <= lengths.mean() <= 220
  long = synthetic.generate_problems(
      synthetic.SyntheticTaskConfig(min_terms=90, max_terms=95), 20)
  long_lengths = [len(tokenizer.encode(p.solution, add_eos=True)) for p in long]
  assert 850 <= min(long_lengths) and max(long_lengths) <= 1100, long_lengths
  # Length grows with the number of terms.
  short = synthetic.generate_problems(synthetic.SyntheticTaskConfig(min_terms=3, max_terms=3), 20)
  assert max(len(p.solution) for p in short) < lengths.min()


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_terms=1), "min_terms=1"),
    (dict(min_terms=10, max_terms=5), "max_terms=5"),
    (dict(operators="+/"), "operators='\\+/'"),
    (dict(operators="*"), "modulus"),
    (dict(max_operand=0), "max_operand=0"),
    (dict(modulus=1), "modulus=1"),
])
def test_config_errors_name_the_bad_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    synthetic.SyntheticTaskConfig(**kwargs)


def _fake_sampler(pass_counts):
  """Deterministic sampler: prompt i gets pass_counts[prompt] correct answers out of k."""

  def sample_fn(prompts, k):
    out = []
    for prompt in prompts:
      n_ok = pass_counts[prompt]
      out.append([f"a: {'ok' if j < n_ok else 'bad'}" for j in range(k)])
    return out

  return sample_fn


def _fake_score(problem, response):
  del problem
  return 1.0 if response.endswith("ok") else 0.0


def test_perfectible_subset_keeps_pass_rates_in_range(tmp_path):
  problems = synthetic.generate_problems(synthetic.SyntheticTaskConfig(min_terms=2, max_terms=4),
                                         11, seed=7)
  k = 10
  counts = {p.prompt: i for i, p in enumerate(problems)}  # pass rates 0.0, 0.1, ..., 1.0
  calls = []

  def sample_fn(prompts, n):
    calls.append(len(prompts))
    return _fake_sampler(counts)(prompts, n)

  subset, rates = perfectible.build_perfectible_subset(problems, sample_fn, _fake_score, k=k,
                                                       batch_size=4)
  assert calls == [4, 4, 3]
  assert subset == problems[2:9]
  np.testing.assert_allclose(rates, [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
  all_rates = perfectible.compute_pass_rates(problems, _fake_sampler(counts), _fake_score, k=k)
  np.testing.assert_allclose(all_rates, np.arange(11) / 10)

  path = perfectible.write_subset(tmp_path / "sub" / "perfectible.jsonl", subset, rates)
  assert sorted(p.name for p in path.parent.iterdir()) == ["perfectible.jsonl"]  # no temp file
  records, read_rates = perfectible.read_subset(path)
  assert read_rates == pytest.approx(rates)
  assert [r["prompt"] for r in records] == [p.prompt for p in subset]
  assert records[0]["terms"] == list(subset[0].terms)
  first = json.loads(path.read_text().splitlines()[0])
  assert set(first) == {f.name for f in dataclasses.fields(synthetic.Problem)} | {"pass_rate"}


def test_perfectible_with_real_verifier_and_errors():
  problems = synthetic.generate_problems(synthetic.SyntheticTaskConfig(min_terms=2, max_terms=3), 3)

  def sample_fn(prompts, k):  # Problem i: i + 1 correct responses of 4.
    by_prompt = {p.prompt: (i, p) for i, p in enumerate(problems)}
    out = []
    for prompt in prompts:
      i, p = by_prompt[prompt]
      out.append([p.solution if j <= i else "a: -1" for j in range(k)])
    return out

  subset, rates = perfectible.build_perfectible_subset(problems, sample_fn, synthetic.score, k=4,
                                                       low=0.25, high=0.5)
  assert subset == problems[:2] and rates == [0.25, 0.5]
  with pytest.raises(ValueError, match="expected k=4"):
    perfectible.compute_pass_rates(problems, lambda ps, k: [["x"]] * len(ps), synthetic.score, k=4)
  with pytest.raises(ValueError, match="2 response lists for 3 prompts"):
    perfectible.compute_pass_rates(problems, lambda ps, k: [["x"] * k] * 2, synthetic.score, k=4)
  with pytest.raises(ValueError, match="low=0.9, high=0.1"):
    perfectible.build_perfectible_subset(problems, sample_fn, synthetic.score, k=4, low=0.9,
                                         high=0.1)
  with pytest.raises(ValueError, match="no 'prompt'; pass prompt_fn"):
    perfectible.compute_pass_rates([object()], sample_fn, synthetic.score, k=1)
  with pytest.raises(ValueError, match="2 problems but 1 pass rates"):
    perfectible.write_subset("/nonexistent/x.jsonl", problems[:2], [0.5])
