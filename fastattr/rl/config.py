"""The run configuration of `fastattr train`: Args (one field per flag, CleanRL style), the paper preset, validation,
and the seeds every random stream derives from."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Annotated

from tyro.constructors import PrimitiveConstructorSpec

from .. import envs as envs_lib
from .. import filtering
from ..seeds import derived_seed  # noqa: F401  (re-exported for the loop)


def _json_object(strings: list[str]) -> dict:
    text = strings[0]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object like '{{\"k\": 1}}', got {text!r}")
    return value


# A dict given on the command line as one JSON object (tyro's default would be key-value pairs)
JsonObject = Annotated[dict, PrimitiveConstructorSpec(
    nargs=1, metavar="JSON", instance_from_str=_json_object, is_instance=lambda x: isinstance(x, dict),
    str_from_instance=lambda d: [json.dumps(d)])]


@dataclass
class Args:
    env_id: str = "CartPole-v1"
    """gymnasium id of the environment"""
    method: str = "ppo"
    """ppo | iif | iif-all-neg | random | iif-reweight | iif-adam | dtv-loo: which records each update sees, and with
    which weight (fastattr/iif.py)"""
    seed: int = 0
    """seed of the agent's init, the rollouts, the minibatch order, the random filter and the evaluation"""
    total_timesteps: int = 100_000
    """env steps in total; the run has total_timesteps // (n_steps * num_envs) rounds"""
    run_dir: str = ""
    """output directory (args.json, metrics.jsonl, checkpoints/, attribution/); default runs/<env>__<method>__<seed>"""
    preset: str = ""
    """'' (generic defaults) or 'paper' (the paper's settings for this env; set by `fastattr train --preset paper`)"""
    env_kwargs: JsonObject = field(default_factory=dict)
    """keyword arguments of gym.make, as JSON on the command line (e.g. '{"is_slippery": false}')"""
    p: float = 0.5
    """fraction of the negative-influence records IIF drops, in (0, 1] (random drops as many records)"""

    # PPO (Stable-Baselines3 semantics)
    num_envs: int = 1
    """parallel envs in the training rollout (the paper: 1)"""
    n_steps: int = 2048
    """steps per env per rollout; the buffer holds n_steps * num_envs records"""
    batch_size: int = 64
    """minibatch size"""
    n_epochs: int = 10
    """epochs over the (kept) buffer per round"""
    optimizer: str = "adam"
    """sgd | adam (the paper: sgd, adam for BipedalWalker)"""
    learning_rate: float = 3e-4
    """constant learning rate"""
    adam_eps: float = 1e-5
    """Adam epsilon (SB3's value)"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """PPO ratio clip range"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient (value loss = MSE(returns, V), SB3)"""
    clip_grad: bool = False
    """clip the global grad norm at max_grad_norm (the paper lists 0.5 but its code disables clipping)"""
    max_grad_norm: float = 0.5
    """max global grad norm when --clip-grad"""
    norm_adv: bool = True
    """normalise advantages per minibatch (SB3)"""
    update_backend: str = "auto"
    """auto | torch | numpy: the minibatch step; auto = numpy (same loss, hand-written backward, faster: benchmarks/bench_ppo.py)
    for MLP agents with plain SGD, torch autograd otherwise"""
    minibatch_remainder: str = "keep"
    """keep | drop: the last partial minibatch of an epoch (SB3 keeps it; the official IIF retrain drops it)"""
    env_stream: str = "continue"
    """continue | reseed: episodes continue across rounds (Algorithm 1, SB3), or every round starts from
    env.reset(seed=seed) with the action-sampling stream restarted too, as the official code's one-process-per-round
    pipeline does"""
    network: str = "auto"
    """auto | mlp | cnn: auto = the paper's CNN for image observations (MiniGrid), else 2x64 tanh MLPs"""
    hidden: int = 64
    """width of the actor's and critic's two hidden layers"""
    features_dim: int = 64
    """output width of the CNN feature extractor"""

    # attribution
    target: str = "return"
    """return | lookahead: the target the scores measure against: the return target at theta(k), or the return
    target at the parameters a plain (unfiltered) update of this round would reach"""
    reward_noise: float = 0.0
    """fraction of the training episodes whose rewards the agent sees sign-flipped (corrupted data; evaluation stays
    clean)"""
    target_kl: float = 0.0
    """stop the round's update once a minibatch's approx. KL exceeds 1.5 x this (SB3's target_kl); 0 = never"""
    score_adv_norm: str = "minibatch"
    """minibatch | buffer | none: how A~ in the record loss is normalised (minibatch = as the update does it)"""
    save_attribution: bool = False
    """save every round's buffer and scores (attribution/round_k.npz) and theta(k) (checkpoints/theta_k.pt)"""
    probe: str = ""
    """with --save-attribution: also store each record's action-target influence (score_action: mean over up to
    --probe-targets records matching this probe, e.g. frozenlake-down; `fastattr behaviour --list-probes`)"""
    probe_targets: int = 32
    """how many probe-matching records serve as action targets per round"""

    # evaluation
    eval_episodes: int = 20
    """stochastic-policy episodes per evaluation (0 = no evaluation); the paper uses 1000 (100 for some envs)"""
    eval_every: int = 1
    """evaluate every this many rounds (and after the last)"""
    eval_envs: int = 0
    """parallel eval envs (0 = min(eval_episodes, 100))"""

    # run control
    threads: int = 1
    """torch threads for fastattr's scoring kernels; the PPO passes always run on one (results never depend on it)"""
    resume: bool = False
    """continue the run in run_dir from its last checkpoint (bit-identical on CPU); start it if there is none"""
    progress: bool = True
    """show a tqdm progress bar"""


# Which records an update sees (round-level filters: fastattr/filtering.py; the others: fastattr/iif.py)
METHODS = filtering.METHODS + ("iif-reweight", "iif-adam", "dtv-loo")

# Fields that do not change the results: a run dir may be resumed with different values.
NON_SEMANTIC = ("run_dir", "resume", "progress", "threads")


def paper_overrides(env_id: str) -> dict:
    """The Args values `--preset paper` sets for env_id (the paper's settings; eval budgets are ours, see envs.py)."""
    pre = envs_lib.paper_preset(env_id)
    return dict(
        preset="paper", total_timesteps=pre.total_timesteps, p=pre.p, optimizer=pre.optimizer,
        learning_rate=pre.learning_rate, network=pre.network, eval_episodes=pre.eval_episodes,
        eval_every=pre.eval_every, env_kwargs=dict(pre.env_kwargs), num_envs=1, n_steps=2048, batch_size=64,
        n_epochs=10, gamma=0.99, gae_lambda=0.95, clip_coef=0.2, ent_coef=0.0, vf_coef=0.5, clip_grad=False,
        minibatch_remainder="drop",  # the official code re-batches the kept records and drops the last partial batch
    )


def validate_args(args: Args) -> Args:
    """Raises ValueError naming the bad argument and the fix."""
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    need(args.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    need(args.method != "iif-adam" or args.optimizer == "adam",
         "--method iif-adam preconditions the target with Adam's second moments: it needs --optimizer adam")
    need(args.target in ("return", "lookahead"), f"--target must be return or lookahead, got {args.target!r}")
    need(0.0 <= args.reward_noise < 1.0, f"--reward-noise must be in [0, 1), got {args.reward_noise}")
    need(args.target_kl >= 0.0, f"--target-kl must be >= 0 (0: off), got {args.target_kl}")
    filtering.check_p(args.p)
    for name in ("num_envs", "n_steps", "batch_size", "n_epochs", "threads", "eval_every", "hidden", "features_dim"):
        need(isinstance(getattr(args, name), int) and getattr(args, name) >= 1,
             f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)!r}")
    need(args.eval_episodes >= 0 and args.eval_envs >= 0, "--eval-episodes and --eval-envs must be >= 0")
    per_round = args.n_steps * args.num_envs
    need(args.total_timesteps >= per_round,
         f"--total-timesteps ({args.total_timesteps}) is less than one round of n_steps * num_envs = {per_round} "
         "env steps; raise it or lower --n-steps")
    need(args.optimizer in ("sgd", "adam"), f"--optimizer must be sgd or adam, got {args.optimizer!r}")
    need(args.learning_rate > 0, f"--learning-rate must be > 0, got {args.learning_rate}")
    need(0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1, "--gamma and --gae-lambda must be in [0, 1]")
    need(args.clip_coef > 0, f"--clip-coef must be > 0, got {args.clip_coef}")
    need(args.network in ("auto", "mlp", "cnn"), f"--network must be auto, mlp or cnn, got {args.network!r}")
    need(args.score_adv_norm in ("minibatch", "buffer", "none"),
         f"--score-adv-norm must be minibatch, buffer or none, got {args.score_adv_norm!r}")
    need(args.update_backend in ("auto", "torch", "numpy"),
         f"--update-backend must be auto, torch or numpy, got {args.update_backend!r}")
    need(args.update_backend != "numpy" or (args.optimizer == "sgd" and args.network != "cnn"),
         "--update-backend numpy needs an MLP agent and plain SGD (--optimizer sgd); use --update-backend torch")
    need(args.env_stream in ("continue", "reseed"),
         f"--env-stream must be continue or reseed, got {args.env_stream!r}")
    need(args.minibatch_remainder in ("keep", "drop"),
         f"--minibatch-remainder must be keep or drop, got {args.minibatch_remainder!r}")
    need(args.preset in ("", "paper"), f"--preset must be 'paper' or empty, got {args.preset!r}")
    need(isinstance(args.env_kwargs, dict), f"--env-kwargs must be a JSON object, got {args.env_kwargs!r}")
    need(isinstance(args.seed, int) and 0 <= args.seed < 2**32, f"--seed must be in [0, 2^32), got {args.seed!r}")
    envs_lib.check_env_id(args.env_id)
    if args.probe:
        need(args.save_attribution, "--probe stores action-target scores with the attribution: add --save-attribution")
        need(args.probe_targets >= 1, f"--probe-targets must be >= 1, got {args.probe_targets}")
        from ..probes import get_probe

        get_probe(args.probe).check_env(args.env_id)  # an unknown probe or one for another env fails before any I/O
    if not args.run_dir:
        args.run_dir = os.path.join("runs", f"{args.env_id}__{args.method}__{args.seed}")
    return args




def train_env_seeds(args: Args) -> int | list[int]:
    """Seeds of the training envs: args.seed for one env (the paper's runs); for E envs, E seeds derived from it, so
    runs with neighbouring seeds share no env (a plain seed gives env i seed + i, the next run's env i - 1)."""
    if args.num_envs == 1:
        return args.seed
    return [derived_seed(args.seed, 0x7E5, i) % 2**31 for i in range(args.num_envs)]


