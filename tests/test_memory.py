"""Memory grows linearly with sequence length: the seqlen x seqlen matrix is never materialized.

Peak resident memory of one CPU forward+backward is measured in a fresh subprocess (the peak is
reset through /proc/self/clear_refs once the inputs exist), at seqlen 4096 and 8192."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import requires_cuda

_CHILD = textwrap.dedent("""
    import json, sys, torch, flash_ext
    sys.path.insert(0, sys.argv[5])
    from reference import attention_ref
    seqlen, nheads, head_dim, impl = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(2)
    q, k, v = (torch.randn(1, seqlen, nheads, head_dim, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, seqlen, nheads, head_dim)
    def rss_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = rss_kib("VmHWM")
    if impl == "flash_ext":
        out = flash_ext.attention(q, k, v, causal=True)
    else:  # the naive implementation, in float32: materializes the seqlen x seqlen scores
        out = attention_ref(q, k, v, causal=True, upcast=False)[0]
    out.backward(dout)
    peak = rss_kib("VmHWM")
    print(json.dumps({"extra_bytes": (peak - base) * 1024}))
""")


def _peak_extra_bytes(seqlen, nheads, head_dim, impl="flash_ext"):
    res = subprocess.run([sys.executable, "-c", _CHILD, str(seqlen), str(nheads), str(head_dim), impl,
                          os.path.dirname(os.path.abspath(__file__))],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])["extra_bytes"]


def test_cpu_memory_is_linear_in_seqlen():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        pytest.fail(f"cannot reset the peak-RSS counter on this machine: {e}")
    nheads, head_dim = 4, 64
    m4k = _peak_extra_bytes(4096, nheads, head_dim)
    m8k = _peak_extra_bytes(8192, nheads, head_dim)
    naive_8k = _peak_extra_bytes(8192, nheads, head_dim, impl="naive")
    print(f"peak extra memory of causal forward+backward: flash_ext 4096 -> {m4k / 2**20:.1f} MiB, "
          f"8192 -> {m8k / 2**20:.1f} MiB; naive float32 at 8192: {naive_8k / 2**20:.0f} MiB")
    assert naive_8k > nheads * 8192 * 8192 * 4, "the naive run did not materialize its score matrix"
    assert m8k < naive_8k / 8, "peak memory at 8192 is not far below the naive implementation's"
    assert m8k < 3.0 * m4k, f"peak memory grew {m8k / m4k:.2f}x from 4096 to 8192 (linear means ~2x)"


@requires_cuda
def test_cuda_memory_is_linear_in_seqlen():
    def peak(seqlen):
        q, k, v = (torch.randn(1, seqlen, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn_like(q)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        import flash_ext
        flash_ext.attention(q, k, v, causal=True).backward(dout)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    m8k, m16k = peak(8192), peak(16384)
    naive_16k = 16 * 16384 * 16384 * 2
    assert m16k < naive_16k / 16
    assert m16k < 2.5 * m8k
