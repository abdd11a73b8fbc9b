"""The small task the RLHF tests share: the generator of fastattr.rlhf.task at test sizes, built once per test process
(about 10 s on one core) into a temporary cache. Its LM is trained just enough to continue toxic-leaning prompts
toxically more often than neutral ones (about 0.45 against 0.1), so that a few RL rounds detoxify it measurably."""
import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from fastattr.rlhf.experiment import ExperimentConfig, GRPOSettings
from fastattr.rlhf.ppo import PPOConfig
from fastattr.rlhf.task import TaskConfig

TINY_TASK = TaskConfig(n_documents=4000, lm_width=32, lm_layers=2, lm_heads=2, lm_steps=600, lm_batch=64,
                       rm_texts=1000, rm_steps=100, n_train=64, n_val=16, n_test=64)
TINY_EXPERIMENT = ExperimentConfig(task=TINY_TASK, lora_r=4,
                                   ppo=PPOConfig(batch_size=8, epochs=2, minibatch_size=1, lr=1e-3),
                                   grpo=GRPOSettings(prompts=4, generations=2, steps_per_generation=2, iterations=1),
                                   eval_samples=1)


@functools.cache
def tiny_task():
    """(task, cache_dir), built on first use in this process; the cache is removed when the process exits."""
    from fastattr.rlhf.task import build_task

    cache = Path(tempfile.mkdtemp(prefix="fastattr-rlhf-tests-"))
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    return build_task(TINY_TASK, cache, log=lambda message: None), cache
