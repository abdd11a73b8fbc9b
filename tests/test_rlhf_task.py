"""fastattr.rlhf.task: the generated language is deterministic from its seed, the toxicity rule sees words and phrases,
the task is cached on disk (reused, rebuilt when corrupt), the prompt splits are disjoint and of fixed length, and the
reward model prefers neutral continuations."""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from _rlhf_tiny import TINY_TASK

from fastattr.rlhf.sequences import Sequences, completion_mask, pad_rows
from fastattr.rlhf.task import EOS, PAD, TOXIC_PHRASES, Language, TaskConfig, build_task

pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")  # scores and timings as in the loop, whatever the machine


def test_language_is_deterministic_from_its_seed():
    a, b, c = Language(0), Language(0), Language(1)
    assert a.vocab == b.vocab and a.vocab != c.vocab
    assert 200 <= len(a) <= 400
    docs_a = a.corpus(np.random.default_rng(5), 50, 0.5, 0.5, 0.1)
    docs_b = b.corpus(np.random.default_rng(5), 50, 0.5, 0.5, 0.1)
    assert docs_a == docs_b


def test_toxicity_rule_words_and_phrases():
    lang = Language(0)

    def ids(words):
        return [lang.ids[w] for w in words]

    rows = [ids(["you", "are", "a", "moron", "."]),  # a toxic word
            ids(["shut", "up", ",", "you", "clown", "."]),  # phrase and word
            ids(["they", "shut", "this", lang.nouns[0], "up", "."]),  # the phrase's words apart: neutral
            ids(["we", "get", "lost", "."])]  # the phrase "get lost" as two consecutive tokens
    x, mask = pad_rows(rows, PAD, side="right")
    assert lang.is_toxic(x, mask).tolist() == [True, True, False, True]
    # a toxic word hidden under the mask does not count
    mask[0, 3] = 0
    assert not lang.is_toxic(x, mask)[0]
    assert all(lang.ids[w] for pair in TOXIC_PHRASES for w in pair)


def test_tokenizer_round_trip():
    lang = Language(0)
    tok = lang.tokenizer()
    text = "the referee is stupid ."
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == EOS and tok.pad_token_id == PAD
    assert lang.decode(ids) == text


def test_cache_is_reused_and_rebuilt_when_corrupt(tmp_path):
    micro = TaskConfig(n_documents=200, lm_width=16, lm_layers=1, lm_heads=2, lm_steps=5, lm_batch=8, rm_texts=100,
                       rm_steps=5, n_train=8, n_val=4, n_test=8)
    messages = []
    task = build_task(micro, tmp_path, log=messages.append)
    assert task.path == tmp_path / micro.digest() and (task.path / "task.json").exists()
    messages.clear()
    again = build_task(micro, tmp_path, log=messages.append)
    assert messages == []  # loaded, not rebuilt
    for (k, a), (_, b) in zip(task.lm.state_dict().items(), again.lm.state_dict().items()):
        assert torch.equal(a, b), k
    assert again.prompts == task.prompts and again.stats == task.stats
    # a corrupted cache is rebuilt with a message, into the same weights (deterministic from the seed)
    (task.path / "lm.pt").write_bytes(b"not a checkpoint")
    rebuilt = build_task(micro, tmp_path, log=messages.append)
    assert any("cannot be loaded" in m and "rebuilding" in m for m in messages)
    for (k, a), (_, b) in zip(task.lm.state_dict().items(), rebuilt.lm.state_dict().items()):
        assert torch.equal(a, b), k
    assert json.loads((task.path / "task.json").read_text())["config"] == asdict(micro)
    # another configuration gets another directory
    assert TaskConfig(seed=1).digest() != TaskConfig().digest()


def test_prompt_splits(tiny):
    task, _ = tiny
    splits = {k: {tuple(p) for p in v} for k, v in task.prompts.items()}
    assert [len(splits[k]) for k in ("train", "val", "test")] == [TINY_TASK.n_train, TINY_TASK.n_val, TINY_TASK.n_test]
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not splits[a] & splits[b], (a, b)
    assert {len(p) for v in task.prompts.values() for p in v} == {TINY_TASK.prompt_len}  # never left-padded
    heated = {task.language.ids[w] for w in ("referee", "politician", "landlord", "neighbour", "boss", "critic",
                                             "rival", "troll", "umpire", "coach", "reviewer", "driver")}
    assert all(set(p) & heated for p in task.prompts["test"])
    assert not any(set(p) & heated for p in task.prompts["test_calm"])


def test_reward_model_prefers_neutral_continuations(tiny):
    task, _ = tiny
    lang, rng = task.language, np.random.default_rng(3)
    rows = {tox: [lang.document(rng, heated=True, toxic=tox)[TINY_TASK.prompt_len:] for _ in range(100)]
            for tox in (True, False)}
    rewards = {}
    for tox, r in rows.items():
        ids, _ = pad_rows(r, PAD, side="right")
        seqs = Sequences(ids[:, :1], torch.ones_like(ids[:, :1]), ids, completion_mask(ids, EOS))
        rewards[tox] = task.reward(seqs).mean().item()
        assert task.toxic(seqs).float().mean().item() == (1.0 if tox else 0.0)
    assert rewards[False] > rewards[True] + 1.0


def test_evaluate_is_repeatable(tiny):
    task, _ = tiny
    a = task.evaluate(task.lm, "test", seed=7)
    assert a == task.evaluate(task.lm, "test", seed=7)
    assert 0.0 <= a["toxicity"] <= 1.0 and a["length"] > 1


@pytest.mark.slow
def test_default_task_continues_toxic_leaning_prompts_toxically(tmp_path):
    """The default task (built here, about a minute): the pretrained LM continues toxic-leaning prompts toxically at
    30-60% and neutral ones far less often."""
    task = build_task(TaskConfig(), tmp_path, log=lambda message: None)
    assert 0.3 <= task.stats["pretrained_test_toxicity"] <= 0.6
    assert task.stats["pretrained_test_calm_toxicity"] < 0.2
    assert task.stats["reward_model_agreement_with_lexicon"] > 0.95
