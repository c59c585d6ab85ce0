"""Memory grows linearly with sequence length: the seqlen x seqlen matrix is never materialized.

Peak resident memory of one CPU forward+backward is measured in a fresh subprocess (the peak is
reset through /proc/self/clear_refs once the inputs exist), at seqlen 4096 and 8192."""
import pytest
import torch

from conftest import requires_cuda
from flash_ext.demo import peak_memory


def _peak_extra_bytes(seqlen, nheads, head_dim, impl="flash_ext"):
    """Peak resident memory of one causal CPU forward+backward above its inputs, in a fresh child process
    (flash_ext.demo.peak_memory; impl "naive" materializes the float32 score matrix)."""
    return peak_memory(impl, seqlen, nheads, head_dim, True, "cpu", torch.float32)


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
