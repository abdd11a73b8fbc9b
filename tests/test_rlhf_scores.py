"""fastattr.rlhf.scores: per-sequence and per-token scores of prompt-generation records against the sequence target are
exact against one autograd.grad per record (fastattr.testing.brute_force_scores) in float64, for GPT-2, GPT-Neo and
Llama (tiny configs from transformers), every parameter or LoRA, with left-padded prompts, right-padded completions
and attention masks.

Attention implementations: GPT-Neo has only "eager" in transformers. GPT-2 and Llama run their default "sdpa" (the
general path's forward-mode pass runs SDPA's math kernel, which has forward-mode AD). Llama's "eager" attention is
not used: in float64 its additive mask turns a left-padded row into NaN (a fully masked query row), a transformers
matter that fastattr rightly refuses ("record_loss returned non-finite values").

Float64 is not float64 throughout in two of these models: GPT-Neo computes attention scores in float32 and Llama's
RMSNorm normalises in float32. Forward- and reverse-mode derivatives then differ at float32 precision, so the exact
tests run them with `float64_throughout` (the same methods without the casts); the unpatched models are tested too:
GPT-Neo agrees to 1e-8, and Llama with every parameter is refused (xfail below).
"""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import fastattr
from fastattr.rlhf import scores
from fastattr.rlhf.sequences import Sequences, completion_mask, pad_rows
from fastattr.testing import brute_force_scores

pytestmark = pytest.mark.usefixtures("one_thread")  # scores and timings as in the loop, whatever the machine

V, PAD, EOS = 40, 0, 2
ARCHS = ("gpt2", "gpt-neo", "llama")


@pytest.fixture
def float64_throughout(monkeypatch):
    """GPT-Neo's attention and Llama's RMSNorm without their float32 casts (otherwise the same computation)."""
    from torch import nn
    from transformers.models.gpt_neo import modeling_gpt_neo as neo
    from transformers.models.llama import modeling_llama as llama

    def rms_norm(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def neo_attn(self, query, key, value, attention_mask=None):
        weights = torch.matmul(query, key.transpose(-1, -2))
        q_len, k_len = query.size(-2), key.size(-2)
        causal = self.bias[:, :, k_len - q_len:k_len, :k_len]
        weights = torch.where(causal, weights, torch.tensor(torch.finfo(weights.dtype).min, dtype=weights.dtype))
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = nn.functional.softmax(weights, dim=-1)
        return torch.matmul(self.attn_dropout(weights), value), weights

    monkeypatch.setattr(llama.LlamaRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(neo.GPTNeoSelfAttention, "_attn", neo_attn)


def make_model(arch: str, width: int = 16, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_embd=width, n_layer=2, n_head=2, n_positions=32, bos_token_id=1,
                         eos_token_id=EOS)
        return GPT2LMHeadModel(cfg).eval()
    if arch == "gpt-neo":
        cfg = GPTNeoConfig(vocab_size=V, hidden_size=width, num_layers=2, num_heads=2, intermediate_size=2 * width,
                           max_position_embeddings=32, attention_types=[[["global", "local"], 1]], window_size=8,
                           bos_token_id=1, eos_token_id=EOS)
        return GPTNeoForCausalLM(cfg).eval()
    cfg = LlamaConfig(vocab_size=V, hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=2 * width, max_position_embeddings=32, bos_token_id=1,
                      eos_token_id=EOS)
    return LlamaForCausalLM(cfg).eval()


def with_lora(model, seed: int = 1):
    """LoRA on every Linear / Conv1D, with B moved away from its zero initialisation."""
    model = scores.lora(model, r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def batch(n: int, seed: int) -> Sequences:
    """n pairs with prompts of 3..6 tokens (left-padded) and completions of 1..5 tokens ending in <eos> or cut at 5
    (right-padded)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[1] + torch.randint(3, V, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    prompt_ids, prompt_mask = pad_rows(prompts, PAD)
    completion = torch.randint(3, V, (n, 5), generator=g)
    for i in range(n):
        stop = int(torch.randint(0, 6, (1,), generator=g))
        if stop < 5:
            completion[i, stop] = EOS
    mask = completion_mask(completion, EOS)
    return Sequences(prompt_ids, prompt_mask, completion.masked_fill(mask == 0, PAD), mask)


def case(arch: str, lora: bool, dtype=torch.float64):
    model = make_model(arch).to(dtype)
    model = with_lora(model) if lora else model
    records, target_seqs = batch(6, seed=0), batch(4, seed=1)
    assert (records.prompt_mask == 0).any() and (records.completion_mask == 0).any()  # both kinds of padding
    g = torch.Generator().manual_seed(2)
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    target = scores.SequenceTarget(target_seqs, torch.randn(4, generator=g, dtype=torch.float64))
    return model, records, adv, target


def oracle(model, records, adv, target, per_token=False, **kw):
    return brute_force_scores(
        model, lambda m: scores.record_losses(records.logprobs(m, **kw), adv, per_token=per_token), target)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("form", scores.FORMS)
@pytest.mark.parametrize("lora", [False, True], ids=["all", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_exact_against_brute_force(arch, lora, form, float64_throughout):
    model, records, adv, target = case(arch, lora)
    got = scores.score(model, records, adv, target, form=form)
    want = oracle(model, records, adv, target, per_token=form != "sequence")
    if form == "units":
        want = want.sum(1)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_target_one_forward(arch, float64_throughout):
    """target='batch': the records' own sequence target from the same forward pass (fastattr's joint form)."""
    model, records, adv, _ = case(arch, lora=False)
    got = scores.score(model, records, adv, "batch")

    def joint(m):
        logp = records.logprobs(m)
        return scores.record_losses(logp, adv), scores.sequence_target(logp, adv)

    assert rel_err(got, brute_force_scores(model, joint)) < 1e-10


def test_forms_agree_and_padding_scores_zero(float64_throughout):
    model, records, adv, target = case("gpt-neo", lora=True)
    seq = scores.score(model, records, adv, target)
    tokens = scores.score(model, records, adv, target, form="token")
    assert rel_err(tokens.sum(1), seq) < 1e-10
    assert rel_err(scores.score(model, records, adv, target, form="units"), seq) < 1e-10
    assert (tokens[records.completion_mask == 0] == 0).all()


def test_positions_without_padding_awareness(float64_throughout):
    """position_ids=False (what TRL's loss passes: positions 0..T-1 whatever the padding) is scored exactly too."""
    model, records, adv, target = case("gpt2", lora=False)
    target.position_ids = False
    got = scores.score(model, records, adv, target, position_ids=False)
    assert rel_err(got, oracle(model, records, adv, target, position_ids=False)) < 1e-10


def test_left_padded_log_probs_match_unpadded_rows():
    """With padding-aware positions a left-padded row has the log-probabilities it has alone, unpadded (the
    positions `generate` used when it sampled the completion)."""
    model = make_model("gpt-neo").double()
    records = batch(6, seed=0)
    logp = records.logprobs(model)
    for i in range(len(records)):
        alone = records.select(torch.tensor([i]))
        keep = alone.prompt_mask[0] == 1
        alone = Sequences(alone.prompt_ids[:, keep], alone.prompt_mask[:, keep], alone.completion_ids,
                          alone.completion_mask)
        torch.testing.assert_close(alone.logprobs(model)[0], logp[i], rtol=1e-9, atol=1e-9)


def test_gpt_neo_float32_attention_scores():
    """The stock GPT-Neo in float64 (attention scores in float32): still within 1e-8 of the oracle."""
    model, records, adv, target = case("gpt-neo", lora=False)
    assert rel_err(scores.score(model, records, adv, target), oracle(model, records, adv, target)) < 1e-8


def test_float32_models_within_float32_tolerance():
    for arch in ARCHS:
        model, records, adv, target = case(arch, lora=False, dtype=torch.float32)
        assert rel_err(scores.score(model, records, adv, target), oracle(model, records, adv, target)) < 1e-4, arch


def test_stock_llama_float64_all_parameters():
    """LlamaRMSNorm normalises in float32 even in a float64 model: its weights take the affine fast path (the module
    called again with the target gradient as weight), which follows the module's own arithmetic: exact."""
    model, records, adv, target = case("llama", lora=False)
    assert rel_err(scores.score(model, records, adv, target), oracle(model, records, adv, target)) < 1e-10


def test_wide_float32_gpt2_takes_the_fast_paths():
    """In float32 at width 128 every GPT-2 parameter takes a fast path (Conv1D the linear one, with its weight
    transposed; the norms the affine one, whose check allows for float32 rounding at this width), and the scores
    equal brute force to float32 rounding."""
    model = make_model("gpt2", width=128)
    records, target_seqs = batch(6, seed=0), batch(4, seed=1)
    g = torch.Generator().manual_seed(2)
    adv = torch.randn(6, generator=g)
    target = scores.SequenceTarget(target_seqs, torch.randn(4, generator=g))
    ex = fastattr.explain(model, lambda m: scores.record_losses(records.logprobs(m), adv), target)
    assert ex.general() == {}
    assert ex.paths["transformer.h.0.attn.c_attn.weight"] == ex.paths["transformer.h.0.mlp.c_proj.bias"] == "linear"
    assert ex.paths["transformer.h.0.ln_1.weight"] == "affine"
    assert rel_err(ex.scores, oracle(model, records, adv, target)) < 1e-4


def test_a_conv1d_with_a_forward_of_its_own_is_not_trusted_as_linear():
    """Conv1D takes the linear path by its class; an instance whose forward was replaced is checked like any other
    module (here still affine: it takes the affine path, exactly)."""
    model, records, adv, target = case("gpt2", lora=False)
    layer = model.transformer.h[0].mlp.c_fc
    own = layer.forward
    layer.forward = lambda x: 2.0 * own(x)
    ex = fastattr.explain(model, lambda m: scores.record_losses(records.logprobs(m), adv), target)
    assert ex.paths["transformer.h.0.mlp.c_fc.weight"] == "affine"
    assert ex.paths["transformer.h.1.mlp.c_fc.weight"] == "linear"
    assert rel_err(ex.scores, oracle(model, records, adv, target)) < 1e-9


def test_paths_per_architecture(float64_throughout):
    """Which path fastattr.explain reports for each parameter (also printed in the report)."""
    def paths(arch, lora):
        model, records, adv, target = case(arch, lora)
        ex = fastattr.explain(model, lambda m: scores.record_losses(records.logprobs(m), adv), target)
        return ex.paths

    gpt2 = paths("gpt2", False)
    assert gpt2["transformer.h.0.attn.c_attn.weight"] == "linear"  # Conv1D: a Linear with its weight transposed
    assert gpt2["transformer.h.0.mlp.c_fc.weight"] == "linear"
    assert gpt2["transformer.h.0.ln_1.weight"] == "affine"
    assert gpt2["transformer.wpe.weight"] == "embedding"  # position ids [N, T] (padding-aware)
    assert gpt2["transformer.wte.weight"] in ("embedding", "linear")  # tied to the LM head: both calls add up
    neo = paths("gpt-neo", False)
    assert neo["transformer.h.0.attn.attention.q_proj.weight"] == "linear"
    assert neo["transformer.h.0.mlp.c_fc.weight"] == "linear"
    assert neo["transformer.h.0.ln_1.weight"] == "affine"
    llama = paths("llama", False)
    assert llama["model.layers.0.self_attn.q_proj.weight"] == "linear"
    assert llama["model.embed_tokens.weight"] == "embedding"  # not tied in LlamaConfig's default
    assert llama["lm_head.weight"] == "linear"
    assert llama["model.layers.0.input_layernorm.weight"] == "affine"  # the model's own RMSNorm class
    for arch in ARCHS:  # LoRA's A and B are nn.Linear: all fast, also on GPT-2's Conv1D
        assert set(paths(arch, True).values()) == {"linear"}, arch


def test_input_require_grads_hook():
    """transformers' enable_input_require_grads() (registered by gradient checkpointing, TRL's default) adds a forward
    hook calling output.requires_grad_(), which forward-mode AD cannot run: every parameter here takes a fast path
    (tied embedding and norms included), so no forward-mode pass runs and the scores are exact."""
    model, records, adv, target = case("gpt-neo", lora=False, dtype=torch.float32)
    model.enable_input_require_grads()
    assert rel_err(scores.score(model, records, adv, target), oracle(model, records, adv, target)) < 1e-4


def test_bf16_autocast_forward():
    """A forward under bf16 autocast (accelerate's mixed-precision wrapper, TRL's default bf16=True): the fast paths
    score the bf16 computation the model runs, as autograd differentiates it (to bf16 rounding)."""
    model, records, adv, target = case("gpt-neo", lora=False, dtype=torch.float32)
    forward = model.forward
    model.forward = lambda *args, **kwargs: torch.autocast("cpu", dtype=torch.bfloat16)(forward)(*args, **kwargs)
    assert rel_err(scores.score(model, records, adv, target), oracle(model, records, adv, target)) < 3e-2
