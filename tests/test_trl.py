"""fastattr.integrations.trl.IIFGRPOTrainer: bit-identical to TRL's GRPOTrainer without a filter; the scores it uses
equal fastattr.score (and the brute-force oracle) computed outside it on the same generation batch and parameters;
the record losses add up to the loss TRL optimises; dropped completions leave the loss. Tiny GPT-Neo on CPU, a
reward function in Python, no downloads."""
import copy

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

import fastattr
from fastattr.integrations.trl import IIFGRPOTrainer
from fastattr.rlhf.task import Language, make_lm
from fastattr.testing import brute_force_scores

pytestmark = pytest.mark.usefixtures("one_thread")  # scores and timings as in the loop, whatever the machine

LANG = Language(0)


def reward(completion_ids, **kwargs):
    """A deterministic reward with spread inside every group: the mean token id modulo 1."""
    return [(sum(ids) / max(len(ids), 1) / 7.0) % 1.0 for ids in completion_ids]


def dataset():
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(LANG.vocab[int(i)] for i in torch.randint(20, len(LANG), (5,), generator=g)) for _ in range(24)]
    return Dataset.from_dict({"prompt": prompts})


def trainer(cls, tmp_path, steps=3, loss_type="dapo", bf16=False, checkpointing=True, **kwargs):
    """TRL's defaults except: float32 unless bf16 (TRL's default is bf16 autocast, also on CPU), a constant learning
    rate, sampling temperature 0.9 (so that the temperature is tested), tiny sizes. TRL's default activation
    checkpointing keeps IIFGRPOTrainer on separate scoring passes; checkpointing=False lets it fuse them."""
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=6, num_generations=3,
                      max_completion_length=6, max_steps=steps, learning_rate=1e-2, lr_scheduler_type="constant",
                      loss_type=loss_type, seed=0, report_to=[], save_strategy="no", logging_steps=1,
                      disable_tqdm=True, temperature=0.9, bf16=bf16,
                      **({} if checkpointing else {"gradient_checkpointing": False}))
    return cls(model=make_lm(len(LANG), width=16, layers=2, heads=2, seed=0), reward_funcs=reward, args=args,
               train_dataset=dataset(), processing_class=LANG.tokenizer(), **kwargs)


class Probe(IIFGRPOTrainer):
    """Keeps what the filter saw: the parameters at scoring time, the batch before and after filtering."""

    def _filter(self, output):
        self.params_at_scoring = copy.deepcopy(self.accelerator.unwrap_model(self.model).state_dict())
        self.before = {k: v.clone() if torch.is_tensor(v) else v for k, v in output.items()}
        super()._filter(output)
        self.after = output


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_filter_none_is_bit_identical_to_grpo(tmp_path, bf16):
    plain = trainer(GRPOTrainer, tmp_path / "plain", bf16=bf16)
    plain.train()
    iif = trainer(IIFGRPOTrainer, tmp_path / "iif", bf16=bf16, filter="none")
    iif.train()
    assert iif.last_scores is not None and iif.last_keep.all()
    for (name, a), (_, b) in zip(plain.model.named_parameters(), iif.model.named_parameters()):
        assert torch.equal(a, b), name


def outside(t: Probe, model=None):
    """A plain GPT-Neo at the parameters the trainer scored at (or `model`), and record and target losses written
    here from TRL's loss on the batch TRL generated."""
    if model is None:
        model = make_lm(len(LANG), width=16, layers=2, heads=2)
        model.load_state_dict(t.params_at_scoring)
        model.eval()
    out = t.before
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    mask, adv, n_prompt = out["completion_mask"].float(), out["advantages"], out["prompt_ids"].shape[1]
    per_device = t.args.per_device_train_batch_size
    weights = {"dapo": mask / out["num_items_in_batch"].float(),
               "grpo": mask / (mask.sum(1, keepdim=True) * per_device),
               "dr_grpo": mask / (per_device * t.args.max_completion_length)}[t.loss_type]

    def logp(m):
        logits = m(input_ids=ids, attention_mask=attention).logits[:, n_prompt - 1:-1] / t.temperature
        return torch.log_softmax(logits, -1).gather(-1, out["completion_ids"][..., None]).squeeze(-1) * mask

    def records(m):
        return -(adv[:, None] * logp(m) * weights).sum(1)

    def target(m):
        return -(adv * logp(m).sum(1)).mean()

    return model, records, target


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_scores_equal_fastattr_outside_and_records_add_up_to_trl_loss(tmp_path, loss_type):
    t = trainer(Probe, tmp_path, steps=1, loss_type=loss_type, filter="iif", p=1.0)
    t.train()
    model, records, target = outside(t)
    torch.testing.assert_close(t.last_scores, fastattr.score(model, records, target), rtol=1e-5, atol=1e-9)
    oracle = brute_force_scores(model, records, target)
    assert ((t.last_scores.double() - oracle).abs().max() / oracle.abs().max()).item() < 1e-4
    # the gradient of TRL's own loss on the unfiltered batch is the gradient of the summed record losses ...
    model = t.accelerator.unwrap_model(t.model)
    model.load_state_dict(t.params_at_scoring)
    _, records, _ = outside(t, model)
    params = [p for p in model.parameters() if p.requires_grad]
    trl_grad = torch.autograd.grad(t._compute_loss(model, t.before), params)
    for a, b in zip(trl_grad, torch.autograd.grad(records(model).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # ... and on the filtered batch, of the kept records' losses only
    kept = t.last_keep
    assert 0 < int(kept.sum()) < len(kept)
    assert (t.after["completion_mask"][~kept] == 0).all()
    assert torch.equal(t.after["completion_mask"][kept], t.before["completion_mask"][kept])
    trl_grad = torch.autograd.grad(t._compute_loss(model, t.after), params)
    for a, b in zip(trl_grad, torch.autograd.grad(records(model)[kept].sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_bf16_training_scores_in_float32(tmp_path):
    """Under TRL's default bf16 autocast the scores are still those of the float32 loss at the same parameters."""
    t = trainer(Probe, tmp_path, steps=1, bf16=True, filter="iif", p=1.0)
    t.train()
    model, records, target = outside(t)
    torch.testing.assert_close(t.last_scores, fastattr.score(model, records, target), rtol=1e-5, atol=1e-9)


def test_logs_and_random_control(tmp_path):
    t = trainer(IIFGRPOTrainer, tmp_path, steps=2, filter="random", p=1.0)
    t.train()
    logged = [h for h in t.state.log_history if "attribution/kept_fraction" in h]
    assert len(logged) == 2 and all(0 < h["attribution/kept_fraction"] <= 1 for h in logged)
    assert all(h["attribution/seconds"] > 0 for h in logged)
    # random drops as many completions as iif-all-neg would
    assert int((~t.last_keep).sum()) == int((t.last_scores < 0).sum())


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="filter must be one of"):
        trainer(IIFGRPOTrainer, tmp_path, filter="all")
    with pytest.raises(ValueError, match="p .* must be a number"):
        trainer(IIFGRPOTrainer, tmp_path, p=0.0)
    with pytest.raises(ValueError, match="loss_type='bnpo'"):
        trainer(IIFGRPOTrainer, tmp_path, loss_type="bnpo")
    with pytest.raises(ValueError, match="score_kwargs"):
        trainer(IIFGRPOTrainer, tmp_path, score_kwargs={"units": None})


# ---- the fused step: scores and filter from the training step's own passes ------------------------------------------
class FusedProbe(IIFGRPOTrainer):
    """Keeps what the fused step saw (the parameters, the batch) and the gradient it left."""

    def _fused_step(self, model, inputs):
        unwrapped = self.accelerator.unwrap_model(model)
        self.params_at_scoring = copy.deepcopy(unwrapped.state_dict())
        self.before = {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
        out = super()._fused_step(model, inputs)
        self.grads = {k: p.grad.clone() for k, p in unwrapped.named_parameters() if p.grad is not None}
        return out


def test_fused_only_where_it_applies(tmp_path):
    assert trainer(IIFGRPOTrainer, tmp_path, checkpointing=False).fused
    t = trainer(IIFGRPOTrainer, tmp_path)  # TRL's default activation checkpointing
    assert not t.fused and "gradient checkpointing" in t.why_not_fused
    with pytest.raises(ValueError, match="gradient checkpointing"):
        trainer(IIFGRPOTrainer, tmp_path, fused=True)
    with pytest.raises(ValueError, match="loss_type='grpo'"):
        trainer(IIFGRPOTrainer, tmp_path, checkpointing=False, loss_type="grpo", fused=True)
    with pytest.raises(ValueError, match="mixed precision"):
        trainer(IIFGRPOTrainer, tmp_path, checkpointing=False, bf16=True, fused=True)
    assert not trainer(IIFGRPOTrainer, tmp_path, checkpointing=False, fused=False).fused
    t = trainer(IIFGRPOTrainer, tmp_path, checkpointing=False, score_kwargs={"check": True})
    assert not t.fused and "score_kwargs ['check']" in t.why_not_fused
    t = trainer(IIFGRPOTrainer, tmp_path, checkpointing=False, score_kwargs={"params": lambda name: "h.0" in name})
    assert not t.fused and "score_kwargs ['params']" in t.why_not_fused


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo"])
def test_fused_scores_and_update_are_the_separate_ones(tmp_path, loss_type):
    """The fused step's scores are fastattr.score's against the batch target, and the gradient it leaves is that of
    TRL's own loss on the batch with the dropped completions masked out (what the separate path trains on)."""
    t = trainer(FusedProbe, tmp_path, steps=1, loss_type=loss_type, checkpointing=False, filter="iif", p=1.0)
    assert t.fused
    t.train()
    model, records, target = outside(t)
    torch.testing.assert_close(t.last_scores, fastattr.score(model, records, target), rtol=1e-5, atol=1e-9)
    oracle = brute_force_scores(model, records, target)
    assert ((t.last_scores.double() - oracle).abs().max() / oracle.abs().max()).item() < 1e-4
    kept = t.last_keep
    assert 0 < int(kept.sum()) < len(kept) and kept.equal(t.last_scores >= 0)  # iif with p=1: the negatives go
    model = t.accelerator.unwrap_model(t.model)
    model.load_state_dict(t.params_at_scoring)
    masked = dict(t.before, completion_mask=t.before["completion_mask"] * kept[:, None].to(t.before["completion_mask"]))
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    trl_grad = torch.autograd.grad(t._compute_loss(model, masked), [p for p in model.parameters() if p.requires_grad])
    assert set(t.grads) == set(names)
    for k, g in zip(names, trl_grad):
        torch.testing.assert_close(t.grads[k], g, rtol=1e-4, atol=1e-7)


def test_fused_filter_none_trains_as_grpo(tmp_path):
    plain = trainer(GRPOTrainer, tmp_path / "plain", checkpointing=False)
    plain.train()
    fused = trainer(IIFGRPOTrainer, tmp_path / "fused", checkpointing=False, filter="none")
    assert fused.fused
    fused.train()
    assert fused.last_keep.all()
    # the same gradient summed in another order: rounding, which Adam's normalisation makes up to ~1e-6 after 3 steps
    # of lr 1e-2 (the parameters move by ~3e-2)
    for (name, a), (_, b) in zip(plain.model.named_parameters(), fused.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
