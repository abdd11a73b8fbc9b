# CleanRL-style single-file PPO (discrete actions) with IIF: before each update, score every record of the rollout by
# its influence on the return target and drop the most harmful ones. Every line or block IIF adds is marked
# `# FASTATTR`; without them this is plain PPO.
#
#   python examples/cleanrl_ppo_iif.py --env-id CartPole-v1 --total-timesteps 20000 --filter iif --p 0.5
#
# --filter none keeps every record and trains exactly as the script without the FASTATTR lines (the scores are still
# computed and timed); --filter random drops as many records as iif would, chosen at random (the control).
import os
import random
import time
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import tyro
from torch.distributions.categorical import Categorical

import fastattr.iif  # FASTATTR


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be enabled by default"""
    torch_threads: int = 1
    """torch's intra-op threads (one is fastest for these tiny networks and makes runs reproducible)"""
    tensorboard: bool = False
    """if toggled, also log to runs/{run_name} with torch.utils.tensorboard (needs the tensorboard package)"""
    capture_video: bool = False
    """whether to capture videos of the agent performances (check out `videos` folder)"""

    # Algorithm specific arguments
    env_id: str = "CartPole-v1"
    """the id of the environment"""
    total_timesteps: int = 50000
    """total timesteps of the experiments (small: a demo that runs in seconds on a CPU)"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 4
    """the number of parallel game environments"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """Toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 4
    """the number of mini-batches"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """Toggles whether or not to use a clipped loss for the value function, as per the paper."""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold"""

    # FASTATTR: data attribution arguments
    filter: str = "iif"
    """iif | iif-all-neg | random | none: which records each update sees (none = plain PPO)"""
    p: float = 0.5
    """the fraction of the negative-influence records iif drops, in (0, 1] (random drops as many records)"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    minibatch_size: int = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


def make_env(env_id, idx, capture_video, run_name):
    def thunk():
        if capture_video and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array")
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}")
        else:
            env = gym.make(env_id)
        return env

    return thunk


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, envs):
        super().__init__()
        obs_dim = int(np.array(envs.single_observation_space.shape).prod())
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, envs.single_action_space.n), std=0.01),
        )

    def get_value(self, x):
        return self.critic(x)

    def get_action_and_value(self, x, action=None):
        logits = self.actor(x)
        probs = Categorical(logits=logits)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(x)


# FASTATTR: score every record of the flattened batch at the current parameters and choose the ones the update sees.
# A function of its own so the tests can check these exact scores against a brute-force autograd loop.
def select_records(args, agent, b_obs, b_actions, b_advantages, order, rng):
    return fastattr.iif.select(
        agent,
        # log pi(a_i|s_i) of the actions taken: passing them makes get_action_and_value deterministic (no sampling)
        lambda m: m.get_action_and_value(b_obs, b_actions.long())[1],
        b_advantages,
        method=args.filter,
        p=args.p,
        batch_size=args.minibatch_size,
        order=torch.as_tensor(order),  # epoch 1's order: A~ is normalised per its minibatches, as the update will
        adv_norm="minibatch" if args.norm_adv else "none",
        params=lambda name: not name.startswith("critic"),  # the return target is the policy's: score the actor
        rng=rng,  # only the random control draws from it
    )


def main(args: Args) -> dict:
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    fastattr.iif.check_filter(args.filter)  # FASTATTR: fail on a typo before any environment starts
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    writer = None
    if args.tensorboard:  # optional: the script needs nothing beyond torch and gymnasium to run
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(f"runs/{run_name}")
        writer.add_text(
            "hyperparameters",
            "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
        )

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.torch_threads)
    filter_rng = np.random.default_rng(args.seed)  # FASTATTR: the random control's own stream: np.random stays PPO's

    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # env setup: SAME_STEP autoreset returns the next episode's first observation with the step that ended an episode,
    # so every stored transition is a real one (gymnasium 1.x's default, NEXT_STEP, inserts a reset step)
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env_id, i, args.capture_video, run_name) for i in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "only discrete action space is supported"

    agent = Agent(envs).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    # ALGO Logic: Storage setup
    obs = torch.zeros((args.num_steps, args.num_envs) + envs.single_observation_space.shape).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs) + envs.single_action_space.shape).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    rewards = torch.zeros((args.num_steps, args.num_envs)).to(device)
    dones = torch.zeros((args.num_steps, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)

    history = {"episodic_returns": [], "kept_fractions": [], "attribution_seconds": [], "keep": [], "minibatches": []}

    # TRY NOT TO MODIFY: start the game
    global_step = 0
    start_time = time.time()
    next_obs, _ = envs.reset(seed=args.seed)
    next_obs = torch.Tensor(next_obs).to(device)
    next_done = torch.zeros(args.num_envs).to(device)

    for iteration in range(1, args.num_iterations + 1):
        # Annealing the rate if instructed to do so.
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            lrnow = frac * args.learning_rate
            optimizer.param_groups[0]["lr"] = lrnow

        for step in range(0, args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            dones[step] = next_done

            # ALGO LOGIC: action logic
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
                values[step] = value.flatten()
            actions[step] = action
            logprobs[step] = logprob

            # TRY NOT TO MODIFY: execute the game and log data.
            next_obs, reward, terminations, truncations, infos = envs.step(action.cpu().numpy())
            next_done = np.logical_or(terminations, truncations)
            rewards[step] = torch.tensor(reward).to(device).view(-1)
            next_obs, next_done = torch.Tensor(next_obs).to(device), torch.Tensor(next_done).to(device)

            if "episode" in infos:
                for episodic_return in infos["episode"]["r"][infos["_episode"]]:
                    history["episodic_returns"].append((global_step, float(episodic_return)))
                    if writer is not None:
                        writer.add_scalar("charts/episodic_return", episodic_return, global_step)

        # bootstrap value if not done
        with torch.no_grad():
            next_value = agent.get_value(next_obs).reshape(1, -1)
            advantages = torch.zeros_like(rewards).to(device)
            lastgaelam = 0
            for t in reversed(range(args.num_steps)):
                if t == args.num_steps - 1:
                    nextnonterminal = 1.0 - next_done
                    nextvalues = next_value
                else:
                    nextnonterminal = 1.0 - dones[t + 1]
                    nextvalues = values[t + 1]
                delta = rewards[t] + args.gamma * nextvalues * nextnonterminal - values[t]
                advantages[t] = lastgaelam = delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
            returns = advantages + values

        # flatten the batch
        b_obs = obs.reshape((-1,) + envs.single_observation_space.shape)
        b_logprobs = logprobs.reshape(-1)
        b_actions = actions.reshape((-1,) + envs.single_action_space.shape)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)

        # Optimizing the policy and value network
        b_inds = np.arange(args.batch_size)
        clipfracs = []
        np.random.shuffle(b_inds)  # FASTATTR: epoch 1's order is drawn before scoring (its minibatches normalise A~)
        sel = select_records(args, agent, b_obs, b_actions, b_advantages, b_inds, filter_rng)  # FASTATTR
        b_inds = sel.epoch1_order.numpy().copy()  # FASTATTR: the kept records in epoch 1's order, shuffled after it
        history["minibatches"].append([])  # FASTATTR: what each step trained on, for the tests
        for epoch in range(args.update_epochs):
            if epoch > 0:  # FASTATTR: epoch 1 keeps the order the scores assumed
                np.random.shuffle(b_inds)
            history["minibatches"][-1].append([])  # FASTATTR
            for start in range(0, len(b_inds), args.minibatch_size):  # FASTATTR: the kept count, not args.batch_size
                end = start + args.minibatch_size
                mb_inds = b_inds[start:end]
                history["minibatches"][-1][-1].append(mb_inds.copy())  # FASTATTR

                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb_inds], b_actions.long()[mb_inds])
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()

                with torch.no_grad():
                    # calculate approx_kl with the low-variance estimator (ratio - 1) - log(ratio)
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]

                mb_advantages = b_advantages[mb_inds]
                # FASTATTR: dropping records can leave a last minibatch of one, whose std is NaN: leave it raw
                if args.norm_adv and len(mb_inds) > 1:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

                # Policy loss
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                # Value loss
                newvalue = newvalue.view(-1)
                if args.clip_vloss:
                    v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                    v_clipped = b_values[mb_inds] + torch.clamp(
                        newvalue - b_values[mb_inds],
                        -args.clip_coef,
                        args.clip_coef,
                    )
                    v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                    v_loss_max = torch.max(v_loss_unclipped, v_loss_clipped)
                    v_loss = 0.5 * v_loss_max.mean()
                else:
                    v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()

            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

        history["kept_fractions"].append(sel.kept_fraction)  # FASTATTR
        history["attribution_seconds"].append(sel.seconds)  # FASTATTR
        history["keep"].append(sel.keep.numpy())  # FASTATTR
        recent = [r for _, r in history["episodic_returns"][-20:]]
        sps = int(global_step / (time.time() - start_time))
        print(
            f"iteration={iteration} global_step={global_step} "
            f"episodic_return={np.mean(recent) if recent else float('nan'):.1f} "
            f"kept={sel.kept_fraction:.3f} attribution_s={sel.seconds:.3f} "  # FASTATTR
            f"approx_kl={approx_kl.item():.1e} SPS={sps}",
            flush=True,
        )
        if writer is not None:
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
            writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
            writer.add_scalar("losses/entropy", entropy_loss.item(), global_step)
            writer.add_scalar("losses/old_approx_kl", old_approx_kl.item(), global_step)
            writer.add_scalar("losses/approx_kl", approx_kl.item(), global_step)
            writer.add_scalar("losses/clipfrac", np.mean(clipfracs), global_step)
            writer.add_scalar("losses/explained_variance", explained_var, global_step)
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("fastattr/kept_fraction", sel.kept_fraction, global_step)  # FASTATTR
            writer.add_scalar("fastattr/attribution_seconds", sel.seconds, global_step)  # FASTATTR

    envs.close()
    if writer is not None:
        writer.close()
    final = [r for _, r in history["episodic_returns"][-20:]]
    history["final_mean_return"] = float(np.mean(final)) if final else float("nan")
    history["agent"] = agent
    print(f"final mean episodic return (last {len(final)} episodes): {history['final_mean_return']:.1f}; "
          f"mean kept fraction: {np.mean(history['kept_fractions']):.3f}", flush=True)
    return history


if __name__ == "__main__":
    main(tyro.cli(Args))
