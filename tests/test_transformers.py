"""The transformers backend (issue 20; flash_ext/integrations/transformers.py): tiny random-weight models built
from configs (no download) of GPT-2, Llama, Mistral, Gemma 2 and Qwen2 with attn_implementation="flash_ext" against
the same model in float64 with "eager" attention (the reference) and in float32 with "eager" (PyTorch's own error),
by assert_fa_close: logits and every parameter's gradient; padded batches (left and right) against each sequence
run alone; greedy generation with the KV cache (the tokens equal "sdpa"'s); gpt-oss's attention sinks and T5-style
position biases at the attention-function level; training-mode dropout; `import flash_ext` never imports
transformers. CPU (the CUDA run of the same tests uses the kernels when a GPU is there).
"""
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

import flash_ext  # noqa: E402
import flash_ext.integrations.transformers as fe_tf  # noqa: E402
from reference import assert_fa_close  # noqa: E402

VOCAB = 97


def tiny(name):
    """A tiny config of the named family (2 layers, hidden 64) with every dropout 0."""
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  max_position_embeddings=256)
    if name == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_positions=256,
                                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0,
                                       eos_token_id=1)
    if name == "llama":  # GQA 4:2
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    if name == "mistral":  # a sliding window shorter than the sequences
        return transformers.MistralConfig(num_key_value_heads=1, sliding_window=16, **common)
    if name == "gemma2":  # softcap 50 on the logits, alternating sliding / full layers, GQA
        return transformers.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=16,
                                         attn_logit_softcapping=5.0, final_logit_softcapping=None,
                                         query_pre_attn_scalar=16, **common)
    if name == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, **common)
    raise ValueError(name)


MODELS = ["gpt2", "llama", "mistral", "gemma2", "qwen2"]


def build(name, impl, dtype, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny(name), attn_implementation=impl).to(dtype)
    model.eval()
    return model


def run(model, ids, mask=None, weights=None, position_ids=None):
    """Logits, and the gradients of sum(logits * weights) for every parameter (flattened, in order)."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    if weights is None:
        return logits.detach(), None
    (logits * weights.to(logits.dtype)).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach(), grads


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of flash_ext.attention (the backend must be what runs)."""
    count = {"n": 0}
    real = flash_ext.attention

    def counting(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(flash_ext, "attention", counting)
    return count


@pytest.mark.parametrize("name", MODELS)
def test_logits_and_gradients(name, calls):
    ids = torch.randint(0, VOCAB, (2, 45))
    weights = torch.randn(2, 45, VOCAB)
    ref = run(build(name, "eager", torch.float64), ids, weights=weights)
    pt = run(build(name, "eager", torch.float32), ids, weights=weights)
    ours = run(build(name, "flash_ext", torch.float32), ids, weights=weights)
    assert calls["n"] >= 2, "the flash_ext backend did not run"
    assert_fa_close("logits", ours[0], ref[0], pt[0], torch.float32)
    assert_fa_close("parameter gradients", ours[1], ref[1], pt[1], torch.float32)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_padded_batch_equals_each_sequence_alone(name, side, calls):
    lengths = [40, 23, 31]
    n = max(lengths)
    seqs = [torch.randint(2, VOCAB, (length,)) for length in lengths]
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        ids[b, sl], mask[b, sl] = s, 1
    # Positions counted from each sequence's first token, as generation passes them (GPT-2's are absolute).
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ours = run(build(name, "flash_ext", torch.float32), ids, mask, position_ids=positions)[0]
    ref_model, pt_model = build(name, "eager", torch.float64), build(name, "eager", torch.float32)
    assert calls["n"] >= 2
    for b, s in enumerate(seqs):
        sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        ref = run(ref_model, s[None])[0][0]
        pt = run(pt_model, s[None])[0][0]
        assert_fa_close(f"logits of sequence {b}", ours[b, sl], ref, pt, torch.float32)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])  # (gemma2 has no "sdpa" to compare with)
def test_greedy_generation_with_padding(name, calls):
    prompts = torch.randint(2, VOCAB, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    prompts[1, :4], mask[1, :4] = 0, 0  # the second prompt left-padded by 4
    # Against "sdpa": transformers' float64 "eager" attention gives NaN logits for a left-padded row (its fully
    # masked padding rows), "sdpa" does not.
    out = {}
    for impl in ("sdpa", "flash_ext"):
        model = build(name, impl, torch.float64)
        with torch.no_grad():
            out[impl] = model.generate(prompts, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                       pad_token_id=0)
    assert calls["n"] > 10  # prefill and every decoding step
    assert torch.equal(out["flash_ext"], out["sdpa"])
    assert not torch.equal(out["flash_ext"][1, 12:], torch.zeros(10, dtype=torch.long))  # it generated tokens


def test_sinks_and_position_bias_at_the_attention_function():
    """gpt-oss passes its sinks as s_aux; T5-style models a float position_bias: against transformers' own eager
    attention functions, in float64 (the backend's arithmetic then is the CPU path's float64)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

    class Module(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 2
        training = False

    torch.manual_seed(0)
    b, h, hk, s, d = 2, 4, 2, 20, 16
    q = torch.randn(b, h, s, d, dtype=torch.float64)
    k, v = torch.randn(b, hk, s, d, dtype=torch.float64), torch.randn(b, hk, s, d, dtype=torch.float64)
    sinks = torch.randn(h, dtype=torch.float64)
    mask = torch.ones(s, s, dtype=torch.bool).tril().expand(b, 1, s, s).clone()
    mask[1, :, :, :5] = False  # padding keys of the second row
    mask[1, :, :5, 0] = True  # (its padded query rows see one key, as transformers' masks leave them)
    fmask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, torch.finfo(torch.float64).min)
    module = Module()
    module.sinks = sinks  # gpt-oss's eager attention reads them from the module, the backends get them as s_aux
    want, _ = gpt_oss_eager(module, q, k, v, fmask, scaling=d ** -0.5, dropout=0.0)
    got, _ = fe_tf.flash_ext_attention_forward(Module(), q, k, v, mask, scaling=d ** -0.5, s_aux=sinks)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    bias = torch.randn(1, h, s, s, dtype=torch.float64)
    got, _ = fe_tf.flash_ext_attention_forward(Module(), q, k, v, mask, scaling=d ** -0.5, position_bias=bias)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=bias.masked_fill(~mask, -torch.inf),
                                                           scale=d ** -0.5)
    torch.testing.assert_close(got, ref.transpose(1, 2), rtol=1e-10, atol=1e-10)


def test_training_with_dropout_runs_and_learns():
    """GPT-2's attention dropout in training mode goes to flash_ext's dropout (CPU): a few steps, the loss falls."""
    cfg = tiny("gpt2")
    cfg.attn_pdrop = 0.1
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="flash_ext")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, VOCAB, (4, 32))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5, losses


def test_import_flash_ext_does_not_import_transformers():
    code = "import sys, flash_ext; assert 'transformers' not in sys.modules, 'imported transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)
