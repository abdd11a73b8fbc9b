"""Scoring one batch of LM sequences: fastattr vs the plain passes, and attribution's share of a GRPO step.

Records: N prompt-completion sequences of T tokens (completion tokens padded at random lengths), record loss
l_i = -A_i sum_t log pi(y_it | ...), target: the sequence target f = -(1/M) sum_j A_j sum_t log pi(y_jt | ...) on M
other sequences (fastattr.rlhf.scores). "plain" (= 1.00) is one forward+backward of the summed record losses plus one
of the target: the passes any gradient-based scorer needs. Rows, timed side by side (interleaved rounds, the median
of the per-round ratios to their plain row):
  fastattr           fastattr.score(model, records, target), every parameter (or LoRA's A and B for the LoRA rows)
  plain-batch        the plain passes for the records' own target ("batch": f over the N records, not M others): one
                     forward+backward of the record losses, one of that target
  fastattr-joint     records and target from one forward (the target is the records' own: "batch"); its ratio is to
                     plain-batch, the passes that target needs
  fastattr-no-locality  the same as fastattr with check_locality=False (what the row-locality check costs)
  fastattr-fast-params  fastattr on the parameters that take a fast path only (what the general forward-mode path
                     costs for the others, if any are left)
  loop               per-sample autograd: one backward per record, dotted with the target gradient
  vmap               torch.func.vmap(grad) per-sample gradients dotted with the target gradient
Models: a Llama-style LM from LlamaConfig (4 layers, width 128, the default shape), the task's GPT-Neo (2 layers,
width 64) and a GPT-2 of the Llama's size (its Conv1D weights, its norms and its LM head tied to the embedding take
the affine and tied fast paths). Each model with every parameter and with LoRA (r=8 on every Linear / Conv1D).

The GRPO section trains the task's GPT-Neo (LoRA, 64 completions per generation batch, one optimizer step per
generation) with TRL's plain GRPOTrainer and with fastattr.integrations.trl.IIFGRPOTrainer, fused (scored from the
training step's own passes) and separate (its own scoring passes), interleaved, and reports attribution's share of a
step, (IIF step - plain step) / IIF step (a step: generation, reward, scoring, loss, optimizer), for the batch's own
target and for the D_val sequence target (which also generates the target's completions; separate only), with the
task's 12-token completions; then with longer completions
(--grpo-completions, default 48 and 120 tokens: an untrained GPT-Neo of the same shape with more positions, a
token-count reward, the batch target), to see how the share moves with the completion length.

    python benchmarks/bench_llm.py              # every row, 1 thread
    python benchmarks/bench_llm.py --quick      # small shapes, fewer repetitions (smoke test)
    python benchmarks/bench_llm.py --only-grpo  # the GRPO rows only
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap
from torch.utils.benchmark import Timer

import fastattr
from fastattr.info import provenance
from fastattr.rlhf import scores
from fastattr.rlhf.sequences import Sequences, completion_mask

GOALS = {"fastattr": 1.3, "fastattr-joint": 1.0, "fastattr-lora": 0.8, "grpo_fraction": 0.10}


def make_model(arch: str, vocab: int, width: int, layers: int, heads: int, max_positions: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from fastattr.rlhf.task import make_lm

    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=heads, intermediate_size=4 * width, max_position_embeddings=max_positions)
        return LlamaForCausalLM(cfg).eval()
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads, n_positions=max_positions)
        return GPT2LMHeadModel(cfg).eval()
    return make_lm(vocab, width, layers, heads, max_positions).eval()


def make_batch(n: int, prompt: int, completion: int, vocab: int, seed: int) -> tuple[Sequences, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, prompt + completion), generator=g)
    stop = torch.randint(completion // 2, completion, (n,), generator=g)
    comp = ids[:, prompt:].clone()
    comp[torch.arange(n), stop] = 2  # <eos>
    mask = completion_mask(comp, 2)
    seqs = Sequences(ids[:, :prompt], torch.ones(n, prompt, dtype=torch.long), comp.masked_fill(mask == 0, 0), mask)
    return seqs, torch.randn(n, generator=g)


def methods(model, records: Sequences, adv, target: scores.SequenceTarget, lora: bool) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]

    def record_loss(m):
        return scores.record_losses(records.logprobs(m), adv)

    def plain():
        torch.autograd.grad(record_loss(model).sum(), params)
        torch.autograd.grad(target(model), params)

    def fast():
        return scores.score(model, records, adv, target, deterministic=False)

    def plain_batch():
        torch.autograd.grad(record_loss(model).sum(), params)
        torch.autograd.grad(scores.sequence_target(records.logprobs(model), adv), params)

    def joint():
        return scores.score(model, records, adv, "batch", deterministic=False)

    def no_locality():
        return scores.score(model, records, adv, target, deterministic=False, check_locality=False)

    fast_params = [n for n, path in fastattr.explain(model, record_loss, target).paths.items()
                   if not path.startswith("general")]

    def fast_only():  # a different quantity (the general-path parameters left out): timed, not compared
        return scores.score(model, records, adv, target, deterministic=False, params=fast_params)

    def loop():
        gt = torch.autograd.grad(target(model), params)
        out = []
        for i in range(len(records)):
            one = records.select(torch.tensor([i]))
            gi = torch.autograd.grad(scores.record_losses(one.logprobs(model), adv[i:i + 1]).sum(), params)
            out.append(sum((a * b).sum() for a, b in zip(gi, gt)))
        return torch.stack(out)

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def one(p, ids, mask, comp, cmask, a):
        seq = Sequences(ids[None], mask[None], comp[None], cmask[None])
        logp = seq.logprobs(lambda **kw: functional_call(model, {**frozen, **p}, (), kw))
        return scores.record_losses(logp, a[None]).sum()

    def via_vmap():
        p = {n: q.detach() for n, q in model.named_parameters() if q.requires_grad}
        per = vmap(grad(one), in_dims=(None, 0, 0, 0, 0, 0))(p, records.prompt_ids, records.prompt_mask,
                                                            records.completion_ids, records.completion_mask, adv)
        gt = torch.autograd.grad(target(model), params)
        return sum(per[n].flatten(1) @ g.flatten() for n, g in zip(names, gt))

    plain.record_loss = record_loss  # for fastattr.explain
    suffix = "-lora" if lora else ""
    rows = {"plain": plain, "fastattr": fast, "plain-batch": plain_batch, "fastattr-joint": joint,
            "fastattr-no-locality": no_locality,
            "fastattr-fast-params": fast_only, "loop": loop, "vmap": via_vmap}
    if lora:  # every LoRA parameter takes a fast path
        del rows["fastattr-fast-params"]
    return {name + suffix: fn for name, fn in rows.items()}


def base_of(name: str) -> str:
    """The plain row a row's ratio is taken to: plain-batch for the joint form, else plain (same LoRA suffix)."""
    suffix = "-lora" if name.endswith("-lora") else ""
    return ("plain-batch" if name.startswith(("fastattr-joint", "plain-batch")) else "plain") + suffix


def time_rows(fns: dict, threads: int, rounds: int, min_run_time: float) -> dict:
    """name -> (median seconds, median ratio to its plain row (base_of), min ratio, max ratio), interleaved rounds."""
    reps = {}
    for name, fn in fns.items():
        once = Timer("f()", globals={"f": fn}, num_threads=threads).timeit(1).median
        reps[name] = max(1, int(min_run_time / max(once, 1e-6)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(Timer("f()", globals={"f": fn}, num_threads=threads).timeit(reps[name]).median)
    out = {}
    for name in fns:
        base = base_of(name) if name != base_of(name) else next(iter(fns))
        ratios = sorted(a / b for a, b in zip(times[name], times[base]))
        out[name] = (statistics.median(times[name]), statistics.median(ratios), ratios[0], ratios[-1])
    return out


def bench_model(arch: str, shape: dict, n: int, prompt: int, completion: int, threads: int, rounds: int,
                min_run_time: float) -> list[dict]:
    rows = []
    for lora in (False, True):
        model = make_model(arch, **shape)
        if lora:
            model = scores.lora(model, r=8, alpha=16)
        records, adv = make_batch(n, prompt, completion, shape["vocab"], seed=0)
        target_seqs, target_adv = make_batch(max(n // 4, 1), prompt, completion, shape["vocab"], seed=1)
        target = scores.SequenceTarget(target_seqs, target_adv)
        fns = methods(model, records, adv, target, lora)
        reference = fns["fastattr" + ("-lora" if lora else "")]().double()
        usable = {}
        for name, fn in fns.items():
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001  (an anchor that cannot run on this model is reported, not timed)
                rows.append({"model": arch, "method": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
                continue
            if out is not None and not name.startswith(("fastattr-joint", "fastattr-fast-params")):
                err = ((out.double() - reference).abs().max() / reference.abs().max()).item()
                assert err < 1e-3, f"{arch} {name} disagrees with fastattr: rel err {err:.2e}"
            usable[name] = fn
        record_loss = fns["plain" + ("-lora" if lora else "")].record_loss
        general = len(fastattr.explain(model, record_loss, target).general())
        for name, (sec, ratio, lo, hi) in time_rows(usable, threads, rounds, min_run_time).items():
            rows.append({"model": arch, "method": name, "lora": lora, "ms": sec * 1e3, "x_plain": ratio,
                         "ratio_to": base_of(name) if name != base_of(name) else "plain" + ("-lora" if lora else ""),
                         "x_min": lo, "x_max": hi, "tokens_per_s": n * (prompt + completion) / sec,
                         "general_params": general, "n": n, "t": prompt + completion, "threads": threads})
    return rows


def step_times_callback():
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        """(seconds of each optimizer step, generation and optimizer included; the attribution seconds in it)."""

        def __init__(self, trainer):
            self.trainer, self.steps = trainer, []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append((time.perf_counter() - self.t0, getattr(self.trainer, "last_seconds", 0.0)))

    return StepTimes


GRPO_VARIANTS = ("plain", "fused", "separate")


def bench_grpo(steps: int, target_kind: str, completion: int | None = None, rounds: int = 3) -> dict:
    """A GRPO step of IIFGRPOTrainer on the task's GPT-Neo with LoRA, against TRL's plain GRPOTrainer with the same
    settings, `rounds` interleaved trainings of `steps` steps each (the first step of each training pays one-time
    costs and is left out; medians over the rest). Variants: plain (GRPOTrainer), fused (IIF scored from the training
    step's own passes; the batch target only) and separate (IIF with its own scoring passes, fused=False).
    Attribution's share of a step: (IIF step - plain step) / IIF step, and for the separate path also the seconds it
    spends in its scoring call (`in-step`). With `completion` longer than the task's (its LM has 32 positions), a
    GPT-Neo of the same shape and vocabulary but more positions, untrained, generates that many tokens, rewarded by a
    token count (a step's cost does not depend on the weights or on what the reward means); only the batch target
    then (the D_val target generates the task's lengths)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from fastattr.integrations.trl import IIFGRPOTrainer
    from fastattr.rlhf.task import TaskConfig, build_task, make_lm

    StepTimes = step_times_callback()
    task = build_task(TaskConfig(), log=lambda message: None)
    cfg = task.config
    completion = completion or cfg.max_new_tokens
    long = completion > cfg.max_new_tokens
    if long and target_kind != "batch":
        raise ValueError("longer completions are timed with the batch target only")
    variants = [v for v in GRPO_VARIANTS if not (v == "fused" and target_kind != "batch")]
    prompts = Dataset.from_dict({"prompt": [task.language.decode(p) for p in task.prompts["train"]]})

    def reward(completion_ids, **kwargs):
        from fastattr.rlhf.sequences import pad_rows

        if long:
            return [float(sum(t % 2 == 0 for t in c)) for c in completion_ids]
        ids, mask = pad_rows([list(c) or [2] for c in completion_ids], 0, side="right")
        return task.reward_model.reward(ids, mask).tolist()

    def target(trainer):
        model = trainer.accelerator.unwrap_model(trainer.model)
        with model.disable_adapter():
            return scores.validation_target(task, model, trainer.state.global_step, position_ids=False)

    def train(variant: str) -> list[tuple[float, float]]:
        base = make_lm(len(task.language), cfg.lm_width, cfg.lm_layers, cfg.lm_heads,
                       max_positions=cfg.prompt_len + completion) if long else task.policy()
        policy = scores.lora(base, r=8, alpha=16)
        with tempfile.TemporaryDirectory() as out:
            args = GRPOConfig(output_dir=out, use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0,
                              per_device_train_batch_size=64, num_generations=4, max_completion_length=completion,
                              learning_rate=1e-4, max_steps=steps, save_strategy="no", report_to=[],
                              disable_tqdm=True, logging_steps=steps)
            common = {"model": policy, "reward_funcs": reward, "args": args, "processing_class": task.tokenizer(),
                      "train_dataset": prompts}
            if variant == "plain":
                trainer = GRPOTrainer(**common)
            else:
                trainer = IIFGRPOTrainer(**common, filter="iif", p=1.0, fused=variant == "fused",
                                         target="batch" if target_kind == "batch" else target)
            trainer.remove_callback(PrinterCallback)
            timing = StepTimes(trainer)
            trainer.add_callback(timing)
            trainer.train()
        return timing.steps[1:]

    measured = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            measured[v] += train(v)
    step = {v: statistics.median(a for a, _ in measured[v]) for v in variants}
    out = {"target": target_kind, "completion": completion, "plain_ms": step["plain"] * 1e3}
    for v in variants[1:]:
        out[f"{v}_ms"] = step[v] * 1e3
        out[f"{v}_fraction"] = (step[v] - step["plain"]) / step[v]
    out["separate_in_step_fraction"] = statistics.median(b / a for a, b in measured["separate"])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions (smoke test)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds per method per round")
    p.add_argument("--grpo-steps", type=int, default=6)
    p.add_argument("--grpo-rounds", type=int, default=3, help="interleaved trainings per GRPO variant")
    p.add_argument("--grpo-completions", type=lambda v: [int(x) for x in v.split(",") if x], default=[48, 120],
                   help="longer completion lengths to time GRPO at (comma-separated; '' for none)")
    p.add_argument("--only-grpo", action="store_true", help="skip the scoring rows")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_llm.jsonl"))
    args = p.parse_args()
    os.environ["FASTATTR_STRICT"] = "1"
    torch.set_num_threads(args.threads)
    meta = provenance(packages=("numpy", "transformers", "trl", "peft"))
    print(f"# bench_llm  torch {meta['torch']}  transformers {meta.get('transformers')}  trl {meta.get('trl')}  "
          f"peft {meta.get('peft')}  commit {meta['commit']}  threads {args.threads}  {meta['machine']}")
    n, prompt, completion = (16, 8, 16) if args.quick else (64, 16, 32)
    models = {"llama": {"vocab": 512, "width": 128, "layers": 4, "heads": 4, "max_positions": 64},
              "gpt-neo": {"vocab": 258, "width": 64, "layers": 2, "heads": 4, "max_positions": 64},
              "gpt2": {"vocab": 512, "width": 128, "layers": 4, "heads": 4, "max_positions": 64}}
    if args.quick:
        models = {k: {**v, "width": 32, "layers": 2} for k, v in models.items()}
    rounds = 2 if args.quick else args.rounds
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(f"{'model':<9}{'method':<21}{'ms':>10}{'x plain':>9}{'min-max':>13}{'tokens/s':>11}  goal")
    with open(args.out, "a") as f:
        for arch, shape in ({} if args.only_grpo else models).items():
            for r in bench_model(arch, shape, n, prompt, completion, args.threads, rounds, args.min_run_time):
                f.write(json.dumps({**r, **meta}) + "\n")
                if "error" in r:
                    print(f"{arch:<9}{r['method']:<21}  not feasible: {r['error']}")
                    continue
                goal = GOALS.get(r["method"])
                verdict = "" if goal is None else f"<= {goal}: {'met' if r['x_plain'] <= goal else 'NOT met'}"
                if base_of(r["method"]) != r["method"] and base_of(r["method"]).startswith("plain-batch"):
                    verdict = f"(x plain-batch) {verdict}"
                print(f"{arch:<9}{r['method']:<21}{r['ms']:>10.1f}{r['x_plain']:>9.2f}{r['x_min']:>7.2f}-"
                      f"{r['x_max']:<5.2f}{r['tokens_per_s']:>11.0f}  {verdict}")
        if not args.quick:
            grpo = [("batch", None), ("val", None)] + [("batch", c) for c in args.grpo_completions]
            print(f"GRPO step (task GPT-Neo, LoRA, 64 completions): attribution's share = (IIF step - plain GRPO "
                  f"step) / IIF step, medians of {args.grpo_rounds} interleaved trainings x {args.grpo_steps - 1} "
                  "steps; goal <= 10%")
            for kind, completion in grpo:
                r = bench_grpo(args.grpo_steps, kind, completion, args.grpo_rounds)
                f.write(json.dumps({"grpo": r, **meta}) + "\n")
                parts = [f"plain {r['plain_ms']:.0f} ms"]
                for v in ("fused", "separate"):
                    if f"{v}_ms" in r:
                        ok = "met" if r[f"{v}_fraction"] <= GOALS["grpo_fraction"] else "NOT met"
                        parts.append(f"{v} {r[f'{v}_ms']:.0f} ms = {100 * r[f'{v}_fraction']:.1f}% ({ok})")
                parts.append(f"separate in-step {100 * r['separate_in_step_fraction']:.1f}%")
                print(f"  {r['completion']:>3} tokens, target {kind:<5}: " + ", ".join(parts))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
