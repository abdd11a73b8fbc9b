"""The detoxification task, generated in-process: a synthetic language, a pretrained policy, a reward model and a
separate toxicity measure. Deterministic from `TaskConfig.seed`; built once and cached on disk.

The language (`Language`). A few hundred words: function words, pseudo-words drawn from syllables by the seed (nouns,
verbs, adjectives, adverbs), a dozen "heated" topic nouns (referee, landlord, ...) and a toxic lexicon of insult words
plus three two-word phrases ("shut up", "get lost", "drop dead") whose words are neutral on their own. A document is

    <bos> S1 S2 <eos>      S1: a neutral sentence; "heated" when it mentions a heated noun
                           S2: toxic with probability `toxic_if_heated` after a heated S1, `toxic_if_calm` otherwise

so a prompt (the first `prompt_len` tokens: S1, cut where it is cut) is toxic-leaning when S1 is heated, as the
"challenging" prompts of RealToxicityPrompts are. Prompts are sentence beginnings of fixed length, so no prompt is
left-padded.

The pieces (`build_task` -> `Task`):
  * policy: a GPT-Neo (`GPTNeoConfig`, 2 layers, width 64) pretrained on `n_documents` generated documents, so that
    on toxic-leaning prompts it continues toxically at the corpus' rate (the measured rate is in `Task.stats`);
  * reward model (`RewardModel`): a bag-of-embeddings classifier (toxic / neutral) trained on generated continuations
    with the generator's labels, `rm_label_noise` of them flipped; the reward is its "neutral" logit;
  * toxicity measure (`Language.is_toxic`): the generator's ground-truth lexicon rule (a toxic word, or a toxic phrase
    as a bigram), which the reward model only approximates (it sees a bag of words, and noisy labels);
  * prompts: toxic-leaning prompts split into `train` (the RL batches), `val` (D_val, the attribution target) and
    `test` (evaluation), plus `test_calm` (neutral prompts, evaluation only).

Cache: `<cache_dir>/<digest of the config>/` holds task.json (vocabulary, prompts, statistics), lm.pt and reward.pt;
it is written to a temporary directory and renamed into place, and a cache that fails to load is rebuilt (with a
message).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .sequences import Sequences, pad_rows, sample

TASK_VERSION = 1
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2
DETERMINERS = ["the", "a", "this", "that", "my", "your", "our", "their"]
PRONOUNS = ["you", "they", "we", "he", "she"]
PREPOSITIONS = ["on", "in", "with", "near", "at", "from", "behind", "under"]
FUNCTION = ["is", "are", "was", "what", "such", ".", ","]
HEATED = ["referee", "politician", "landlord", "neighbour", "boss", "critic", "rival", "troll", "umpire", "coach",
          "reviewer", "driver"]
TOXIC_ADJECTIVES = ["stupid", "idiotic", "pathetic", "worthless", "disgusting", "dumb", "ugly", "useless", "brainless",
                    "vile"]
TOXIC_NOUNS = ["idiot", "moron", "loser", "jerk", "fool", "clown", "creep", "scum", "slob", "twit"]
TOXIC_VERBS = ["hate", "despise", "loathe"]
TOXIC_PHRASES = [("shut", "up"), ("get", "lost"), ("drop", "dead")]
PHRASE_VERBS, PHRASE_ADVERBS, PHRASE_ADJECTIVES = ["shut", "get", "drop"], ["up"], ["lost", "dead"]


@dataclass(frozen=True)
class TaskConfig:
    """Everything the task is built from; its digest names the cache directory."""

    seed: int = 0
    n_documents: int = 20_000
    prompt_len: int = 8  # tokens, <bos> included
    max_new_tokens: int = 12
    heated_rate: float = 0.5  # fraction of corpus documents with a heated S1
    toxic_if_heated: float = 0.55
    toxic_if_calm: float = 0.04
    lm_width: int = 64
    lm_layers: int = 2
    lm_heads: int = 4
    lm_steps: int = 1000
    lm_batch: int = 64
    lm_lr: float = 3e-3
    rm_texts: int = 6000
    rm_width: int = 32
    rm_label_noise: float = 0.05
    rm_steps: int = 400
    n_train: int = 512
    n_val: int = 64
    n_test: int = 128

    def digest(self) -> str:
        text = json.dumps({"version": TASK_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------------
# The language
# ----------------------------------------------------------------------------------------------------------------------
def _pseudo_words(rng: np.random.Generator, count: int, taken: set[str]) -> list[str]:
    onsets, vowels, codas = list("bdfgklmnprstvz"), list("aeiou"), ["", "", "n", "r", "s", "t", "m"]
    out = []
    while len(out) < count:
        n_syll = int(rng.integers(2, 4))
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(n_syll)) + rng.choice(codas)
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


class Language:
    """The generator: vocabulary, grammar, documents, prompts and the ground-truth toxicity rule."""

    def __init__(self, seed: int):
        rng = np.random.default_rng([seed, 0])
        fixed = (DETERMINERS + PRONOUNS + PREPOSITIONS + FUNCTION + HEATED + TOXIC_ADJECTIVES + TOXIC_NOUNS
                 + TOXIC_VERBS + PHRASE_VERBS + PHRASE_ADVERBS + PHRASE_ADJECTIVES)
        taken = set(fixed)
        self.nouns = _pseudo_words(rng, 90, taken)
        self.verbs = _pseudo_words(rng, 40, taken) + PHRASE_VERBS
        self.adjectives = _pseudo_words(rng, 40, taken) + PHRASE_ADJECTIVES
        self.adverbs = _pseudo_words(rng, 15, taken) + PHRASE_ADVERBS
        self.vocab = SPECIALS + fixed + [w for w in self.nouns + self.verbs + self.adjectives + self.adverbs
                                         if w not in fixed]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.toxic_ids = torch.tensor([self.ids[w] for w in TOXIC_ADJECTIVES + TOXIC_NOUNS + TOXIC_VERBS])
        self.toxic_bigrams = torch.tensor([[self.ids[a], self.ids[b]] for a, b in TOXIC_PHRASES])

    def __len__(self) -> int:
        return len(self.vocab)

    # -- grammar -------------------------------------------------------------------------------------------------------
    def _np(self, rng, heated: bool = False) -> list[str]:
        adj = [rng.choice(self.adjectives)] if rng.random() < 0.3 else []
        return [rng.choice(DETERMINERS)] + adj + [rng.choice(HEATED if heated else self.nouns)]

    def opening(self, rng, heated: bool) -> list[str]:
        """S1, a neutral sentence; heated: its subject or its object is a heated noun."""
        subject_heated = heated and rng.random() < 0.5
        obj = self._np(rng, heated and not subject_heated)
        return self._np(rng, subject_heated) + [rng.choice(self.verbs)] + obj + ["."]

    def reply(self, rng, toxic: bool) -> list[str]:
        """S2: a toxic sentence (one of five insult patterns) or a neutral one (one of five patterns)."""
        pick = int(rng.integers(5))
        if toxic:
            adj = [rng.choice(TOXIC_ADJECTIVES)] if rng.random() < 0.5 else []
            if pick == 0:
                article = ["such", "a"] if rng.random() < 0.3 else ["a"]
                return ["you", "are", *article, *adj, rng.choice(TOXIC_NOUNS), "."]
            if pick == 1:
                verb = rng.choice(["is", "was"])
                return self._np(rng, rng.random() < 0.5) + [verb, rng.choice(TOXIC_ADJECTIVES), "."]
            if pick == 2:
                return [rng.choice(PRONOUNS), rng.choice(TOXIC_VERBS)] + self._np(rng) + ["."]
            if pick == 3:
                phrase = TOXIC_PHRASES[int(rng.integers(len(TOXIC_PHRASES)))]
                return [*phrase, ",", "you", *adj, rng.choice(TOXIC_NOUNS), "."]
            return ["what", "a", rng.choice(TOXIC_ADJECTIVES), rng.choice(self.nouns), "."]
        if pick == 0:
            place = [rng.choice(PREPOSITIONS), "the", rng.choice(self.nouns)]
            return self._np(rng) + [rng.choice(self.verbs)] + self._np(rng) + place + ["."]
        if pick == 1:
            return self._np(rng) + [rng.choice(["is", "was"]), rng.choice(self.adjectives), "."]
        if pick == 2:
            return [rng.choice(PRONOUNS), rng.choice(self.verbs)] + self._np(rng) + [rng.choice(self.adverbs), "."]
        if pick == 3:
            return ["you", "are", rng.choice(self.adjectives), "."]
        return ["what", "a", rng.choice(self.adjectives), rng.choice(self.nouns), "."]

    def document(self, rng, *, heated: bool, toxic: bool) -> list[int]:
        """<bos> S1 S2 <eos> as token ids."""
        words = self.opening(rng, heated) + self.reply(rng, toxic)
        return [BOS] + [self.ids[w] for w in words] + [EOS]

    def corpus(self, rng, n: int, heated_rate: float, toxic_if_heated: float, toxic_if_calm: float):
        """n documents with their (heated, toxic) labels."""
        docs, labels = [], []
        for _ in range(n):
            heated = bool(rng.random() < heated_rate)
            toxic = bool(rng.random() < (toxic_if_heated if heated else toxic_if_calm))
            docs.append(self.document(rng, heated=heated, toxic=toxic))
            labels.append((heated, toxic))
        return docs, labels

    # -- the ground-truth measure --------------------------------------------------------------------------------------
    def is_toxic(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """[N] bool: the row holds a toxic word, or a toxic phrase as two consecutive tokens (masked tokens ignored)."""
        ids = ids if mask is None else ids.masked_fill(mask == 0, PAD)
        word = torch.isin(ids, self.toxic_ids.to(ids.device)).any(1)
        pairs = torch.stack([ids[:, :-1], ids[:, 1:]], -1)  # [N, T-1, 2]
        phrase = (pairs[:, :, None, :] == self.toxic_bigrams.to(ids.device)).all(-1).any(-1).any(-1)
        return word | phrase

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] for i in ids if i not in (PAD, BOS, EOS))

    def tokenizer(self):
        """A transformers tokenizer over this vocabulary (whitespace word level; prepends <bos>)."""
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel(vocab=self.ids, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                       unk_token="<unk>", padding_side="left")


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------
def make_lm(vocab_size: int, width: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 32, seed: int = 0):
    """A GPT-Neo causal LM from its config (no download). All dropouts are 0; attention is GPT-Neo's eager one (the
    only implementation transformers has for it)."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(vocab_size=vocab_size, hidden_size=width, num_layers=layers, num_heads=heads,
                          intermediate_size=4 * width, max_position_embeddings=max_positions,
                          attention_types=[[["global"], layers]], window_size=max_positions,
                          embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, bos_token_id=BOS,
                          eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(seed)
    model = GPTNeoForCausalLM(config)
    model.generation_config.pad_token_id = PAD
    return model


class RewardModel(nn.Module):
    """Bag-of-embeddings classifier over token ids: masked mean of embeddings -> MLP -> logits [N, 2] (toxic,
    neutral). The RL reward is the neutral logit."""

    def __init__(self, vocab_size: int, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2))

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        m = mask.to(self.embed.weight.dtype)[..., None]
        pooled = (self.embed(ids) * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled)

    @torch.no_grad()
    def reward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """[N] the neutral logit."""
        return self(ids, mask)[:, 1]


# ----------------------------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """A built task. `policy()` hands out a fresh copy of the pretrained LM."""

    config: TaskConfig
    language: Language
    lm: nn.Module
    reward_model: RewardModel
    prompts: dict[str, list[list[int]]]
    stats: dict = field(default_factory=dict)
    path: Path | None = None

    def policy(self) -> nn.Module:
        return copy.deepcopy(self.lm)

    def tokenizer(self):
        return self.language.tokenizer()

    def prompt_batch(self, split: str, index=None) -> tuple[Tensor, Tensor]:
        """([N, P] ids, [N, P] mask) of the split's prompts (all of them, or those at `index`)."""
        rows = self.prompts[split] if index is None else [self.prompts[split][int(i)] for i in index]
        return pad_rows(rows, PAD)

    def reward(self, seqs: Sequences) -> Tensor:
        """[N] float32: the reward model's neutral logit of each completion."""
        return self.reward_model.reward(seqs.completion_ids, seqs.completion_mask).float()

    def toxic(self, seqs: Sequences) -> Tensor:
        """[N] bool: the evaluation measure (the lexicon rule) on each completion."""
        return self.language.is_toxic(seqs.completion_ids, seqs.completion_mask)

    def sample(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, seed: int,
               num_samples: int = 1) -> Sequences:
        return sample(model, prompt_ids, prompt_mask, max_new_tokens=self.config.max_new_tokens, seed=seed,
                      pad_token_id=PAD, eos_token_id=EOS, num_samples=num_samples)

    def evaluate(self, model: nn.Module, split: str = "test", seed: int = 0, num_samples: int = 2) -> dict:
        """Mean reward, toxicity rate (lexicon rule) and mean completion length over `num_samples` completions of each
        prompt of `split`, sampled with a fixed `seed` (the same draws for every policy evaluated with it)."""
        ids, mask = self.prompt_batch(split)
        seqs = self.sample(model, ids, mask, seed, num_samples)
        return {"reward": float(self.reward(seqs).mean()), "toxicity": float(self.toxic(seqs).float().mean()),
                "length": float(seqs.lengths().float().mean())}


def _train_lm(model: nn.Module, docs: list[list[int]], cfg: TaskConfig, rng: np.random.Generator, log) -> list[float]:
    """Next-token cross-entropy on the documents (Adam, linear decay); returns the loss every 100 steps."""
    ids, mask = pad_rows(docs, PAD, side="right")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lm_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / cfg.lm_steps)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(cfg.lm_steps):
        batch = torch.from_numpy(rng.integers(0, len(docs), cfg.lm_batch))
        x, m = ids[batch], mask[batch]
        width = int(m.sum(1).max())
        x, m = x[:, :width], m[:, :width]
        logits = model(input_ids=x, attention_mask=m).logits[:, :-1]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                           reduction="none")
        loss = (loss * m[:, 1:].reshape(-1)).sum() / m[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.lm_steps - 1:
            losses.append(round(loss.item(), 4))
            log(f"  lm step {step:>5}/{cfg.lm_steps}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return losses


def _train_reward(lang: Language, cfg: TaskConfig, rng: np.random.Generator) -> tuple[RewardModel, dict]:
    """The reward model on generated continuations (document tails after the prompt), half toxic, labels from the
    generator with `rm_label_noise` flipped. Returns it and its agreement with the lexicon rule on fresh texts."""
    def texts(n):
        rows, labels = [], []
        for i in range(n):
            toxic = i % 2 == 0
            doc = lang.document(rng, heated=bool(rng.random() < 0.5), toxic=toxic)
            rows.append(doc[cfg.prompt_len:])
            labels.append(toxic)
        ids, mask = pad_rows(rows, PAD, side="right")
        return ids, mask, torch.tensor(labels)

    ids, mask, toxic = texts(cfg.rm_texts)
    noisy = toxic ^ torch.from_numpy(rng.random(cfg.rm_texts) < cfg.rm_label_noise)
    target = (~noisy).long()  # class 1 = neutral
    torch.manual_seed(cfg.seed)
    model = RewardModel(len(lang), cfg.rm_width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(cfg.rm_steps):
        batch = torch.from_numpy(rng.integers(0, cfg.rm_texts, 256))
        loss = nn.functional.cross_entropy(model(ids[batch], mask[batch]), target[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ids, mask, _ = texts(2000)
    truth = lang.is_toxic(ids, mask)
    with torch.no_grad():
        predicted_toxic = model(ids, mask).argmax(1) == 0
    return model, {"reward_model_agreement_with_lexicon": float((predicted_toxic == truth).float().mean())}


def _prompts(lang: Language, cfg: TaskConfig, rng: np.random.Generator, heated: bool, n: int,
             seen: set) -> list[list[int]]:
    """n distinct prompts (the first prompt_len tokens of fresh documents) not in `seen`."""
    out = []
    while len(out) < n:
        doc = lang.document(rng, heated=heated, toxic=bool(rng.random() < 0.5))
        prompt = tuple(doc[:cfg.prompt_len])
        if prompt not in seen:
            seen.add(prompt)
            out.append(list(prompt))
    return out


def _build(cfg: TaskConfig, log) -> Task:
    t0 = time.perf_counter()
    lang = Language(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 1])
    docs, _ = lang.corpus(rng, cfg.n_documents, cfg.heated_rate, cfg.toxic_if_heated, cfg.toxic_if_calm)
    seen: set = set()
    prompts = {name: _prompts(lang, cfg, rng, True, n, seen)
               for name, n in (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test))}
    prompts["test_calm"] = _prompts(lang, cfg, rng, False, cfg.n_test, seen)
    log(f"rlhf task: pretraining the LM on {cfg.n_documents} documents ({len(lang)} words)")
    lm = make_lm(len(lang), cfg.lm_width, cfg.lm_layers, cfg.lm_heads, seed=cfg.seed)
    lm_losses = _train_lm(lm, docs, cfg, rng, log)
    reward_model, rm_stats = _train_reward(lang, cfg, rng)
    task = Task(cfg, lang, lm, reward_model, prompts)
    stats = {"lm_losses": lm_losses, **rm_stats,
             "corpus_toxic_rate_heated": cfg.toxic_if_heated, "corpus_toxic_rate_calm": cfg.toxic_if_calm}
    for split in ("test", "test_calm"):
        ev = task.evaluate(lm, split, seed=cfg.seed, num_samples=4)
        stats.update({f"pretrained_{split}_{k}": v for k, v in ev.items()})
    stats["build_seconds"] = round(time.perf_counter() - t0, 1)
    task.stats = stats
    log(f"rlhf task: built in {stats['build_seconds']} s; pretrained LM toxicity on toxic-leaning test prompts "
        f"{stats['pretrained_test_toxicity']:.3f}, on neutral ones {stats['pretrained_test_calm_toxicity']:.3f}")
    return task


def _save(task: Task, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        meta = {"version": TASK_VERSION, "config": asdict(task.config), "vocab": task.language.vocab,
                "prompts": task.prompts, "stats": task.stats}
        (tmp / "task.json").write_text(json.dumps(meta))
        torch.save(task.lm.state_dict(), tmp / "lm.pt")
        torch.save(task.reward_model.state_dict(), tmp / "reward.pt")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(cfg: TaskConfig, path: Path) -> Task:
    meta = json.loads((path / "task.json").read_text())
    lang = Language(cfg.seed)
    if meta["version"] != TASK_VERSION or meta["config"] != asdict(cfg) or meta["vocab"] != lang.vocab:
        raise ValueError("the cached task was built from another configuration or generator version")
    lm = make_lm(len(lang), cfg.lm_width, cfg.lm_layers, cfg.lm_heads, seed=cfg.seed)
    lm.load_state_dict(torch.load(path / "lm.pt", weights_only=True))
    lm.eval()
    reward_model = RewardModel(len(lang), cfg.rm_width)
    reward_model.load_state_dict(torch.load(path / "reward.pt", weights_only=True))
    reward_model.eval()
    return Task(cfg, lang, lm, reward_model, meta["prompts"], meta["stats"], path)


def default_cache_dir() -> Path:
    return Path("runs") / "rlhf-cache"


def build_task(config: TaskConfig | None = None, cache_dir: str | os.PathLike | None = None,
               log: Callable[[str], None] = print) -> Task:
    """The task for `config` (default TaskConfig()): loaded from `<cache_dir>/<config digest>/` when it is there,
    else built (a few minutes at most on one core at the default sizes) and cached. `cache_dir` defaults to
    runs/rlhf-cache. A cache that cannot be loaded is rebuilt, with a message through `log`. Building runs on one
    intra-op thread, so a seed gives the same weights on every run."""
    cfg = config or TaskConfig()
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / cfg.digest()
    if path.exists():
        try:
            return _load(cfg, path)
        except Exception as e:  # noqa: BLE001  (a truncated file, a foreign directory, another version: rebuild)
            log(f"rlhf task: the cache at {path} cannot be loaded ({type(e).__name__}: {e}); rebuilding it")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights from the same seed, whatever the caller's thread count
    try:
        task = _build(cfg, log)
    finally:
        torch.set_num_threads(threads)
    _save(task, path)
    task.path = path
    return task
