"""In-memory fine-tuning of the demo task, to choose the demo's settings before running them streamed.

    python tools/sweep_demo.py --rule sgd --lr 0.01 --steps 40                  # configs/demo.yaml's old settings
    python tools/sweep_demo.py --rule adalomo --lr 1e-3 --clip-norm 1.0 --steps 40

Same data, packing, batches (--seed, default 0 as the demo), schedule and update-rule math as `lomo-run train` (the rules'
`apply` is called on each parameter after a plain backward), with the whole model in memory and exact
global-norm clipping. lomo-run's streamed path equals this to 1e-6 (tests/test_rules.py), so a setting
found here transfers. Prints held-out (accuracy, answer loss) at step 0 and every --eval-every steps, and
appends one JSON line per run to --log.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

from lomo_runtime.data import Batches, load_examples, load_tokenizer, pack, pad_id_of, tokenize_examples
from lomo_runtime.evaluation import load_choice_examples, score_choices
from lomo_runtime.rules import UpdateContext, rule_by_name
from lomo_runtime.schedule import LRSchedule


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".cache/smollm2-135m")
    ap.add_argument("--data", default=".cache/demo")
    ap.add_argument("--rule", default="sgd")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--schedule", default="cosine")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--clip-norm", type=float, default=None)
    ap.add_argument("--clip-value", type=float, default=None)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-limit", type=int, default=None, help="score only the first N held-out examples")
    ap.add_argument("--seed", type=int, default=0, help="batch order (the demo's seed is 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log", default="runs/sweep_demo.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tok = load_tokenizer(args.model)
    held_out = load_choice_examples(f"{args.data}/sentiment-eval.jsonl")[: args.eval_limit]
    seqs = pack(tokenize_examples(load_examples(f"{args.data}/sentiment-train.jsonl"), tok), args.seq_len, pad_id=pad_id_of(tok))
    batches = Batches(seqs, args.batch_size, seed=args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    model.config.use_cache = False
    rule = rule_by_name(args.rule, lr=args.lr)
    schedule = LRSchedule(args.schedule, args.lr, args.warmup, args.steps, 0.0)
    params = [p for p in model.parameters()]
    state = {id(p): {k: torch.zeros(s, dtype=d) for k, (s, d) in rule.state_spec(tuple(p.shape)).items()} for p in params}

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            r = score_choices(model, tok, held_out, 16)
        model.train()
        return round(r.accuracy, 4), round(r.loss, 4)

    record = {k: v for k, v in vars(args).items() if k not in ("log",)}
    record["evals"] = {0: evaluate()}
    print(record, flush=True)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, labels = next(batches)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        grads = [p.grad for p in params]
        if args.clip_value is not None:
            for g in grads:
                g.clamp_(-args.clip_value, args.clip_value)
        if args.clip_norm is not None:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if norm > args.clip_norm:
                for g in grads:
                    g.mul_(args.clip_norm / (float(norm) + 1e-6))
        ctx = UpdateContext(lr=schedule.lr_at(step - 1), step=step)  # the trainer's step index is 0-based
        with torch.no_grad():
            for p in params:
                rule.apply(p.data, p.grad, state[id(p)], ctx)
                p.grad = None
        line = f"step {step} loss {loss.item():.4f} lr {ctx.lr:.3g} {time.perf_counter() - t0:.0f}s"
        if step % args.eval_every == 0 or step == args.steps:
            record["evals"][step] = evaluate()
            line += f" eval {record['evals'][step]}"
        print(line, flush=True)
    with open(args.log, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
