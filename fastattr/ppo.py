"""PPO with per-round local data attribution and IIF, in CleanRL's single-file shape (the parts live in fastattr/rl/).

Semantics are Stable-Baselines3's PPO as the paper ran it: n_steps 2048 with one env, minibatch 64, 10 epochs,
clip 0.2, GAE(0.99, 0.95), SGD lr 5e-3 (Adam 3e-4, eps 1e-5, for BipedalWalker), value loss MSE(returns, V) with
vf_coef 0.5, entropy 0, advantages normalised per minibatch, separate 2x64 tanh actor and critic with SB3's
orthogonal init, truncated episodes bootstrapped with r += gamma * V(final_obs), the last partial minibatch kept,
grad clipping off unless --clip-grad (the paper lists 0.5 but its code comments clipping out).

One round (the paper's round k, 0-based: theta(k) collects B(k) and is updated to theta(k+1)):
    collect_rollout   n_steps x num_envs transitions with pi_theta(k)
    compute_gae       GAE advantages (raw) and value targets
    FASTATTR          fastattr.iif.select at theta(k): score_i = <grad l_i, grad f>, actor parameters only, where
                        l_i = -A~_i log pi(a_i|s_i)     (the PPO surrogate at ratio 1; same gradient)
                        f   = -(1/n) sum_j A^_j log pi(a_j|s_j)   (the return target, raw GAE advantages)
                      A~ is normalised exactly as the update normalises it in epoch 1: per minibatch of the epoch-1
                      order, which is drawn *before* scoring (fastattr/targets.py); the filter (IIF / all-neg /
                      random / all) decides which records the update sees
    ppo_update        n_epochs over the kept records from theta(k): epoch 1 in the scored order restricted to
                      the kept records, later epochs freshly shuffled
    evaluate          stochastic policy on separately seeded eval envs (does not touch the training RNG)
The metrics line `round = r` describes theta(r) (r updates done; r = 0 is the initial policy); the attribution file
attribution/round_{k}.npz holds B(k) and its scores at theta(k), the buffer of the update that produced theta(k+1).

Everything runs on one torch thread (bit-identical curves whatever the thread count); `--threads` goes to
fastattr.score's kernels. A run dir can be resumed bit-identically from its last round (fastattr/rl/rundir.py).
"""
from __future__ import annotations

import random
import time

import numpy as np
import torch

from . import envs as envs_lib
from . import iif, store, targets
from .rl.agent import Agent, make_optimizer
from .rl.config import Args, derived_seed, train_env_seeds, validate_args
from .rl.rollout import collect_rollout, compute_gae, discounted_returns, evaluate, make_eval_envs
from .rl.rundir import RunDir
from .rl.update import lookahead_target_grads, ppo_update
from .threads import use_threads

__all__ = ["Args", "main"]


def main(args: Args) -> dict:
    """Trains one run; returns the last metrics line plus `run_dir`. See the module docstring for a round."""
    args = validate_args(args)
    with use_threads(1), RunDir(args) as run:
        return _train(args, run)


def _train(args: Args, run: RunDir) -> dict:
    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(derived_seed(args.seed, 0x7A1))   # minibatch order
    filter_rng = np.random.default_rng(derived_seed(args.seed, 0xF11))          # the random-drop control only
    action_rng = np.random.default_rng(derived_seed(args.seed, 0xAC7))          # the rollout's actions

    # env setup (before the run dir is touched: an unsupported env never leaves a half-made run dir behind)
    envs = envs_lib.make_vector_env(args.env_id, args.num_envs, args.env_kwargs)
    agent = Agent(envs.single_observation_space, envs.single_action_space, args.network, args.hidden,
                  args.features_dim)
    optimizer = make_optimizer(agent, args)
    run.open()
    if run.finished:
        envs.close()
        return run.result(already_finished=True)
    eval_envs = make_eval_envs(args)
    num_rounds = args.total_timesteps // (args.n_steps * args.num_envs)
    obs0, _ = envs.reset(seed=train_env_seeds(args))
    rngs = {"train": generator, "filter": filter_rng}
    state = run.start(agent, optimizer, rngs, envs, obs0, action_rng)
    if run.round == 0:  # round 0: the initial policy
        t0 = time.perf_counter()
        row = {"round": 0, "global_step": 0, "kept_fraction": None, "eval_return": None}
        if eval_envs is not None:
            row.update(evaluate(agent, eval_envs, args.eval_episodes, args.seed, 0))
        run.log_round(row, timers={"eval": time.perf_counter() - t0}, agent=agent, optimizer=optimizer, rngs=rngs,
                      envs=envs, state=state)

    from tqdm.auto import tqdm

    bar = tqdm(total=num_rounds, initial=run.round, desc=f"{args.env_id} {args.method} s{args.seed}", unit="round",
               disable=not args.progress, dynamic_ncols=True)
    need_scores = args.method not in ("ppo", "dtv-loo") or args.save_attribution
    for r in range(run.round + 1, num_rounds + 1):
        k = r - 1  # the paper's round index: theta(k) collects and scores B(k), the update yields theta(k+1)
        timers = {}

        # ALGO LOGIC: rollout with theta(k)
        t0 = time.perf_counter()
        if args.env_stream == "reseed" and r > 1:  # the official code's one process per round: the env and the
            state.next_obs, _ = envs.reset(seed=train_env_seeds(args))  # action stream restart identically seeded
            state.ep_return[:], state.ep_length[:] = 0, 0
            state.rng.bit_generator.state = np.random.default_rng(derived_seed(args.seed, 0xAC7)).bit_generator.state
        buf, episodes = collect_rollout(envs, agent, state, args)
        compute_gae(buf, args.gamma, args.gae_lambda)
        timers["rollout"] = time.perf_counter() - t0

        # FASTATTR: score every record at theta(k) against the return target, then choose the records to keep
        t0 = time.perf_counter()
        epoch1_order = torch.randperm(buf.n, generator=generator)  # drawn before scoring: A~ is normalised per its
        selection = None                                            # minibatches, as the update will normalise it
        if need_scores:
            with use_threads(args.threads):
                target_grads = None  # the return target's own gradient at theta(k), unless a method says otherwise
                if args.target == "lookahead":
                    target_grads = lookahead_target_grads(agent, optimizer, buf, args, generator, epoch1_order)
                if args.method == "iif-adam":
                    target_grads = targets.adam_precondition(target_grads or targets.return_target_grads(
                        agent, lambda m: m.log_prob(buf.obs, buf.actions), buf.advantages, Agent.is_actor_param),
                        agent, optimizer)
                selection = iif.select(agent, lambda m: m.log_prob(buf.obs, buf.actions), buf.advantages,
                                       method=round_filter(args.method), p=args.p, batch_size=args.batch_size,
                                       order=epoch1_order, adv_norm=args.score_adv_norm, params=Agent.is_actor_param,
                                       rng=filter_rng, target_grads=target_grads)
        keep = selection.keep if selection is not None else None
        probe = {}
        if args.save_attribution and args.probe:  # action targets at theta(k)
            with use_threads(args.threads):
                probe = targets.probe_scores(agent, buf.obs, buf.actions, selection.adv_record, args.probe,
                                             args.probe_targets, args.env_id)
        timers["attr"] = time.perf_counter() - t0
        if args.save_attribution:  # B(k), its scores and theta(k), before the update changes theta
            t0 = time.perf_counter()
            run.save_theta(k, agent, optimizer)
            store.save_round(
                run.path, k, obs=buf.obs, actions=buf.actions, rewards=buf.rewards, dones=buf.dones,
                terminated=buf.terminated, bootstrap=buf.bootstrap, values=buf.values, logp=buf.logp,
                adv_gae=buf.advantages, returns=buf.returns, returns_mc=discounted_returns(buf, args.gamma),
                adv_norm=selection.adv_record, score_return=selection.scores, keep=keep, order_epoch1=epoch1_order,
                next_value=buf.next_value, num_envs=np.array(buf.num_envs), **probe,
            )
            timers["io"] = time.perf_counter() - t0

        # ALGO LOGIC: the normal PPO epochs on the kept records, from theta(k)
        t0 = time.perf_counter()
        losses = ppo_update(agent, optimizer, buf, keep, args, generator, epoch1_order=epoch1_order,
                            weights=selection.weights if selection is not None else None)
        timers["update"] = time.perf_counter() - t0
        if not all(torch.isfinite(p).all() for p in agent.parameters()):
            raise FloatingPointError(
                f"training diverged in round {r}: non-finite parameters after the update. {run.path} keeps the last "
                "good round; lower --learning-rate or pass --clip-grad."
            )

        # evaluation of theta(k+1) = theta(r)
        row = {"round": r, "attr_round": k, "global_step": state.global_step}
        t0 = time.perf_counter()
        if eval_envs is not None and (r % args.eval_every == 0 or r == num_rounds):
            row.update(evaluate(agent, eval_envs, args.eval_episodes, args.seed, r))
        else:
            row["eval_return"] = None
        timers["eval"] = time.perf_counter() - t0

        scores = selection.scores if selection is not None else None
        n_kept = int(keep.sum()) if keep is not None else buf.n
        row.update(
            kept_fraction=n_kept / buf.n, n_kept=n_kept, filter_fallback=bool(selection and selection.fallback),
            train_return=float(np.mean([e[0] for e in episodes])) if episodes else None,
            train_episodes=len(episodes),
            neg_fraction=float((scores < 0).float().mean()) if scores is not None else None,
            score_mean=float(scores.mean()) if scores is not None else None,
            score_std=float(scores.std()) if scores is not None else None,
            **losses,
        )
        # metrics line and checkpoint together: a kill in between re-runs round r identically on --resume
        run.log_round(row, timers=timers, agent=agent, optimizer=optimizer, rngs=rngs, envs=envs, state=state,
                      finished=(r == num_rounds), steps=buf.n)
        bar.update(1)
        bar.set_postfix(sps=f"{row['sps']:.0f}", ret=(f"{row['eval_return']:.3g}" if row["eval_return"] is not None
                                                    else "-"), kept=f"{row['kept_fraction']:.2f}")
    bar.close()
    envs.close()
    if eval_envs is not None:
        eval_envs.close()
    return run.result()


def round_filter(method: str) -> str:
    """The round-level filter of a method (dtv-loo filters inside the update's minibatches: the round keeps all)."""
    return "ppo" if method == "dtv-loo" else method
