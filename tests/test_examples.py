"""The GPT-2 training example (examples/train_gpt2.py) on the CPU for a few steps: every backend runs from the same
weights and batches, the loss falls, the results are written; with transformers, the same with HuggingFace's GPT-2."""
import importlib.util
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("train_gpt2", os.path.join(HERE, "..", "examples", "train_gpt2.py"))
train_gpt2 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_gpt2)

TINY = ["--preset", "tiny", "--device", "cpu", "--steps", "16", "--warmup", "4", "--lr", "3e-3", "--max-bytes",
        str(2 * 2 ** 20), "--eval-batches", "2"]


def check(results, out, impls):
    assert [r["impl"] for r in results] == impls
    for r in results:
        first, last = r["losses"][0], sum(r["losses"][-3:]) / 3
        assert last < first - 0.5, f"{r['impl']}: the loss did not fall ({r['losses']})"
        assert r["tokens_per_s"] > 0 and r["val_loss"] == r["val_loss"]
    # The same initial weights and first batch: the first losses agree (dropout draws differ by backend).
    assert max(r["losses"][0] for r in results) - min(r["losses"][0] for r in results) < 0.05
    with open(os.path.join(out, "losses.json")) as fh:
        assert len(json.load(fh)["results"]) == len(impls)
    table = open(os.path.join(out, "results.md")).read()
    assert all(f"| {i} |" in table for i in impls)


def test_train_gpt2_cpu(tmp_path):
    impls = ["flash_ext", "sdpa", "naive"]
    check(train_gpt2.main(TINY + ["--attn", ",".join(impls), "--out", str(tmp_path)]), str(tmp_path), impls)


def test_train_hf_gpt2_cpu(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed")
    impls = ["flash_ext", "eager"]
    check(train_gpt2.main(TINY + ["--model", "hf", "--attn", ",".join(impls), "--out", str(tmp_path)]),
          str(tmp_path), impls)
