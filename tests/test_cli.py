"""The command line: bad input exits with status 2 and one line on stderr naming the value and
what to do; the demo shows progress while it compiles; the README's logging and Trainer lines."""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparsedrop_compile.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def _main(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's errors
        rc = e.code
    return rc, capsys.readouterr()


def _bad_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    return str(path)


BAD = {
    "unknown_model": (lambda tmp: ["explain", "--model", "nonexistent"], ["'nonexistent' is neither a model family", "t5, t5-gated", "config.json"]),
    "config_not_json": (lambda tmp: ["explain", "--model", _bad_json(tmp)], ["config.json is not valid JSON", "expected a HF config.json"]),
    "explain_seq_0": (lambda tmp: ["explain", "--seq", "0"], ["argument --seq: 0 is not allowed; expected a positive integer"]),
    "explain_block_0": (lambda tmp: ["explain", "--block-size", "0"], ["argument --block-size: 0", "positive integer"]),
    "demo_steps_0": (lambda tmp: ["demo", "--steps", "0"], ["argument --steps: 0", "positive integer"]),
    "demo_block_0": (lambda tmp: ["demo", "--block-size", "0"], ["argument --block-size: 0", "positive integer"]),
    "demo_seq_text": (lambda tmp: ["demo", "--seq", "many"], ["argument --seq: 'many' is not an integer"]),
    "demo_bad_device": (lambda tmp: ["demo", "--device", "gpu0"], ["--device 'gpu0' is not a device; expected cpu, cuda or cuda:N"]),
    "demo_cuda_without_gpu": (lambda tmp: ["demo", "--device", "cuda"], ["no CUDA GPU is available", "leave --device out"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    if case == "demo_cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("checks the message shown without a GPU")
    argv, parts = BAD[case]
    rc, out = _main(argv(tmp_path), capsys)
    assert rc == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sparsedrop {argv(tmp_path)[0]}"), out.err
    for part in parts:
        assert part in lines[0], lines[0]
    assert "Traceback" not in out.err and not out.out


def test_bad_input_through_python_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparsedrop_compile", "explain", "--model", "nonexistent"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sparsedrop explain: error: --model 'nonexistent' is neither a model family (t5, t5-gated, bert, gpt2, "
        "distilbert, roberta) nor an existing path; give a family, or a HF model directory or config.json"
    ]


@pytest.mark.parametrize("block", [0, (64, 0), (64,), "64"])
def test_sparse_dropout_attention_rejects_bad_block(block):
    from sparsedrop_compile.attention_ops import sparse_dropout_attention

    q = torch.randn(1, 1, 8, 64)
    with pytest.raises(ValueError, match=r"sparse_dropout_attention: block=.*expected a positive int or a \(query, key\) pair"):
        sparse_dropout_attention(q, q, q, p=0.1, block=block)


@pytest.mark.parametrize("family,attention_sites", [("bert", 2), ("t5", 6)])
def test_tiny_models_show_attention_rewritten_at_default_options(capsys, family, attention_sites):
    rc, out = _main(["explain", "--model", family], capsys)
    assert rc == 0
    rows = [line for line in out.out.splitlines() if "P @ V inside SDPA" in line]
    assert len(rows) == attention_sites and all(re.search(r"SDPA\s+yes", row) for row in rows), out.out


def test_demo_prints_progress_while_compiling(capsys):
    rc, out = _main(["demo", "--model", "bert", "--size", "tiny", "--steps", "2", "--batch", "2", "--seq", "16", "--block-size", "8"], capsys)
    assert rc == 0
    text = out.out
    assert text.index("sparsedrop: compiling (first step)...") < text.index("sparsedrop: first step (compile and run) took")
    assert re.search(r"took \d+\.\d s", text) and "losses:" in text


def _readme_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def test_readme_logging_lines_print_the_site_table():
    code = _readme_block('setLevel("DEBUG")') + textwrap.dedent("""
        import torch
        import torch.nn.functional as F
        w = torch.randn(16, 64)
        torch.compile(lambda x: F.linear(F.dropout(x, 0.1), w), backend="sparsedrop", options={"block_size": 8})(torch.randn(48, 64))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"graph\s+location\s+p\s+kind\s+producer\s+consumers\s+rewritten\s+reason", proc.stderr), proc.stderr[-3000:]
    assert re.search(r"linear\s+yes \(input\)", proc.stderr)


def test_readme_trainer_error_text_is_what_accelerate_raises():
    pytest.importorskip("accelerate")
    from accelerate.utils import TorchDynamoPlugin

    quoted = re.search(r"ValueError: (.*DynamoBackend)", README.read_text()).group(1)
    with pytest.raises(ValueError) as info:
        TorchDynamoPlugin(backend="sparsedrop")
    assert str(info.value) == quoted


def test_readme_trainer_workaround_trains(tmp_path):
    pytest.importorskip("accelerate")
    import transformers as tf
    from torch._dynamo.utils import counters

    from sparsedrop_compile.models import build_model, example_batch

    assert "model.compile(backend=\"sparsedrop\")" in _readme_block("Trainer(")
    torch.manual_seed(0)
    model = build_model("bert")
    batch = example_batch(model, batch=4, seq=32)
    data = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    model.compile(backend="sparsedrop", options={"block_size": 8, "inner": "aot_eager"})
    args = tf.TrainingArguments(output_dir=str(tmp_path), torch_compile=False, max_steps=2, per_device_train_batch_size=4,
                                report_to=[], use_cpu=True, save_strategy="no")
    result = tf.Trainer(model=model, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert counters["sparsedrop"]["linear_fused"] > 0
