"""Train GPT-2 with flash_ext's attention, PyTorch's SDPA or the naive seqlen x seqlen attention, side by side.

    python examples/train_gpt2.py --attn flash_ext,sdpa,naive --steps 200          # GPT-2 small on the GPU
    python examples/train_gpt2.py --attn flash_ext --preset tiny --steps 50          # a few minutes on a CPU
    python examples/train_gpt2.py --model hf --attn flash_ext,sdpa,eager            # HuggingFace's GPT2LMHeadModel

The model is GPT-2 (12 layers, 12 heads, width 768 for --preset small: 124M parameters with GPT-2's vocabulary; here
the vocabulary is the 256 byte values, 86M) with GPT-2's dropout (0.1 on embeddings, attention probabilities and
residuals). Data: a byte-level corpus that every Python install has (the standard library's own source files) or
`--data FILE`; 95% for training, 5% held out. Every backend starts from the same weights and sees the same batches
(one seed), so their loss curves differ only by rounding and dropout draws. Printed per backend: a progress line,
tokens/s, model FLOPs utilisation (FLOPs of the forward and backward: 6 N + 12 L T d per token, against --peak-tflops,
by default the bf16 dense peak of the GPU: 989 for H100, 989 for H200, 312 for A100), peak memory. Written to --out: a
markdown table (results.md), the loss curves (losses.json, and loss.png where matplotlib is installed).

--attn: flash_ext (flash_ext.attention, causal), sdpa (torch.nn.functional.scaled_dot_product_attention, is_causal),
naive (softmax(q k^T / sqrt(d) + causal mask) v with the matrix materialized, as HuggingFace's eager GPT-2); with
--model hf: flash_ext, sdpa, eager (transformers' attn_implementation; flash_ext's backend is registered from
flash_ext.integrations.transformers).
"""
import argparse
import contextlib
import json
import math
import os
import sys
import sysconfig
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository's flash_ext when run from a checkout

import flash_ext  # noqa: E402

PRESETS = {  # n_layer, n_head, n_embd, seq_len, batch
    "small": (12, 12, 768, 1024, 8),
    "tiny": (2, 4, 128, 128, 8),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


# ---- data: bytes of a corpus, random windows of seq_len + 1
def load_corpus(path, max_bytes):
    if path:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes)
    else:  # the standard library's .py files, in a fixed order
        root, chunks, total = sysconfig.get_paths()["stdlib"], [], 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            dirnames[:] = [d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__")]
            for name in sorted(filenames):
                if name.endswith(".py") and total < max_bytes:
                    with open(os.path.join(dirpath, name), "rb") as fh:
                        chunk = fh.read()
                    chunks.append(chunk)
                    total += len(chunk)
        data = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batches(data, batch, seq_len, seed, device):
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([data[i:i + seq_len + 1] for i in idx.tolist()])
        yield x[:, :-1].to(device, non_blocking=True), x[:, 1:].to(device, non_blocking=True)


# ---- the model (GPT-2's layout: pre-LayerNorm blocks, GELU MLP, tied embeddings)
class Attention(nn.Module):
    def __init__(self, n_embd, n_head, dropout, impl):
        super().__init__()
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.n_head, self.dropout, self.impl = n_head, dropout, impl
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).unbind(2)  # (b, t, h, d) each
        p = self.dropout if self.training else 0.0
        if self.impl == "flash_ext":
            y = flash_ext.attention(q, k, v, causal=True, dropout_p=p)
        elif self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, dropout_p=p).transpose(1, 2)
        else:  # naive: the (t x t) matrix materialized
            qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            att = (qh @ kh.transpose(-1, -2)) / math.sqrt(qh.shape[-1])
            att = att.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            att = F.dropout(att.softmax(-1), p, self.training)
            y = (att @ vh).transpose(1, 2)
        return self.resid_drop(self.proj(y.reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, dropout, impl):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = Attention(n_embd, n_head, dropout, impl)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, seq_len, n_layer, n_head, n_embd, dropout, impl):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(seq_len, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, impl) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():  # GPT-2's initialization
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") or name.endswith("mlp.2.weight") \
                    else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def hf_model(vocab, seq_len, n_layer, n_head, n_embd, dropout, impl):
    import transformers
    if impl == "flash_ext":
        import flash_ext.integrations.transformers  # noqa: F401  (registers the backend)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=seq_len, n_layer=n_layer, n_head=n_head,
                                  n_embd=n_embd, attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=impl)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, idx, targets):
            logits = self.m(input_ids=idx).logits
            return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    return Wrapped()


def peak_memory_mb(device):
    """The backend's peak GPU memory; None on the CPU (the process's peak covers every backend run before)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return None


def train_one(impl, args, data, device):
    n_layer, n_head, n_embd = args.n_layer, args.n_head, args.n_embd
    torch.manual_seed(args.seed)
    make = hf_model if args.model == "hf" else GPT
    model = make(256, args.seq_len, n_layer, n_head, n_embd, args.dropout, impl).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    step_fn = torch.compile(model) if args.compile else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
    split = int(0.95 * data.numel())
    train_batches = batches(data[:split], args.batch, args.seq_len, args.seed, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    tokens_per_step = args.batch * args.seq_len
    flops_per_token = 6 * n_params + 12 * n_layer * n_embd * args.seq_len
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = next(train_batches)
        t0 = time.perf_counter()
        with amp:
            loss = step_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()  # synchronizes: the step's time is complete
        times.append(time.perf_counter() - t0)
        losses.append(loss_value)
        tty = sys.stdout.isatty()
        if (tty and step % max(1, args.steps // 50) == 0) or step % max(1, args.steps // 10) == 0 \
                or step == args.steps - 1:
            done = int(30 * (step + 1) / args.steps)
            line = (f"  {impl:9s} [{'#' * done}{'.' * (30 - done)}] step {step + 1}/{args.steps} loss {loss_value:.3f} "
                    f"{tokens_per_step / times[-1]:,.0f} tok/s")
            print("\r" + line if tty else line, end="" if tty else "\n", flush=True)
    if sys.stdout.isatty():
        print()
    # Held-out loss (no dropout), a few batches.
    model.eval()
    val_batches = batches(data[split:], args.batch, args.seq_len, args.seed + 1, device)
    with torch.no_grad(), amp:
        val = sum(model(*next(val_batches)).item() for _ in range(args.eval_batches)) / args.eval_batches
    skip = min(len(times) - 1, max(1, args.steps // 10))  # the first steps compile / warm up
    step_time = sorted(times[skip:])[len(times[skip:]) // 2]
    tps = tokens_per_step / step_time
    mfu = tps * flops_per_token / (args.peak_tflops * 1e12) if args.peak_tflops else float("nan")  # (CPU: none)
    return dict(impl=impl, params=n_params, losses=losses, val_loss=val, median_step_s=step_time, tokens_per_s=tps,
                mfu=mfu, peak_memory_mb=peak_memory_mb(device))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attn", default="flash_ext,sdpa,naive", help="comma-separated backends (see above)")
    ap.add_argument("--model", choices=["ours", "hf"], default="ours")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="small (GPT-2 small, seqlen 1024; the default on a GPU) or tiny (the default on a CPU)")
    ap.add_argument("--n-layer", type=int), ap.add_argument("--n-head", type=int), ap.add_argument("--n-embd", type=int)
    ap.add_argument("--seq-len", type=int), ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--dropout", type=float, default=0.1, help="GPT-2's: embeddings, attention, residuals")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="bf16 autocast (default on a GPU) or fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--data", default=None, help="a file to train on (bytes); default: the standard library's source")
    ap.add_argument("--max-bytes", type=int, default=16 * 2 ** 20)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default=None)
    ap.add_argument("--peak-tflops", type=float, default=None, help="for MFU; default: the GPU's bf16 dense peak")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpt2"))
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = PRESETS[args.preset or ("small" if device.type == "cuda" else "tiny")]
    for name, val in zip(("n_layer", "n_head", "n_embd", "seq_len", "batch"), preset):
        if getattr(args, name) is None:
            setattr(args, name, val)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.peak_tflops is None and device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    data = load_corpus(args.data, args.max_bytes)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"GPT-2 ({args.model}): {args.n_layer} layers, {args.n_head} heads, width {args.n_embd}, seqlen "
          f"{args.seq_len}, batch {args.batch}, {args.dtype}, dropout {args.dropout}, {args.steps} steps on {where}; "
          f"{data.numel():,} bytes of {'--data' if args.data else 'the standard library'}")
    results = []
    for impl in args.attn.split(","):
        results.append(train_one(impl.strip(), args, data, device))
    os.makedirs(args.out, exist_ok=True)
    base = next((r for r in results if r["impl"] in ("naive", "eager")), None)
    lines = [f"GPT-2 ({args.model}) {args.n_layer}L/{args.n_head}H/{args.n_embd}, seqlen {args.seq_len}, batch "
             f"{args.batch}, {args.dtype}, {args.steps} steps, {where}, torch {torch.__version__}", "",
             "| attention | tokens/s | vs naive | MFU | peak memory (MiB) | first loss | last loss | held-out loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mfu = f"{r['mfu']:.1%}" if math.isfinite(r["mfu"]) else "-"
        mem = f"{r['peak_memory_mb']:,.0f}" if r["peak_memory_mb"] is not None else "-"
        lines.append(f"| {r['impl']} | {r['tokens_per_s']:,.0f} | {ratio} | {mfu} | {mem} "
                     f"| {r['losses'][0]:.3f} | {r['losses'][-1]:.3f} | {r['val_loss']:.3f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(args.out, "losses.json"), "w") as fh:
        json.dump(dict(args=vars(args), results=results), fh, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in results:
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["impl"], linewidth=1)
        ax.set_xlabel("step"), ax.set_ylabel("training loss (nats / byte)"), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "loss.png"), dpi=120)
    except ImportError:
        print("(matplotlib is not installed: no loss.png)")
    return results


if __name__ == "__main__":
    main()
