# Emits wgmma_ops.inc: m64nNk16 wgmma wrappers (SS: A and B from smem descriptors; RS: A from registers).
Ns = [32, 64, 80, 96, 112, 128, 144, 160, 176, 192, 256]
out = []
out.append("// wgmma.mma_async m64nNk16 wrappers, f32 accumulate, one specialization per (N, element type).\n"
           "// Emitted by csrc/kernels/sm90/gen_wgmma.py (the operand lists are long and mechanical): edit the script.\n"
           "// SS: A (64x16, K-major) and B (Nx16) from shared-memory descriptors. RS: A from 4 registers per thread\n"
           "// (the mma.m16n8k16 A fragment of this warp's 16 rows), B from a descriptor. kTransB: B is MN-major.\n"
           "// ss_t<kTransA, kTransB>: SS with A MN-major too when kTransA (added for the backward).\n"
           "// ss_z<kTransA, kTransB>: ss_t with scale-d = 0 and D write-only (first k-step of a fresh product).\n"
           "#pragma once\n")
for dt, ty in (("bf16", "__nv_bfloat16"), ("f16", "__half")):
    for N in Ns:
        nreg = N // 2
        dl = ", ".join("%%%d" % i for i in range(nreg))
        cons = ", ".join('"+f"(d[%d])' % i for i in range(nreg))
        # SS
        a, b, sc = nreg, nreg + 1, nreg + 2
        out.append(f"template <> struct Wgmma<{N}, {ty}> {{\n")
        out.append(f"  template <int kTransB>\n  static __device__ __forceinline__ void ss(float (&d)[{nreg}], uint64_t desc_a, uint64_t desc_b, int scale_d) {{\n")
        out.append(f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{sc}, 0;\\n"\n'
                   f'      "wgmma.mma_async.sync.aligned.m64n{N}k16.f32.{dt}.{dt} {{{dl}}}, %{a}, %{b}, p, 1, 1, 0, %{sc+1};\\n}}\\n"\n'
                   f'      : {cons}\n      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransB));\n  }}\n')
        # RS
        a0 = nreg
        bd, sc = nreg + 4, nreg + 5
        out.append(f"  template <int kTransB>\n  static __device__ __forceinline__ void rs(float (&d)[{nreg}], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {{\n")
        out.append(f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{sc}, 0;\\n"\n'
                   f'      "wgmma.mma_async.sync.aligned.m64n{N}k16.f32.{dt}.{dt} {{{dl}}}, {{%{a0}, %{a0+1}, %{a0+2}, %{a0+3}}}, %{bd}, p, 1, 1, %{sc+1};\\n}}\\n"\n'
                   f'      : {cons}\n      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(kTransB));\n  }}\n')
        # SS with both transposes as template parameters (the backward's dQ = dS K reads dS MN-major).
        a, b, sc = nreg, nreg + 1, nreg + 2
        out.append(f"  template <int kTransA, int kTransB>\n  static __device__ __forceinline__ void ss_t(float (&d)[{nreg}], uint64_t desc_a, uint64_t desc_b, int scale_d) {{\n")
        out.append(f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{sc}, 0;\\n"\n'
                   f'      "wgmma.mma_async.sync.aligned.m64n{N}k16.f32.{dt}.{dt} {{{dl}}}, %{a}, %{b}, p, 1, 1, %{sc+1}, %{sc+2};\\n}}\\n"\n'
                   f'      : {cons}\n      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB));\n  }}\n')
        # SS, both transposes, D = A * B with D as outputs only ("=f"): the accumulators' old values are not
        # inputs, so they need not stay live before the first k-step (added for the d256 backward).
        dcons = ", ".join('"=f"(d[%d])' % i for i in range(nreg))
        out.append(f"  template <int kTransA, int kTransB>\n  static __device__ __forceinline__ void ss_z(float (&d)[{nreg}], uint64_t desc_a, uint64_t desc_b) {{\n")
        out.append(f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{a+2}, 0;\\n"\n'
                   f'      "wgmma.mma_async.sync.aligned.m64n{N}k16.f32.{dt}.{dt} {{{dl}}}, %{a}, %{b}, p, 1, 1, %{a+3}, %{a+4};\\n}}\\n"\n'
                   f'      : {dcons}\n      : "l"(desc_a), "l"(desc_b), "r"(0), "n"(kTransA), "n"(kTransB));\n  }}\n')
        out.append("};\n")
open("wgmma_ops.inc", "w").write("".join(out))
