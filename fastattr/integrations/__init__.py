"""Adapters that embed fastattr's scoring and filtering in other people's trainers.

Each adapter imports its trainer library lazily (importing `fastattr` imports none of them):
    fastattr.integrations.sb3      IIFPPO, Stable-Baselines3's PPO with a per-round record filter
    fastattr.integrations.trl      IIFGRPOTrainer, TRL's GRPOTrainer with a per-generation-batch completion filter
"""
