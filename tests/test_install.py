"""The install explains itself (issue 20): an extension built against another torch, or one that cannot be loaded
(the "undefined symbol" of a torch upgrade, simulated), makes `import flash_ext` raise one clear ImportError that
says what it was built against and how to rebuild; the source distribution carries every source a build needs; a
wheel built with `pip wheel .` installs and runs outside the checkout."""
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, cwd=None, env=None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env)


def test_mismatched_build_is_one_clear_error():
    code = """
import importlib, flash_ext, flash_ext._build_info as info
info.TORCH_VERSION = "1.0.0+cu999"
try:
    importlib.reload(flash_ext)
except ImportError as e:
    print("ERROR:", e)
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    msg = r.stdout
    assert "flash_ext was built against torch 1.0.0+cu999" in msg and "but this is torch" in msg, msg
    assert "Rebuild flash_ext against the installed torch" in msg and "--force-reinstall" in msg, msg


def test_unloadable_extension_is_one_clear_error():
    """What a torch upgrade does to an extension built before it: loading _C fails with an undefined symbol."""
    code = """
import sys, importlib.abc
class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "flash_ext._C":
            raise ImportError("flash_ext/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")
sys.meta_path.insert(0, Broken())
try:
    import flash_ext
except ImportError as e:
    print("ERROR:", e)
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "flash_ext's compiled extension (flash_ext._C) could not be loaded" in r.stdout, r.stdout
    assert "undefined symbol" in r.stdout and "It was built against torch" in r.stdout, r.stdout
    assert "Rebuild flash_ext against the installed torch" in r.stdout


def test_sdist_has_every_source(tmp_path):
    pytest.importorskip("build", reason="the build package is not installed (pip install build)")
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (sdist,) = list(tmp_path.glob("flash_ext-*.tar.gz"))
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", "csrc"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    if not tracked:  # not a git checkout: the files in the folder
        tracked = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "csrc"))
                   for f in fs]
    missing = [f for f in tracked if f not in names]
    assert not missing, f"sources missing from the sdist: {missing[:10]}"
    for f in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "tools/generate_instantiations.py",
              "flash_ext/__init__.py", "flash_ext/integrations/transformers.py"):
        assert f in names, f
    assert not any(n.endswith((".so", ".o")) or n == "flash_ext/_build_info.py" for n in names)


@pytest.mark.skipif(os.environ.get("FLASH_EXT_SKIP_WHEEL_TEST") == "1", reason="FLASH_EXT_SKIP_WHEEL_TEST=1")
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    """`pip wheel .` (the CPU build here; the CUDA one where nvcc and a CUDA torch are), installed into a folder of
    its own and imported from elsewhere."""
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)))
    if not os.environ.get("FLASH_EXT_WHEEL_CUDA"):
        env["FLASH_EXT_FORCE_CPU"] = "1"  # minutes, not the whole CUDA build, unless asked for
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-build-isolation", "--no-deps", "-q", "-w",
                        str(wheels)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = list(wheels.glob("flash_ext-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert any(n.startswith("flash_ext/_C") and n.endswith(".so") for n in names), names
    assert "flash_ext/_build_info.py" in names and "flash_ext/integrations/transformers.py" in names
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    code = """
import torch, flash_ext
q = torch.randn(1, 33, 2, 16)
out = flash_ext.attention(q, q, q, causal=True)
ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, q, q)), is_causal=True)
assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)
print(flash_ext.__file__, flash_ext.__version__)
"""
    r = run_python(code, cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=str(site)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(str(site)), r.stdout
