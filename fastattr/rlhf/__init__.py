"""The paper's RLHF detoxification experiment (section 5.3), rebuilt at small scale and generated in-process.

    fastattr.rlhf.task         a synthetic language with a toxic lexicon, a GPT-Neo pretrained on it, a reward model
                               (its "neutral" logit is the reward) and a separate toxicity measure; prompts split into
                               train / D_val (the target set) / test; built once per seed and cached on disk
    fastattr.rlhf.sequences    prompt-completion batches: sampling from a causal LM, per-token log-probabilities
    fastattr.rlhf.scores       record losses of the PPO / GRPO update at ratio 1, the paper's sequence target on D_val,
                               per-sequence and per-token scores through fastattr.score
    fastattr.rlhf.ppo          a sequence-PPO loop with IIF's record filter (the paper's PPO path, scaled down)
    fastattr.rlhf.experiment   run_rlhf: one run (method x trainer x seed), metrics.jsonl, records.jsonl (each
                               round's top and bottom records as text), checkpoints, resume
    fastattr.rlhf.cli          `fastattr rlhf`: one run from the command line
    fastattr.rlhf.compare      `fastattr compare --rlhf`: trainers x methods x seeds, summary.{json,md}, curves.png

The GRPO path is fastattr.integrations.trl.IIFGRPOTrainer, TRL's GRPOTrainer with the same filter.
Importing this package imports nothing heavy; transformers, peft and trl are imported by the modules that need them.
"""
