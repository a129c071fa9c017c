"""The README's headline lines, run as written in fresh interpreters (subprocesses).

A fresh process is the only honest check of the backend name: torch finds "sparsedrop" through
the installed entry point, which imports this package from inside torch's own registry lookup.
"""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

TINY_T5 = """
import torch
from transformers import T5Config, T5ForConditionalGeneration
config = T5Config(vocab_size=64, d_model=64, d_kv=64, d_ff=128, num_layers=1, num_decoder_layers=1,
                  num_heads=1, dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0)
batch = {"input_ids": torch.randint(1, 64, (8, 128)), "labels": torch.randint(1, 64, (8, 128))}
"""  # 1024 tokens: 8 blocks of 128 rows, enough for the default max_drop_all at p = 0.1

COUNT_SITES = """
from torch._dynamo.utils import counters
fused = {k: v for k, v in counters["sparsedrop"].items() if k.endswith("_fused")}
print("FUSED", sum(fused.values()))
"""


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _fused(out: str) -> int:
    return int(re.search(r"FUSED (\d+)", out).group(1))


def _headline_block() -> str:
    text = README.read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert 'backend="sparsedrop"' in block
    return block


def test_torch_compile_by_name_without_import():
    code = textwrap.dedent("""
        import torch
        f = torch.compile(lambda x: torch.nn.functional.dropout(x, 0.1) @ x.T, backend="sparsedrop")
        assert f(torch.randn(1024, 128)).shape == (1024, 1024)  # 8 blocks of the default 128 x 128
        assert "sparsedrop_compile" in __import__("sys").modules
    """) + COUNT_SITES
    assert _fused(_run(code)) == 1


def test_model_compile_by_name_without_import():
    code = TINY_T5 + textwrap.dedent("""
        model = T5ForConditionalGeneration(config).train()
        model.compile(backend="sparsedrop")
        model(**batch).loss.backward()
    """) + COUNT_SITES
    assert _fused(_run(code)) >= 1


def test_import_first_then_compile_by_name():
    code = textwrap.dedent("""
        import torch
        torch.compile(lambda x: x + 1, backend="aot_eager")(torch.randn(2))  # torch's registry already loaded
        import sparsedrop_compile
        f = torch.compile(lambda x: torch.nn.functional.dropout(x, 0.1) @ x.T, backend="sparsedrop")
        f(torch.randn(1024, 128))
    """) + COUNT_SITES
    assert _fused(_run(code)) == 1


@pytest.mark.parametrize("compile_line", ["torch.compile", "model.compile"])
def test_readme_headline_block_runs_as_written(compile_line):
    block = _headline_block()
    if compile_line == "model.compile":
        # The block's comment offers model.compile as the other spelling: run that one too.
        block = block.replace('model = torch.compile(model, backend="sparsedrop")', 'model.compile(backend="sparsedrop")')
        assert "model.compile(backend=" in block
    out = _run(TINY_T5 + block + COUNT_SITES)
    assert _fused(out) >= 1
