"""``rlcore.integrations.hf``: the heads of tiny random Hugging Face causal LMs built from a config (nothing
downloaded) give the log-probs, entropies and every parameter gradient of ``log_softmax`` of the model's own logits:
Llama, Qwen2 tied and untied, Gemma-2 (soft cap), Cohere and Granite (logit scale), PEFT LoRA (on the head, folded;
elsewhere); and bad heads raise, naming what was looked for."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import rlcore  # noqa: E402
from rlcore.integrations import hf  # noqa: E402

V, H = 96, 32


def tiny(kind: str, **extra):
    """A tiny random causal LM of family ``kind`` (fp32, eval mode, seeded)."""
    common = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common, **extra),
        "qwen2": lambda: transformers.Qwen2Config(**common, **extra),
        "gemma2": lambda: transformers.Gemma2Config(**common, head_dim=8, **extra),
        "cohere": lambda: transformers.CohereConfig(**common, **extra),
        "granite": lambda: transformers.GraniteConfig(**common, **extra),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[kind]())
    with torch.no_grad():   # larger logits than the init's, so the cap and the scale matter
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


MODELS = {
    "llama": lambda: tiny("llama"),
    "qwen2_tied": lambda: tiny("qwen2", tie_word_embeddings=True),
    "qwen2_untied": lambda: tiny("qwen2", tie_word_embeddings=False),
    "gemma2_softcap": lambda: tiny("gemma2", final_logit_softcapping=2.0),
    "cohere_scale": lambda: tiny("cohere", logit_scale=0.25),
    "granite_scale": lambda: tiny("granite", logits_scaling=3.0),
}


def batch(seed=0, B=3, T=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, :4] = 0      # left padding on one row
    return ids, am


def own(model, ids, am, temperature):
    """(logp, entropy) ``[B, T - 1]`` from the model's own logits."""
    logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].float() / temperature
    ls = logits.log_softmax(-1)
    return ls.gather(-1, ids[:, 1:, None]).squeeze(-1), -(ls.exp() * ls).sum(-1)


def ours(model, ids, am, temperature, backend):
    head = hf.head_of(model)
    h = hf.hidden_states(model, input_ids=ids, attention_mask=am)[:, :-1]
    return head.logprobs(h, ids[:, 1:], temperature=temperature, return_entropy=True, backend=backend)


def grads(model, lp, ent, g1, g2):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad((lp * g1 + ent * g2).sum(), params, allow_unused=True)


def rel(a, b):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


def assert_same(model, ids, am, temperature, backend, tol=1e-5):
    g = torch.Generator().manual_seed(1)
    g1, g2 = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=g), torch.randn(ids.shape[0], ids.shape[1] - 1,
                                                                                    generator=g)
    r_lp, r_ent = own(model, ids, am, temperature)
    r_g = grads(model, r_lp, r_ent, g1, g2)
    lp, ent = ours(model, ids, am, temperature, backend)
    o_g = grads(model, lp, ent, g1, g2)
    assert rel(lp, r_lp) <= tol and rel(ent, r_ent) <= tol, (rel(lp, r_lp), rel(ent, r_ent))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, o_g, r_g):
        if b is None:
            assert a is None or not a.any(), name
            continue
        assert a is not None, f"{name}: no gradient through rlcore"
        assert rel(a, b) <= tol, f"{name}: gradient error {rel(a, b):.3g}"


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_logprobs_entropy_and_every_gradient(name, backend):
    model = MODELS[name]()
    ids, am = batch()
    assert_same(model, ids, am, 0.7, backend)


def test_head_options_read_from_the_config():
    assert hf.head_of(MODELS["gemma2_softcap"]()).softcap == 2.0
    assert hf.head_of(MODELS["cohere_scale"]()).logit_scale == 0.25
    assert hf.head_of(MODELS["granite_scale"]()).logit_scale == pytest.approx(1 / 3.0)
    q = MODELS["qwen2_tied"]()
    assert hf.head_of(q).weight_and_bias()[0] is q.get_input_embeddings().weight
    assert hf.head_of(MODELS["llama"]()).kernel_options(0.5) == {"temperature": 0.5, "softcap": 0.0}
    # a scale and a cap together: c tanh(s a / c) = s (c / s) tanh(a / (c / s))
    head = hf.Head(model=None, module=nn.Linear(2, 3), logit_scale=4.0, softcap=8.0)
    assert head.kernel_options(1.0) == {"temperature": 0.25, "softcap": 2.0}


def test_scale_and_cap_together_match_the_formula():
    head = hf.Head(model=None, module=nn.Linear(8, 20, bias=True), logit_scale=3.0, softcap=2.5)
    h, t = torch.randn(5, 8, dtype=torch.float64), torch.randint(0, 20, (5,))
    lin = head.module.double()
    lp = head.logprobs(h, t, temperature=0.6, backend="torch")
    z = lin(h) * 3.0
    z = 2.5 * torch.tanh(z / 2.5) / 0.6
    torch.testing.assert_close(lp, z.log_softmax(-1).gather(1, t[:, None]).squeeze(1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["llama", "gemma2_softcap", "cohere_scale"])
def test_bf16_within_the_bf16_bar(name):
    """bf16 model: rlcore's log-probs, entropies and head gradients on the model's bf16 hidden states are no further
    from float64 than the model's own bf16 logits are."""
    model = MODELS[name]().to(torch.bfloat16)
    ids, am = batch()
    head = hf.head_of(model)
    h = hf.hidden_states(model, input_ids=ids, attention_mask=am)[:, :-1].detach().requires_grad_()
    t = ids[:, 1:]
    lp, ent = head.logprobs(h, t, temperature=0.7, return_entropy=True)
    # float64 on the same bf16 hidden states and weights
    w = head.weight_and_bias()[0]
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    z = hd @ wd.T * head.logit_scale
    if head.softcap:
        z = head.softcap * torch.tanh(z / head.softcap)
    ls = (z / 0.7).log_softmax(-1)
    r_lp, r_ent = ls.gather(-1, t[..., None]).squeeze(-1), -(ls.exp() * ls).sum(-1)
    # the model's own bf16 head
    hb = h.detach().requires_grad_()
    zb = model.get_output_embeddings()(hb)
    if name == "gemma2_softcap":
        zb = torch.tanh(zb / 2.0) * 2.0
    if name == "cohere_scale":
        zb = zb * 0.25
    lsb = (zb.float() / 0.7).log_softmax(-1)
    b_lp, b_ent = lsb.gather(-1, t[..., None]).squeeze(-1), -(lsb.exp() * lsb).sum(-1)
    torch.testing.assert_close(b_lp.detach(), own(model, ids, am, 0.7)[0].detach())   # that is the model's own
    for a, b, r in ((lp, b_lp, r_lp), (ent, b_ent, r_ent)):
        assert (a.double() - r).abs().max() <= (b.double() - r).abs().max() * 1.05 + 1e-6
    g = torch.randn_like(r_lp)
    ours_g = torch.autograd.grad((lp * g).sum(), h)[0]
    bf16_g = torch.autograd.grad((b_lp * g).sum(), hb)[0]
    ref_g = torch.autograd.grad((r_lp * g).sum(), hd)[0]
    assert (ours_g.double() - ref_g).abs().max() <= (bf16_g.double() - ref_g).abs().max() * 1.05 + 1e-6


def test_policy_loss_through_the_head():
    model = MODELS["gemma2_softcap"]()
    ids, am = batch()
    head = hf.head_of(model)
    h = hf.hidden_states(model, input_ids=ids, attention_mask=am)[:, :-1]
    mask, adv = am[:, 1:].bool(), torch.tensor([1.0, -0.5, 0.25])[:, None].expand(3, 10)
    r_lp, _ = own(model, ids, am, 0.7)
    old = (r_lp.detach() + 0.05 * torch.randn_like(r_lp)) * mask
    out = head.policy_loss(h, ids[:, 1:], adv, mask, temperature=0.7, loss_type="ppo", old_logp=old, backend="torch")
    ref = rlcore.policy_loss(r_lp * mask, adv, mask, loss_type="ppo", old_logp=old)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)


def test_the_fused_head_runs_inside_the_head_modules_call():
    """Hooks on the head module (what FSDP / ZeRO-3 use to gather the weight) run around the fused computation,
    and the weight is read inside the call: a pre-hook that swaps in the real weight is honoured."""
    model = MODELS["llama"]()
    lm_head = model.get_output_embeddings()
    real = lm_head.weight.detach().clone()
    calls = []

    def pre(mod, args):      # like FSDP's unshard: the full weight exists only during the call
        calls.append("pre")
        mod.weight.data = real

    def post(mod, args, out):
        calls.append("post")
        mod.weight.data = torch.zeros(0, H)

    with torch.no_grad():
        lm_head.weight.data = torch.zeros(0, H)
    hooks = [lm_head.register_forward_pre_hook(pre), lm_head.register_forward_hook(post)]
    ids, am = batch()
    h = hf.hidden_states(model, input_ids=ids, attention_mask=am)[:, :-1]
    lp = hf.head_of(model).logprobs(h, ids[:, 1:])
    assert calls == ["pre", "post"]
    for x in hooks:
        x.remove()
    lm_head.weight.data = real
    torch.testing.assert_close(lp, own(model, ids, am, 1.0)[0], rtol=1e-5, atol=1e-6)
    assert "forward" not in lm_head.__dict__    # the swap is undone



def _peft():
    return pytest.importorskip("peft")


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_peft_lora(targets):
    """LoRA on attention only, and on the head (folded exactly, its A and B get their gradients)."""
    peft_ = _peft()
    base = tiny("llama")
    cfg = peft_.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    model = peft_.get_peft_model(base, cfg)
    ids, am = batch()
    assert_same(model, ids, am, 0.9, "cpp")
    if "lm_head" in targets:
        assert type(hf.head_of(model).compute_module()).__name__ == "Linear"


def test_peft_lora_head_with_dropout_in_training_is_refused():
    peft_ = _peft()
    cfg = peft_.LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.1)
    model = peft_.get_peft_model(tiny("llama"), cfg).train()
    h, t = torch.randn(2, 3, H), torch.randint(0, V, (2, 3))
    with pytest.raises(ValueError, match="dropout p=0.1 in training mode"):
        hf.head_of(model)
    model.eval()
    hf.head_of(model).logprobs(h, t)      # eval mode: dropout is the identity, the fold is exact


def test_peft_dora_head_is_refused():
    peft_ = _peft()
    cfg = peft_.LoraConfig(r=4, target_modules=["lm_head"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        hf.head_of(peft_.get_peft_model(tiny("llama"), cfg))


def test_peft_head_in_modules_to_save():
    peft_ = _peft()
    cfg = peft_.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    model = peft_.get_peft_model(tiny("qwen2", tie_word_embeddings=False), cfg)
    with torch.no_grad():
        hf.head_of(model).compute_module().weight.add_(0.5)    # the trained copy differs from the original
    ids, am = batch()
    assert_same(model, ids, am, 1.0, "torch")


class NotALM(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


def test_bad_heads_raise_naming_what_was_looked_for():
    with pytest.raises(ValueError, match="looked for get_output_embeddings"):
        hf.head_of(NotALM())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        hf.head_of("llama")
    model = tiny("llama")
    model.lm_head = nn.Sequential(nn.Linear(H, V))
    with pytest.raises(ValueError, match="not an nn.Linear"):
        hf.head_of(model)
    model = tiny("llama")
    model.config.dim_model_base = 8
    with pytest.raises(ValueError, match="dim_model_base"):
        hf.head_of(model)
    model = tiny("cohere", logit_scale=-1.0)
    with pytest.raises(ValueError, match="logit_scale gives a logit scale of -1.0"):
        hf.head_of(model)
    head = hf.head_of(tiny("llama"))
    with pytest.raises(TypeError, match="softcap= comes from the model"):
        head.logprobs(torch.randn(2, H), torch.tensor([0, 1]), softcap=3.0)
    with pytest.raises(ValueError, match="no backbone"):
        hf.hidden_states(NotALM(), input_ids=torch.zeros(1, 2, dtype=torch.long))


def test_a_dtensor_head_is_gathered_not_read_as_vocab_parallel(tmp_path):
    """A head weight still sharded as a DTensor (FSDP2 outside its unshard) is gathered differentiably: the result
    is the whole head's, its gradient reaches the DTensor parameter."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        lin = nn.Linear(H, V, bias=False)
        w = lin.weight.detach().clone()
        lin.weight = nn.Parameter(distribute_tensor(w, mesh, [Shard(0)]))
        head = hf.Head(model=None, module=lin)
        h, t = torch.randn(5, H), torch.randint(0, V, (5,))
        lp = head.logprobs(h, t)
        torch.testing.assert_close(lp, (h @ w.T).log_softmax(-1).gather(1, t[:, None]).squeeze(1), rtol=1e-5,
                                   atol=1e-6)
        lp.sum().backward()
        assert lin.weight.grad is not None and lin.weight.grad.shape == (V, H)
    finally:
        dist.destroy_process_group()


def test_softcapped_head_on_the_triton_backend():
    """A Gemma-2 head's soft cap runs in the Triton kernels too (here: the interpreter): the same log-probs and
    entropies as the chunked backend."""
    head = hf.head_of(tiny("gemma2", final_logit_softcapping=2.0))
    h, t = torch.randn(5, H), torch.tensor([0, 1, 2, 3, 4])
    ours = head.logprobs(h, t, backend="triton", return_entropy=True)
    ref = head.logprobs(h, t, backend="torch", return_entropy=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
