"""Fingerprints the SASS of compiled kernel objects, so a refactor can show it changed no machine code.

    python tools/sass_fingerprint.py build/kernels > a.txt     # one line per kernel: hash, arch, name
    python tools/sass_fingerprint.py --diff a.txt b.txt        # kernels whose code differs
    python tools/sass_fingerprint.py --params-moved build/kernels   # the same, blind to parameter offsets

Each kernel's SASS (cuobjdump --dump-sass) is hashed with its addresses and encodings stripped; the
kernel's name is not part of the hash (a renamed template parameter changes the mangled name, not the
code), so --diff matches the two lists by file and architecture as multisets of hashes. --params-moved also
writes every kernel-parameter address (constant bank 0, c[0x0][0x...]) as one symbol: for a change that only
adds fields to the parameter structs (csrc/kernels/params.h), which moves the later fields' offsets and
nothing else. cuobjdump is
found on PATH, under CUDA_HOME, or in Triton's package.
"""
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections import Counter


def find_cuobjdump():
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    for root in filter(None, [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]):
        cand = os.path.join(root, "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    try:
        import triton
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    sys.exit("cuobjdump not found (CUDA toolkit or `pip install triton`)")


ADDR = re.compile(r"/\*[0-9a-f]{4,}\*/")
ENC = re.compile(r"/\* 0x[0-9a-f]+ \*/")
PARAM = re.compile(r"c\[0x0\]\[0x[0-9a-f]+\]")


def fingerprint(obj, exe, params_moved=False):
    text = subprocess.run([exe, "--dump-sass", obj], capture_output=True, text=True, check=True).stdout
    arch, name, body, out = "?", None, [], []

    def flush():
        if name is not None:
            out.append((hashlib.sha1("\n".join(body).encode()).hexdigest()[:16], arch, name))

    for line in text.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            flush()  # the previous ELF's last kernel, under its own arch
            arch, name, body = m.group(1), None, []
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            flush()
            name, body = m.group(1), []
            continue
        if name is None:
            continue
        s = ENC.sub("", ADDR.sub("", line)).strip()
        if params_moved:
            s = PARAM.sub("c[0x0][P]", s)
        # (cuobjdump's headers between two ELFs are not the previous ELF's last kernel)
        if s.startswith(("Fatbin", "=====", "code for", "host =", "compile_size")):
            continue
        if s and not s.startswith(".") and s != "..........":
            body.append(s)
    flush()
    return out


def main(argv):
    if argv and argv[0] == "--diff":
        a, b = ([l.split() for l in open(p) if l.strip()] for p in argv[1:3])
        groups = lambda rows: {}.__class__(
            (k, Counter(r[0] for r in rows if (r[3], r[1]) == k)) for k in {(r[3], r[1]) for r in rows})
        ga, gb = groups(a), groups(b)
        names = {r[0]: r[2] for r in a + b}
        bad = 0
        for key in sorted(set(ga) | set(gb)):
            ca, cb = ga.get(key, Counter()), gb.get(key, Counter())
            if ca != cb:
                bad += 1
                print(f"{key[0]} {key[1]}: {sum((ca - cb).values())} kernels only in the first, "
                      f"{sum((cb - ca).values())} only in the second")
                for h in (cb - ca):
                    print(f"   new {h} {names[h][:140]}")
                for h in (ca - cb):
                    print(f"   old {h} {names[h][:140]}")
        total = sum(sum(c.values()) for c in ga.values())
        print(f"{total} kernels in the first list; {bad} (file, arch) groups differ")
        return 1 if bad else 0
    params_moved = bool(argv) and argv[0] == "--params-moved"
    if params_moved:
        argv = argv[1:]
    exe = find_cuobjdump()
    for obj in sorted(glob.glob(os.path.join(argv[0] if argv else "build/kernels", "*.o"))):
        for h, arch, name in fingerprint(obj, exe, params_moved):
            print(h, arch, name, os.path.basename(obj))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
