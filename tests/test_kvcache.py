"""KV-cache attention (issue 18): flash_ext.attention_with_kvcache against the float64 reference over the first
cache_seqlens[b] + seqlen_new keys of each row's (updated) cache, by assert_fa_close.

Decoding (seqlen_q 1), speculative steps (2-8, causal), prefill chunks against a longer cache; GQA 1:1 / 4:1 / 8:1
and MQA; contiguous caches with and without cache_batch_idx and paged ones (page sizes 1, 16, 64, 256, shuffled
block tables); the in-place append checked element by element (and nothing else in the cache changed); NaN in every
unused cache slot; num_splits 0 / 1 / large; window, softcap and ALiBi; bad input; opcheck, torch.compile and (CUDA)
a graph-captured decode loop. CPU: float32 and bfloat16; CUDA: float16 and bfloat16.
"""
import pytest
import torch

import flash_ext
from conftest import requires_cuda
from reference import assert_fa_close, attention_ref

NAN = float("nan")


def case(name, b, sq, h, hk, d, cap, lens, new, page=0, idx=False, **kw):
    """cap: keys a row can hold (seqlen_cache, or max_pages * page); lens: cache_seqlens (list, int or None); new:
    seqlen_new (0: no k / v); page > 0: a paged cache of that page size."""
    return dict(name=name, b=b, sq=sq, h=h, hk=hk, d=d, cap=cap, lens=lens, new=new, page=page, idx=idx, kw=kw)


CASES = [
    case("decode", 3, 1, 8, 2, 64, 300, [0, 17, 299], 1),
    case("decode-no-append", 2, 1, 4, 4, 32, 200, [1, 200], 0),
    case("decode-mqa", 2, 1, 8, 1, 128, 257, [100, 256], 1),
    case("decode-8:1", 2, 1, 16, 2, 64, 130, [129, 5], 1, num_splits=1),
    case("speculative-causal", 2, 4, 8, 2, 64, 300, [50, 290], 4, causal=True),
    case("speculative-8-causal", 2, 8, 4, 1, 32, 200, [0, 100], 8, causal=True, num_splits=64),
    case("prefill-chunk-causal", 2, 160, 4, 2, 64, 700, [300, 0], 160, causal=True),
    case("prefill-no-new-causal", 1, 130, 4, 4, 64, 513, [400], 0, causal=True),
    case("window-softcap", 2, 3, 4, 2, 64, 400, [200, 37], 3, causal=True, window_size=(64, 0), softcap=10.0),
    case("alibi", 2, 2, 4, 2, 32, 300, [150, 10], 2, causal=True, alibi="bh"),
    case("int-seqlens", 3, 1, 4, 2, 32, 100, 40, 1),
    case("whole-cache", 2, 2, 4, 2, 32, 90, None, 0),
    case("cache-batch-idx", 3, 1, 4, 2, 64, 200, [10, 150, 0], 1, idx=True),
    case("paged-1", 2, 1, 4, 2, 64, 60, [0, 59], 1, page=1),
    case("paged-16", 3, 2, 8, 2, 64, 320, [1, 100, 317], 2, page=16, causal=True),
    case("paged-64-prefill", 2, 100, 4, 1, 64, 512, [200, 0], 100, page=64, causal=True),
    case("paged-256", 2, 1, 8, 8, 128, 768, [700, 3], 1, page=256),
    case("paged-16-window-alibi", 2, 4, 4, 2, 32, 256, [90, 200], 4, page=16, causal=True, window_size=(30, 0),
         alibi="h"),
]


def make_case(device, dtype, c):
    b, sq, h, hk, d, cap, page = c["b"], c["sq"], c["h"], c["hk"], c["d"], c["cap"], c["page"]
    new = c["new"]
    lens = c["lens"]
    lens_list = [cap - new] * b if lens is None else ([lens] * b if isinstance(lens, int) else lens)
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype)
    block_table = cache_idx = None
    if page:
        max_pages = cap // page
        n_pages = b * max_pages + 5
        perm = torch.randperm(n_pages, device=device)
        block_table = perm[: b * max_pages].view(b, max_pages).to(torch.int32)
        k_cache = torch.randn(n_pages, page, hk, d, device=device, dtype=dtype)
        v_cache = torch.randn(n_pages, page, hk, d, device=device, dtype=dtype)
    else:
        rows = b + 2 if c["idx"] else b
        k_cache = torch.randn(rows, cap, hk, d, device=device, dtype=dtype)
        v_cache = torch.randn(rows, cap, hk, d, device=device, dtype=dtype)
        if c["idx"]:
            cache_idx = torch.randperm(rows, device=device)[:b].to(torch.int32)

    # Position t of batch row r: (cache tensor index, slot).
    def where(r, t):
        if page:
            return int(block_table[r, t // page]), t % page
        return (int(cache_idx[r]) if cache_idx is not None else r), t

    # NaN in every slot no row uses (past cache_seqlens + new; unused pages)
    used = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for r in range(b):
        for t in range(lens_list[r] + new):
            used[where(r, t)] = True
    k_cache[~used.to(device)] = NAN
    v_cache[~used.to(device)] = NAN
    k_new = torch.randn(b, new, hk, d, device=device, dtype=dtype) if new else None
    v_new = torch.randn(b, new, hk, d, device=device, dtype=dtype) if new else None
    # The caches expected after the call, and each row's keys / values in order.
    k_after, v_after = k_cache.clone(), v_cache.clone()
    keys, values = [], []
    for r in range(b):
        for j in range(new):
            k_after[where(r, lens_list[r] + j)] = k_new[r, j]
            v_after[where(r, lens_list[r] + j)] = v_new[r, j]
        pos = [where(r, t) for t in range(lens_list[r] + new)]
        keys.append(torch.stack([k_after[p] for p in pos]) if pos else k_after.new_zeros(0, hk, d))
        values.append(torch.stack([v_after[p] for p in pos]) if pos else v_after.new_zeros(0, hk, d))
    alibi = None
    if c["kw"].get("alibi") == "h":
        alibi = torch.rand(h, device=device) * 0.3
    elif c["kw"].get("alibi") == "bh":
        alibi = torch.rand(b, h, device=device) * 0.3
    cache_seqlens = lens if lens is None or isinstance(lens, int) else torch.tensor(lens, dtype=torch.int32,
                                                                                     device=device)
    args = dict(cache_seqlens=cache_seqlens, cache_batch_idx=cache_idx, block_table=block_table, alibi_slopes=alibi,
                **{k: v for k, v in c["kw"].items() if k != "alibi"})
    return q, k_cache, v_cache, k_new, v_new, args, k_after, v_after, keys, values, alibi


def check_case(device, dtype, c):
    q, k_cache, v_cache, k_new, v_new, args, k_after, v_after, keys, values, alibi = make_case(device, dtype, c)
    with torch.no_grad():
        out, lse = flash_ext.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, return_lse=True, **args)
    # The append: every element of both caches as expected (NaN where NaN was: unused slots stay untouched).
    assert torch.equal(k_cache.isnan(), k_after.isnan()) and torch.equal(v_cache.isnan(), v_after.isnan())
    fin = ~k_after.isnan()
    assert torch.equal(k_cache[fin], k_after[fin]) and torch.equal(v_cache[fin], v_after[fin])
    kw = dict(causal=args.get("causal", False), window_size=args.get("window_size", (-1, -1)),
              softcap=args.get("softcap", 0.0))
    refs = []
    for upcast in (True, False):
        outs, lses = [], []
        for r in range(q.shape[0]):
            sl = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[r])
            o, l = attention_ref(q[r:r + 1], keys[r][None], values[r][None], upcast=upcast, alibi_slopes=sl, **kw)
            outs.append(o[0])
            lses.append(l[0])
        refs.append((torch.stack(outs), torch.stack(lses)))
    (out_ref, lse_ref), (out_pt, lse_pt) = refs
    assert_fa_close("out", out, out_ref, out_pt, q.dtype)
    assert_fa_close("lse", lse, lse_ref, lse_pt, torch.float32)


def _params():
    params = []
    for c in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            params.append(pytest.param("cpu", dtype, c, id=f"cpu-{str(dtype)[6:]}-{c['name']}"))
        for dtype in (torch.float16, torch.bfloat16):
            params.append(pytest.param("cuda", dtype, c, marks=[requires_cuda],
                                       id=f"cuda-{str(dtype)[6:]}-{c['name']}"))
    return params


@pytest.mark.parametrize("device,dtype,c", _params())
def test_kvcache(device, dtype, c):
    check_case(device, dtype, c)


def test_num_splits_do_not_change_the_result():
    c = case("splits", 2, 1, 8, 2, 64, 500, [300, 499], 1)
    outs = []
    for splits in (0, 1, 7, 128):
        torch.manual_seed(1)
        q, k_cache, v_cache, k_new, v_new, args, *_ = make_case("cpu", torch.float32, c)
        with torch.no_grad():
            outs.append(flash_ext.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, num_splits=splits,
                                                         **args))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_generation_loop_matches_attention():
    """Decoding token by token into a paged cache gives what one causal attention call over the whole sequence
    gives (the same keys and queries)."""
    b, h, hk, d, n, page = 2, 4, 2, 32, 40, 16
    q_all = torch.randn(b, n, h, d, dtype=torch.float64)
    k_all, v_all = torch.randn(b, n, hk, d, dtype=torch.float64), torch.randn(b, n, hk, d, dtype=torch.float64)
    want = flash_ext.attention(q_all, k_all, v_all, causal=True)
    k_cache = torch.full((8, page, hk, d), NAN, dtype=torch.float64)
    v_cache = torch.full((8, page, hk, d), NAN, dtype=torch.float64)
    block_table = torch.tensor([[5, 0, 7], [2, 6, 1]], dtype=torch.int32)
    lens = torch.zeros(b, dtype=torch.int32)
    outs = []
    for t in range(n):
        outs.append(flash_ext.attention_with_kvcache(q_all[:, t:t + 1], k_cache, v_cache, k_all[:, t:t + 1],
                                                     v_all[:, t:t + 1], cache_seqlens=lens, block_table=block_table,
                                                     causal=True))
        lens += 1
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-12, atol=1e-12)


@requires_cuda
def test_cuda_graph_decode_loop():
    """A decode step captured in a CUDA graph and replayed with new tokens and lengths gives eager's results."""
    b, h, hk, d, cap = 4, 8, 2, 128, 1024
    dev, dt = "cuda", torch.bfloat16
    k_cache = torch.randn(b, cap, hk, d, device=dev, dtype=dt)
    v_cache = torch.randn(b, cap, hk, d, device=dev, dtype=dt)
    q = torch.randn(b, 1, h, d, device=dev, dtype=dt)
    k_new, v_new = torch.randn(b, 1, hk, d, device=dev, dtype=dt), torch.randn(b, 1, hk, d, device=dev, dtype=dt)
    lens = torch.tensor([3, 500, 1000, 0], dtype=torch.int32, device=dev)
    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the capture
            flash_ext.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k_new, v_new, cache_seqlens=lens)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = flash_ext.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens)
        for step in range(3):
            q.copy_(torch.randn_like(q))
            k_new.copy_(torch.randn_like(k_new))
            v_new.copy_(torch.randn_like(v_new))
            graph.replay()
            want = flash_ext.attention_with_kvcache(q, k_eager, v_eager, k_new, v_new, cache_seqlens=lens)
            torch.cuda.synchronize()
            assert torch.equal(out, want) and torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager)
            lens += 1


def test_bad_input():
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(2, 10, 2, 16), torch.randn(2, 10, 2, 16)
    kn, vn = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    lens = torch.tensor([3, 4], dtype=torch.int32)
    call = flash_ext.attention_with_kvcache
    cases = [
        (dict(k_cache=torch.randn(2, 10, 2, 8), v_cache=torch.randn(2, 10, 2, 8)), "k_cache must have the head_dim"),
        (dict(k_cache=kc.double(), v_cache=vc.double()), "k_cache must have the dtype of q"),
        (dict(k_cache=torch.randn(2, 10, 3, 16), v_cache=torch.randn(2, 10, 3, 16)), "must be a multiple of"),
        (dict(v_cache=torch.randn(2, 11, 2, 16)), "v_cache must have the shape of k_cache"),
        (dict(cache_seqlens=lens.long()), "cache_seqlens must be int32"),
        (dict(cache_seqlens=lens[:1]), "cache_seqlens must be a 1-D tensor with batch = 2"),
        (dict(k=kn, v=None), "k and v must be given together"),
        (dict(cache_seqlens=None), "cache_seqlens must be given with k / v"),
        (dict(cache_seqlens=torch.tensor([3, 10], dtype=torch.int32)), r"cache_seqlens\[1\] = 10 with seqlen_new = 1"),
        (dict(cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32)), r"cache_seqlens\[0\] = -1"),
        (dict(k_cache=torch.randn(3, 10, 2, 16), v_cache=torch.randn(3, 10, 2, 16)), "without cache_batch_idx"),
        (dict(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), r"cache_batch_idx\[1\] = 2"),
        (dict(block_table=torch.tensor([[0], [1]])), "block_table must be int32"),
        (dict(block_table=torch.tensor([[0]], dtype=torch.int32)), "block_table must be a 2-D tensor with batch = 2"),
        (dict(block_table=torch.tensor([[0], [2]], dtype=torch.int32)), r"block_table\[1, 0\] = 2"),
        (dict(k_cache=torch.randn(2, 0, 2, 16), v_cache=torch.randn(2, 0, 2, 16),
              block_table=torch.tensor([[0], [1]], dtype=torch.int32)), "page_size .* must be > 0"),
        (dict(block_table=torch.tensor([[0], [1]], dtype=torch.int32), cache_batch_idx=lens),
         "cache_batch_idx cannot be used with a paged cache"),
        (dict(num_splits=-1), "num_splits must be >= 0"),
        (dict(k=torch.randn(2, 1, 2, 8), v=torch.randn(2, 1, 2, 8)), "k must have shape"),
    ]
    for override, message in cases:
        kw = dict(k_cache=kc, v_cache=vc, k=kn, v=vn, cache_seqlens=lens)
        kw.update(override)
        with pytest.raises(RuntimeError, match=message):
            call(q, kw.pop("k_cache"), kw.pop("v_cache"), kw.pop("k"), kw.pop("v"), **kw)
    with pytest.raises(RuntimeError, match="inference only: q requires grad"):
        call(q.requires_grad_(), kc, vc, kn, vn, cache_seqlens=lens)


def test_opcheck_and_compile():
    q = torch.randn(2, 2, 4, 16)
    kc, vc = torch.randn(6, 8, 2, 16), torch.randn(6, 8, 2, 16)
    kn, vn = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)
    lens = torch.tensor([3, 9], dtype=torch.int32)
    bt = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32)
    args = (q, kc, vc, kn, vn, lens, None, bt, None, True, -1, -1, 0.0, None, 0)
    torch.library.opcheck(torch.ops.flash_ext.attention_with_kvcache.default, args)

    def step(q, kc, vc, kn, vn, lens):
        return flash_ext.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, block_table=bt, causal=True)

    kc2, vc2 = kc.clone(), vc.clone()
    with torch.no_grad():
        want = step(q, kc, vc, kn, vn, lens)
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc2, vc2, kn, vn, lens)
    assert torch.equal(got, want) and torch.equal(kc2, kc) and torch.equal(vc2, vc)
