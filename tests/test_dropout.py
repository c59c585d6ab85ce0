"""Attention dropout (issue 19): the Philox generator and the element-to-counter mapping (csrc/kernels/dropout.h)
against an independent Python implementation and the generator's published test vectors; the keep rate; forward and
backward against the float64 reference with the exact mask (flash_ext.dropout_mask) alone and with causal, window,
GQA, bias, softcap and sinks, odd lengths; reproducibility from torch's generator; bad input; gradcheck, opcheck,
compile; sdpa(dropout_p=...). On CUDA: every kernel family (sm90, sm80, the sm80 backward's A100 fallback tiles) and
both backward modes against the same reference, and the kernels' keep masks, read back from the forward's output and
the backward's dV, bitwise equal to the CPU mask; fresh masks on each CUDA-graph replay.
"""
import pytest
import torch

import flash_ext
from conftest import poison_cuda_allocator, requires_cuda
from reference import assert_fa_close, attention_ref_grads
from test_attention import make_inputs
from test_inputs import A100_SMEM

M32 = 0xFFFFFFFF


def philox_py(c, k):
    """Philox4x32-10 in Python integers: counter c (4 words), key k (2 words)."""
    c, k = list(c), list(k)
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k[0]) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k[1]) & M32, p0 & M32]
        k = [(k[0] + 0x9E3779B9) & M32, (k[1] + 0xBB67AE85) & M32]
    return c


def mask_py(batch, nheads, sq, sk, p, seed, offset):
    """The keep mask of docs/ARCHITECTURE.md ("Dropout"), element by element."""
    rows, cols = 8 * -(-sq // 16), -(-sk // 2)
    thr = int(p * 2 ** 32)
    out = torch.zeros(batch, nheads, sq, sk, dtype=torch.bool)
    for b in range(batch):
        for h in range(nheads):
            for i in range(sq):
                for j in range(0, sk, 2):
                    n = ((b * nheads + h) * rows + 8 * (i // 16) + i % 8) * cols + j // 2
                    w = philox_py([n & M32, n >> 32, offset & M32, offset >> 32], [seed & M32, seed >> 32])
                    u = (i // 8) % 2
                    out[b, h, i, j] = w[2 * u] >= thr
                    if j + 1 < sk:
                        out[b, h, i, j + 1] = w[2 * u + 1] >= thr
    return out


def test_philox_known_answers():
    """The generator's published known-answer vectors (Random123's philox4x32_10)."""
    assert philox_py([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox_py([M32] * 4, [M32, M32]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert philox_py([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("shape,p,seed,offset", [
    ((1, 1, 17, 9), 0.5, 0, 0),
    ((2, 3, 33, 20), 0.1, 12345, 678),
    ((1, 2, 40, 31), 0.9, 2 ** 40 + 3, 2 ** 35 + 1),  # seed and offset above 32 bits
])
def test_dropout_mask_matches_the_mapping(shape, p, seed, offset):
    got = flash_ext.dropout_mask(*shape, p, seed, offset)
    assert got.dtype == torch.bool and got.shape == shape
    assert torch.equal(got, mask_py(*shape, p, seed, offset))


def test_keep_rate():
    for p in (0.1, 0.5, 0.8):
        m = flash_ext.dropout_mask(2, 4, 256, 512, p, 7, 11)
        assert abs(m.float().mean().item() - (1 - p)) < 5e-3


def dropout_case(name, sq, sk, d, b, h, hk, p, **kw):
    return dict(name=name, sq=sq, sk=sk, d=d, b=b, h=h, hk=hk, p=p, kw=kw)


CASES = [
    dropout_case("plain", 113, 203, 32, 2, 4, 2, 0.1),
    dropout_case("p0.5-causal", 203, 203, 64, 1, 2, 2, 0.5, causal=True),
    dropout_case("p0.9", 77, 130, 32, 1, 2, 1, 0.9),
    dropout_case("window-gqa", 300, 300, 32, 2, 6, 2, 0.2, window_size=(50, 10)),
    dropout_case("softcap-sinks", 130, 77, 64, 1, 4, 4, 0.3, softcap=5.0, sinks=True),
    dropout_case("bias", 130, 200, 32, 2, 2, 1, 0.25, bias=True),
    dropout_case("len-1x1", 1, 1, 32, 1, 2, 2, 0.5),
    dropout_case("len-1023", 1023, 1023, 32, 1, 1, 1, 0.15, causal=True),
]


def check_dropout_case(dtype, c, device="cpu", deterministic=False):
    b, h, hk, sq, sk, d, p = c["b"], c["h"], c["hk"], c["sq"], c["sk"], c["d"], c["p"]
    q, k, v = make_inputs(device, dtype, b, h, hk, sq, sk, d, False)
    kw = dict(c["kw"])
    bias = sinks = None
    if kw.pop("bias", False):
        bias = torch.randn(b, 1, 1, sk, device=device, requires_grad=True)
    if kw.pop("sinks", False):
        sinks = torch.randn(h, device=device, requires_grad=True)
    seed, offset = 987654321 + sq, 42
    rng = torch.tensor([seed, offset], dtype=torch.int64, device=device)
    window = kw.get("window_size", (-1, -1))
    args = (q, k, v, None, kw.get("causal", False), deterministic, window[0], window[1], kw.get("softcap", 0.0), None,
            bias, 0, sinks, None, None, 0, p, rng)
    poison_cuda_allocator(((b, sq, h, d), dtype), ((b, h, sq), torch.float32))
    out, lse = torch.ops.flash_ext.attention_forward(*args)
    dout = torch.randn_like(out)
    leaves = [q, k, v] + ([bias] if bias is not None else []) + ([sinks] if sinks is not None else [])
    names = ["dq", "dk", "dv"] + (["dbias"] if bias is not None else []) + (["dsinks"] if sinks is not None else [])
    poison_cuda_allocator(((b, sq, h, d), dtype), ((b, sk, hk, d), dtype))
    grads = torch.autograd.grad(out, leaves, dout)
    mask = flash_ext.dropout_mask(b, h, sq, sk, p, seed, offset).to(device)  # computed on the CPU
    ref_kw = dict(kw, dropout_mask=mask, dropout_p=p)
    out_ref, lse_ref, g_ref = attention_ref_grads(dout, q, k, v, True, bias, sinks, bias is not None, **ref_kw)
    out_pt, lse_pt, g_pt = attention_ref_grads(dout, q, k, v, False, bias, sinks, bias is not None, **ref_kw)
    assert_fa_close("out", out, out_ref, out_pt, dtype)
    assert_fa_close("lse", lse, lse_ref, lse_pt, torch.float32)
    for name, g in zip(names, grads):
        assert_fa_close(name, g, g_ref[name], g_pt[name], dtype)
    # The backward regenerates the same mask: a second call and backward are bitwise the first (all but CUDA's dq
    # outside the deterministic mode, which float atomics add up in any order).
    out2, _ = torch.ops.flash_ext.attention_forward(*args)
    assert torch.equal(out, out2)
    for name, g1, g2 in zip(names, grads, torch.autograd.grad(out2, leaves, dout)):
        if name == "dq" and device != "cpu" and not deterministic:
            continue
        assert torch.equal(g1, g2), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("c", CASES, ids=[c["name"] for c in CASES])
def test_dropout_against_the_reference(dtype, c):
    check_dropout_case(dtype, c)


def test_reproducible_from_torch_generator():
    q, k, v = make_inputs("cpu", torch.float32, 2, 2, 2, 50, 60, 16, False)
    torch.manual_seed(3)
    a = flash_ext.attention(q, k, v, dropout_p=0.3)
    b = flash_ext.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    assert torch.equal(flash_ext.attention(q, k, v, dropout_p=0.3), a)
    assert not torch.equal(a, b), "consecutive calls must draw different masks"
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    x = flash_ext.attention(q, k, v, dropout_p=0.3, generator=g1)
    assert torch.equal(flash_ext.attention(q, k, v, dropout_p=0.3, generator=g2), x)
    # What the wrapper draws: the (seed, offset) pair from the generator, then the op with it.
    g3 = torch.Generator().manual_seed(9)
    rng = torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, generator=g3)
    y = torch.ops.flash_ext.attention(q, k, v, None, False, False, -1, -1, 0.0, None, None, 0, None, None, None, 0,
                                      0.3, rng)
    assert torch.equal(y, x)


def test_zero_dropout_is_the_plain_path():
    q, k, v = make_inputs("cpu", torch.float32, 1, 2, 2, 70, 90, 16, False)
    assert torch.equal(flash_ext.attention(q, k, v, dropout_p=0.0, causal=True), flash_ext.attention(q, k, v, causal=True))


def test_sdpa_dropout():
    q = torch.randn(1, 2, 30, 16)
    torch.manual_seed(0)
    a = flash_ext.sdpa(q, q, q, dropout_p=0.2)
    torch.manual_seed(0)
    b = flash_ext.attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), dropout_p=0.2).transpose(1, 2)
    assert torch.equal(a, b)


def test_bad_dropout_arguments():
    q = torch.randn(1, 8, 2, 16)
    for p, exc, msg in ((-0.1, RuntimeError, r"dropout_p must be in \[0, 1\)"), (1.0, RuntimeError, r"\[0, 1\)"),
                        (float("nan"), RuntimeError, r"\[0, 1\)"), ("0.1", TypeError, "dropout_p must be a float")):
        with pytest.raises(exc, match=msg):
            flash_ext.attention(q, q, q, dropout_p=p)
    with pytest.raises(ValueError, match="generator is on cpu, q on meta"):
        flash_ext.attention(q.to("meta"), q.to("meta"), q.to("meta"), dropout_p=0.1, generator=torch.Generator())
    base = (q, q, q, None, False, False, -1, -1, 0.0, None, None, 0, None, None, None, 0)
    with pytest.raises(RuntimeError, match="dropout_rng must be given with dropout_p > 0"):
        torch.ops.flash_ext.attention_forward(*base, 0.1, None)
    with pytest.raises(RuntimeError, match="dropout_rng must be an int64 tensor of 2 elements"):
        torch.ops.flash_ext.attention_forward(*base, 0.1, torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="dropout_rng must be an int64 tensor of 2 elements"):
        torch.ops.flash_ext.attention_forward(*base, 0.1, torch.tensor([1.0, 2.0]))


def test_gradcheck_opcheck_compile():
    q, k, v = (torch.randn(1, s, 2, 8, dtype=torch.float64, requires_grad=True) for s in (7, 9, 9))
    rng = torch.tensor([5, 6], dtype=torch.int64)
    f = lambda q, k, v: torch.ops.flash_ext.attention(q, k, v, None, True, False, -1, -1, 0.0, None, None, 0, None,
                                                       None, None, 0, 0.4, rng)
    assert torch.autograd.gradcheck(f, (q, k, v))
    args = (q.float(), k.float(), v.float(), None, False, False, -1, -1, 0.0, None, None, 0, None, None, None, 0,
            0.3, rng)
    torch.library.opcheck(torch.ops.flash_ext.attention_forward.default, args)
    out, lse = torch.ops.flash_ext.attention_forward(*(t.detach() if torch.is_tensor(t) else t for t in args))
    torch.library.opcheck(torch.ops.flash_ext.attention_backward.default,
                          (torch.randn_like(out), *(a.detach() for a in args[:3]), out, lse, 0.3, False, False, -1,
                           -1, 0.0, None, None, 0, None, False, None, None, 0, 0.3, rng))
    torch.library.opcheck(torch.ops.flash_ext.dropout_mask.default, (rng, 1, 2, 7, 9, 0.3))

    def step(q, k, v):  # torch's default generator: dynamo traces its draw (an explicit Generator it cannot)
        return flash_ext.attention(q, k, v, dropout_p=0.3)

    torch.manual_seed(1)
    want = step(q, k, v)
    torch.manual_seed(1)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    assert torch.equal(got, want)


# ---- CUDA: every kernel family and backward mode ----

FAMILIES = {"sm90": dict(FLASH_EXT_BACKEND="sm90"), "sm80": dict(FLASH_EXT_BACKEND="sm80"),
            "sm80-a100": dict(FLASH_EXT_BACKEND="sm80", FLASH_EXT_SM80_SMEM_LIMIT=str(A100_SMEM))}


def use_family(monkeypatch, family):
    """sm90 on a GPU without it runs sm80 (the launcher's choice, as for every call); sm80-a100: the sm80 backward's
    fallback tiles (key-major S^T, as sm90's backward), forced on any GPU by the A100's shared-memory limit."""
    monkeypatch.setenv("FLASH_EXT_CUDA_DROPOUT", "1")  # the kernels' opt-in (docs/ARCHITECTURE.md, "Dropout")
    if family == "sm90" and torch.cuda.get_device_capability()[0] != 9:
        family = "sm80"
    for name, value in FAMILIES[family].items():
        monkeypatch.setenv(name, value)


CUDA_CASES = [dict(c, dtype=torch.bfloat16 if i % 2 == 0 else torch.float16) for i, c in enumerate(CASES)] + [
    dict(dropout_case("d128-causal", 200, 333, 128, 2, 4, 2, 0.2, causal=True), dtype=torch.bfloat16),
    dict(dropout_case("d128-gqa", 257, 190, 128, 1, 8, 2, 0.5), dtype=torch.float16),
    dict(dropout_case("d96", 129, 190, 96, 1, 2, 1, 0.1), dtype=torch.bfloat16),
    dict(dropout_case("d192-causal", 140, 140, 192, 1, 2, 2, 0.3, causal=True), dtype=torch.bfloat16),
    dict(dropout_case("d256", 150, 260, 256, 1, 2, 2, 0.3), dtype=torch.bfloat16),
]
# The A100 tiles have no backward for head dims above 192 (test_inputs.py): no such case there.
CUDA_GRID = [(f, det, c) for f in FAMILIES for det in (False, True) for c in CUDA_CASES
             if not (f == "sm80-a100" and c["d"] > 192)]


@requires_cuda
@pytest.mark.parametrize("family,deterministic,c", CUDA_GRID,
                         ids=[f"{f}-{'det' if det else 'atomic'}-{c['name']}" for f, det, c in CUDA_GRID])
def test_cuda_dropout_against_the_reference(monkeypatch, family, deterministic, c):
    use_family(monkeypatch, family)
    check_dropout_case(c["dtype"], c, "cuda", deterministic)


def kernel_masks(b, h, sq, sk, d, p, seed, offset, causal=False):
    """The keep masks the CUDA kernels apply, read back exactly. Forward: with q = 0 every visible key of a row has
    P = 1 / (its count); V rows one-hot (key j -> column j mod d) and a bool bias that shows one chunk of d keys at
    a time give out[i, j mod d] = Z_ij / (count (1 - p)). Backward: dO rows one-hot (row i -> column i mod d), zero
    outside one chunk of d rows at a time, give dV[j, i mod d] = P_ij Z_ij / (1 - p)."""
    dev, dt = "cuda", torch.bfloat16
    rng = torch.tensor([seed, offset], dtype=torch.int64, device=dev)
    q = torch.zeros(b, sq, h, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, sk, h, d, device=dev, dtype=dt, requires_grad=True)
    eye_k = torch.eye(d, device=dev, dtype=dt)[torch.arange(sk, device=dev) % d]  # (sk, d)
    v = eye_k.view(1, sk, 1, d).expand(b, sk, h, d).contiguous().requires_grad_()
    visible = torch.ones(sq, sk, dtype=torch.bool, device=dev)
    if causal:
        visible = torch.ones(sq, sk, dtype=torch.bool, device=dev).tril(sk - sq)
    fwd = torch.zeros(b, h, sq, sk, dtype=torch.bool, device=dev)
    base = lambda bias: (q, k, v, None, causal, False, -1, -1, 0.0, None, bias, 0, None, None, None, 0, p, rng)
    for c0 in range(0, sk, d):
        chunk = torch.zeros(sk, dtype=torch.bool, device=dev)
        chunk[c0:c0 + d] = True
        bias = chunk.view(1, 1, 1, sk).expand(b, h, sq, sk)
        out, _ = torch.ops.flash_ext.attention_forward(*base(bias))
        assert torch.isfinite(out).all()
        got = out.float().permute(0, 2, 1, 3)[..., : min(d, sk - c0)] != 0  # (b, h, sq, keys of the chunk)
        fwd[..., c0:c0 + d] = got
    fwd &= visible
    bwd = torch.zeros(b, h, sq, sk, dtype=torch.bool, device=dev)
    out = torch.ops.flash_ext.attention(*base(None))
    for r0 in range(0, sq, d):
        rows = torch.arange(sq, device=dev)
        do = torch.eye(d, device=dev, dtype=dt)[rows % d] * ((rows >= r0) & (rows < r0 + d)).to(dt)[:, None]
        dout = do.view(1, sq, 1, d).expand(b, sq, h, d).contiguous()
        (dv,) = torch.autograd.grad(out, (v,), dout, retain_graph=True)
        assert torch.isfinite(dv).all()
        got = dv.float().permute(0, 2, 3, 1)[:, :, : min(d, sq - r0), :] != 0  # (b, h, rows of the chunk, sk)
        bwd[:, :, r0:r0 + d] = got
    return fwd, bwd & visible, visible


@requires_cuda
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("d,sq,sk,p,causal", [(128, 300, 333, 0.3, False), (64, 129, 77, 0.5, True),
                                               (256, 100, 270, 0.1, False), (32, 50, 80, 0.9, False)])
def test_cuda_kernel_masks_are_the_cpu_mask(monkeypatch, family, d, sq, sk, p, causal):
    """The forward's and the backward's keep masks, read back from the kernels, equal flash_ext.dropout_mask (the
    CPU's) bit for bit: the same Philox words at the same elements in every family, tile shape and layout."""
    if family == "sm80-a100" and d > 192:
        d = 192  # no A100 backward above 192 (test_inputs.py)
    use_family(monkeypatch, family)
    b, h, seed, offset = 2, 3, 1234567 + d, 99 + sq
    fwd, bwd, visible = kernel_masks(b, h, sq, sk, d, p, seed, offset, causal)
    want = flash_ext.dropout_mask(b, h, sq, sk, p, seed, offset).cuda() & visible
    assert torch.equal(fwd, want), f"forward mask: {(fwd != want).sum().item()} of {want.numel()} elements differ"
    assert torch.equal(bwd, want), f"backward mask: {(bwd != want).sum().item()} of {want.numel()} elements differ"
    kept = want[visible.expand_as(want)].float()
    sigma = (p * (1 - p) / kept.numel()) ** 0.5
    assert abs(kept.mean().item() - (1 - p)) < 4 * sigma + 1e-9


@requires_cuda
def test_cuda_dropout_reproducible_and_fresh_in_graphs(monkeypatch):
    """Same generator state -> bitwise the same output and gradients (deterministic mode); a captured call draws
    a fresh mask on each replay (the seed / offset come from torch's graph-safe CUDA generator)."""
    monkeypatch.setenv("FLASH_EXT_CUDA_DROPOUT", "1")
    q, k, v = make_inputs("cuda", torch.bfloat16, 2, 4, 2, 300, 300, 64, False)
    dout = torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        torch.cuda.manual_seed(5)
        out = flash_ext.attention(q, k, v, dropout_p=0.2, causal=True, deterministic=True)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    torch.cuda.manual_seed(5)
    other = flash_ext.attention(q, k, v, dropout_p=0.2, causal=True)
    assert torch.equal(other, runs[0][0])
    assert not torch.equal(flash_ext.attention(q, k, v, dropout_p=0.2, causal=True), runs[0][0])

    qs, ks, vs = (t.detach().clone() for t in (q, k, v))
    static_out = torch.empty_like(qs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the capture
            static_out.copy_(flash_ext.attention(qs, ks, vs, dropout_p=0.5))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out.copy_(flash_ext.attention(qs, ks, vs, dropout_p=0.5))
    replays = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        replays.append(static_out.clone())
    assert all(torch.isfinite(r).all() for r in replays)
    assert not torch.equal(replays[0], replays[1]) and not torch.equal(replays[1], replays[2])


@requires_cuda
def test_cuda_dropout_is_opt_in(monkeypatch):
    """Without FLASH_EXT_CUDA_DROPOUT=1 CUDA says that dropout is opt-in instead of ignoring it."""
    monkeypatch.delenv("FLASH_EXT_CUDA_DROPOUT", raising=False)
    q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="FLASH_EXT_CUDA_DROPOUT=1"):
        flash_ext.attention(q, q, q, dropout_p=0.1)
    assert torch.isfinite(flash_ext.attention(q, q, q, dropout_p=0.0)).all()


@requires_cuda
def test_cuda_dropout_mask_op():
    m = flash_ext.dropout_mask(1, 2, 20, 30, 0.2, 1, 2, device="cuda")
    assert m.is_cuda and torch.equal(m.cpu(), flash_ext.dropout_mask(1, 2, 20, 30, 0.2, 1, 2))
