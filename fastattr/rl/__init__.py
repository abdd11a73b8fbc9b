"""The PPO loop's parts (`fastattr/ppo.py` is the loop itself, read top to bottom):

    config       Args, the paper preset, validation, seeds
    agent        the actor-critic (MLP or the paper's CNN), its numpy copy for rollouts, the optimiser
    rollout      one round's buffer, GAE, Monte Carlo returns, evaluation
    update       the PPO update over the kept records (torch autograd)
    numpy_step   the same step for MLP agents with plain SGD, backward written out in numpy
    rundir       args.json, the lock, checkpoints, metrics.jsonl

Nothing here imports an application (diagnose, behaviour, report, ...) or the command line.
"""
