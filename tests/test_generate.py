"""model.generate and the KV cache: cached decoding equals full recomputation, a mixed-length batch
equals its prompts run one by one, EOS and stop strings end rows where they should, sampling follows
the model's distribution (temperature, top_p, seed).

    python -m pytest -q tests/test_generate.py
"""
import pytest
import torch

from model import KVCache, ModelArgs, Transformer, generate, sample

V = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=V, max_seq_len=256))
    with torch.no_grad():      # larger weights than the default init, so greedy paths vary
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return m.eval()


class CharTokenizer:
    """One character per id; the eos id decodes to nothing."""

    def __init__(self, eos_id):
        self.eos_id, self.pad_id, self.vocab_size = eos_id, 0, V

    def decode(self, ids):
        return "".join(chr(ord("A") + i) for i in ids if i != self.eos_id)


def greedy_by_recomputation(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


def test_cache_logits_equal_full_recomputation(model):
    prompts = prompts_of([9, 4, 7])
    B, P, new = 3, 9, 6
    pad = torch.tensor([P - len(p) for p in prompts])
    cont = prompts_of([new] * B, seed=2)
    with torch.no_grad():
        cache = KVCache(model.args, pad, P + new, dtype=torch.float32, device="cpu")
        x = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
        got = [model(x, cache=cache, start=0)]                  # prefill: all prompt positions
        for t in range(new):
            got.append(model(torch.tensor([[c[t]] for c in cont]), cache=cache, start=P + t))
        got = torch.cat(got, dim=1)                               # (B, P + new, V)
        assert torch.isfinite(got).all()
        for b, p in enumerate(prompts):
            full = model(torch.tensor([p + cont[b]]))[0]            # no cache, no padding
            torch.testing.assert_close(got[b, P - len(p):], full, rtol=0, atol=1e-5)


def test_tensor_start_equals_int_start(model):
    """The CUDA-graph decode step passes `start` as a tensor and attends over the whole cache."""
    prompts = prompts_of([5, 8])
    pad = torch.tensor([3, 0])
    x = torch.tensor([[0] * 3 + prompts[0], prompts[1]])
    with torch.no_grad():
        outs = []
        for as_tensor in (False, True):
            cache = KVCache(model.args, pad, 12, dtype=torch.float32, device="cpu")
            model(x, cache=cache, start=0)
            step = []
            for t in range(3):
                start = torch.tensor(8 + t) if as_tensor else 8 + t
                step.append(model(torch.tensor([[5 + t], [9 + t]]), cache=cache, start=start, last_only=True))
            outs.append(torch.cat(step, 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)


def test_greedy_equals_recomputation_and_mixed_batch_equals_one_by_one(model):
    prompts = prompts_of([1, 13, 6, 6, 20])
    batch = generate(model, None, prompts, max_new_tokens=20)
    assert all(len(o) == 20 for o in batch)
    assert len({tuple(o) for o in batch}) > 1
    for p, o in zip(prompts, batch):
        assert o == generate(model, None, [p], max_new_tokens=20)[0]
        assert o == greedy_by_recomputation(model, p, 20)
    assert generate(model, None, prompts, max_new_tokens=20, batch_size=2) == batch
    assert generate(model, None, [], max_new_tokens=5) == []


def test_prefill_in_row_chunks_equals_one_prefill(model, monkeypatch):
    """The prefill runs model.PREFILL_TOKENS prompt tokens at a time; the sampled continuations and
    the cache they leave must not depend on that."""
    import model as M
    prompts = prompts_of([3, 17, 9, 17, 1, 12, 5])
    reference = [greedy_by_recomputation(model, p, 12) for p in prompts]      # no cache at all
    whole = generate(model, None, prompts, max_new_tokens=12, temperature=0.8, seed=3)
    for tokens in (20, 40):             # 17-token padded rows: one row per forward; two, the last chunk short
        monkeypatch.setattr(M, "PREFILL_TOKENS", tokens)
        assert generate(model, None, prompts, max_new_tokens=12) == reference
        assert generate(model, None, prompts, max_new_tokens=12, temperature=0.8, seed=3) == whole


def test_eos_ends_rows_and_is_not_returned(model):
    prompts = prompts_of([4, 9])
    free = generate(model, None, prompts, max_new_tokens=30)
    eos = free[1][5]                                  # make a token row 1 produces at step 5 the EOS
    out = generate(model, CharTokenizer(eos), prompts, max_new_tokens=30)
    for o, f in zip(out, free):
        assert o == (f[:f.index(eos)] if eos in f else f)
    assert len(out[1]) <= 5


def test_all_rows_done_stops_decoding_early(model):
    prompt = prompts_of([4])
    first = generate(model, None, prompt, max_new_tokens=1)[0][0]
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = generate(model, CharTokenizer(eos_id=first), prompt, max_new_tokens=200)
    finally:
        hook.remove()
    assert out == [[]]
    assert len(calls) <= 1 + 16          # one prefill, then at most one check interval of steps


def test_stop_strings(model):
    prompts = prompts_of([5, 8, 3])
    free = generate(model, None, prompts, max_new_tokens=40)
    tok = CharTokenizer(eos_id=-1)
    for stop_at, n in ((25, 40), (3, 8)):    # found at a periodic check, and only at the end
        stop = tok.decode(free[1][stop_at:stop_at + 2])
        out = generate(model, tok, prompts, max_new_tokens=n, stop=[stop, "@@@"])
        for o, f in zip(out, free):
            text = tok.decode(f[:n])
            k = text.find(stop)
            assert o == (f[:k + 2] if k >= 0 else f[:n])       # up to and including the stop
        assert tok.decode(out[1]).endswith(stop) and tok.decode(out[1]).count(stop) == 1


def test_sampling_seeded_and_greedy_limits(model):
    prompts = prompts_of([4, 7])
    a = generate(model, None, prompts, max_new_tokens=15, temperature=1.0, seed=3)
    assert a == generate(model, None, prompts, max_new_tokens=15, temperature=1.0, seed=3)
    assert a != generate(model, None, prompts, max_new_tokens=15, temperature=1.0, seed=4)
    greedy = generate(model, None, prompts, max_new_tokens=15)
    assert a != greedy
    assert generate(model, None, prompts, max_new_tokens=15, temperature=1.0, top_p=1e-6, seed=5) == greedy
    assert generate(model, None, prompts, max_new_tokens=15, temperature=1e-4, seed=5) == greedy


def test_sample_follows_softmax_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 1.5
    n = 40000
    g = torch.Generator().manual_seed(0)
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.0, 0.6)):
        p = torch.softmax(logits[0] / temperature, -1)
        if top_p < 1:
            sp, idx = p.sort(descending=True)
            keep = idx[: int((sp.cumsum(0) < top_p).sum()) + 1]      # smallest set reaching top_p
            q = torch.zeros_like(p)
            q[keep] = p[keep] / p[keep].sum()
            p = q
        ids = sample(logits.expand(n, -1), temperature=temperature, top_p=top_p, generator=g)
        freq = torch.bincount(ids, minlength=12).float() / n
        assert (freq - p).abs().sum() / 2 < 0.02                    # total variation
        assert torch.all(freq[p == 0] == 0)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, None, [[1], []], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, None, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, None, [[1] * 250], max_new_tokens=10)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        generate(model, None, [[1]], max_new_tokens=3, stop=["x"])
    with pytest.raises(ValueError, match="cuda_graph needs a model on a CUDA device"):
        generate(model, None, [[1]], max_new_tokens=3, cuda_graph=True)
    for bad in (dict(batch_size=-1), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0)):
        with pytest.raises(ValueError, match="need batch_size ≥ 1 \\(or None\\), 0 < top_p ≤ 1 and temperature ≥ 0"):
            generate(model, None, [[1], [2]], max_new_tokens=3, **bad)
    for token in (V, -1):
        with pytest.raises(ValueError, match=f"prompt token id {token} is outside the model's vocabulary of {V}"):
            generate(model, None, [[1], [2, token]], max_new_tokens=3)
