"""The registered ops (opcheck, autocast, functional forms), the options, and the backend's front door."""
import dataclasses
import importlib.metadata

import pytest
import torch
import torch.nn.functional as F

import sparsedrop_compile as sd
from sparsedrop_compile.kernels.block_mask import apply_block_keep, sample_block_keep

OPS = torch.ops.sparsedrop


def _linear_args(dtype=torch.float64, bias=True, shape=(3, 37, 50)):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    w = torch.randn(20, shape[-1], dtype=dtype, requires_grad=True)
    b = torch.randn(20, dtype=dtype, requires_grad=True) if bias else None
    keep = sample_block_keep(x, 0.4, 16, 32, False)
    return x, w, b, keep


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_linear_family(bias):
    x, w, b, keep = _linear_args(bias=bias)
    args = (2.0, 16, 32, "reference")
    torch.library.opcheck(OPS.linear.default, (x, w, b, keep, *args))
    # The backward ops run inside backward: checked without grad (no double backward).
    grad = torch.randn(3, 37, 20, dtype=torch.float64)
    torch.library.opcheck(OPS.linear_grad_input.default, (grad, w.detach(), keep, *args))
    torch.library.opcheck(OPS.linear_grad_weight.default, (grad, x.detach(), keep, *args))


@pytest.mark.parametrize("a_shape,b_shape", [((2, 3, 21, 40), (2, 3, 40, 9)), ((3, 21, 40), (40, 9)), ((21, 40), (2, 40, 9)), ((2, 1, 21, 40), (1, 3, 40, 9))])
def test_opcheck_matmul_family_with_broadcasting(a_shape, b_shape):
    a = torch.randn(a_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(b_shape, dtype=torch.float64, requires_grad=True)
    keep = sample_block_keep(a, 0.4, 16, 16, True)
    args = (1.5, 16, 16, "reference")
    torch.library.opcheck(OPS.matmul.default, (a, b, keep, *args))
    grad = torch.randn(torch.broadcast_shapes(a_shape[:-2], b_shape[:-2]) + (a_shape[-2], b_shape[-1]), dtype=torch.float64)
    torch.library.opcheck(OPS.matmul_grad_a.default, (grad, a.detach(), b.detach(), keep, *args))
    torch.library.opcheck(OPS.matmul_grad_b.default, (grad, a.detach(), b.detach(), keep, *args))
    # And the values: block dropout then torch.matmul, gradients included.
    out = OPS.matmul(a, b, keep, *args)
    ref = torch.matmul(apply_block_keep(a, keep, 1.5, 16, 16, True), b)
    torch.testing.assert_close(out, ref)
    g_ours = torch.autograd.grad(out, (a, b), grad)
    g_ref = torch.autograd.grad(ref, (a, b), grad)
    for g, r in zip(g_ours, g_ref):
        torch.testing.assert_close(g, r)


def test_linear_op_saves_no_full_size_mask():
    x, w, b, keep = _linear_args(dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        OPS.linear(x, w, b, keep, 2.0, 16, 32, "reference")
    sizes = sorted(t.numel() for t in saved)
    assert sizes == sorted([x.numel(), w.numel(), keep.numel()]), sizes


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_gives_the_dtype_the_dense_op_would(amp_dtype):
    x, w, b, keep = (t.float().detach() if t is not None and t.is_floating_point() else t for t in _linear_args(dtype=torch.float32))
    with torch.autocast("cpu", dtype=amp_dtype):
        out = OPS.linear(x, w, b, keep, 2.0, 16, 32, "reference")
        dense = F.linear(x, w, b)
        a = torch.randn(2, 21, 40)
        mm = OPS.matmul(a, torch.randn(40, 8), sample_block_keep(a, 0.5, 16, 16, True), 2.0, 16, 16, "reference")
    assert out.dtype == dense.dtype == amp_dtype
    assert mm.dtype == amp_dtype


def test_functional_forms_match_block_dropout_then_dense():
    x, w, b, _ = _linear_args(dtype=torch.float32)
    torch.manual_seed(5)
    y = sd.sparse_dropout_linear(x, w, b, p=0.3, block_size=(16, 32))
    torch.manual_seed(5)
    keep = sample_block_keep(x, 0.3, 16, 32, False)
    torch.testing.assert_close(y, F.linear(apply_block_keep(x, keep, 1 / 0.7, 16, 32, False), w, b))
    torch.testing.assert_close(sd.sparse_dropout_linear(x, w, b, p=0.3, training=False), F.linear(x, w, b))
    a, v = torch.randn(2, 4, 33, 33), torch.randn(2, 4, 33, 16)
    torch.manual_seed(6)
    z = sd.sparse_dropout_matmul(a, v, p=0.5, block_size=16)
    torch.manual_seed(6)
    keep = sample_block_keep(a, 0.5, 16, 16, True)
    torch.testing.assert_close(z, torch.matmul(apply_block_keep(a, keep, 2.0, 16, 16, True), v))
    with pytest.raises(ValueError, match=r"p=1\.5.*\[0, 1\]"):
        sd.sparse_dropout_linear(x, w, p=1.5)


def test_bad_keep_and_dtypes_raise_clear_errors():
    x, w, b, keep = _linear_args(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"keep must be a bool tensor of shape \(1, 7, 2\)"):
        OPS.linear(x, w, b, keep[:, :4], 2.0, 16, 32, "reference")
    with pytest.raises(TypeError, match="share one dtype"):
        OPS.linear(x, w.double(), b, keep, 2.0, 16, 32, "reference")
    with pytest.raises(ValueError, match="kernel='bogus'"):
        OPS.linear(x, w, b, keep, 2.0, 16, 32, "bogus")


def test_config_validation_names_what_is_wrong():
    assert sd.SparseDropConfig.from_options({"block_size": 64}).block_size == (64, 64)
    assert sd.SparseDropConfig.from_options({"block_size": (128, 64), "exclude": "decoder.*"}).exclude == ("decoder.*",)
    with pytest.raises(ValueError, match=r"unknown sparsedrop option\(s\) 'blok_size'; valid options: block_size"):
        sd.SparseDropConfig.from_options({"blok_size": 64})
    with pytest.raises(ValueError, match=r"block_size=0: expected a positive int or a \(rows, cols\) pair"):
        sd.SparseDropConfig.from_options({"block_size": 0})
    with pytest.raises(ValueError, match=r"inner='cuda': expected one of 'inductor', 'aot_eager', 'eager'"):
        sd.SparseDropConfig.from_options({"inner": "cuda"})
    with pytest.raises(ValueError, match=r"min_p=2: expected a number in \[0, 1\]"):
        sd.SparseDropConfig.from_options({"min_p": 2})
    with pytest.raises(ValueError, match=r"kernel='cuda'"):
        sd.SparseDropConfig.from_options({"kernel": "cuda"})
    with pytest.raises(TypeError, match="expected a dict"):
        sd.SparseDropConfig.from_options(["block_size"])


def test_backend_is_registered_by_entry_point_and_import():
    names = [ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")]
    assert "sparsedrop" in names
    assert "sparsedrop" in torch._dynamo.list_backends()


def test_bad_option_fails_the_compile_with_the_message():
    f = torch.compile(lambda x: F.dropout(x, 0.1, True) @ x.t(), backend="sparsedrop", options={"blok": 1})
    with pytest.raises(Exception, match="unknown sparsedrop option"):
        f(torch.randn(4, 4))


def test_cli_explain_prints_the_site_table(capsys):
    from sparsedrop_compile.cli import main

    assert main(["explain", "--model", "distilbert", "--attn", "eager"]) == 0
    out = capsys.readouterr().out
    assert "rewritten" in out and "q_lin" in out


def test_cli_explain_reads_a_local_config(tmp_path, capsys):
    import transformers as tf

    from sparsedrop_compile.cli import main

    tf.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1).save_pretrained(tmp_path)
    assert main(["explain", "--model", str(tmp_path), "--attn", "eager"]) == 0
    assert "query" in capsys.readouterr().out
    assert main(["explain", "--model", str(tmp_path / "missing")]) == 2
    assert "is neither a model family" in capsys.readouterr().err


def test_inductor_mode_comes_from_options_or_the_mode_keyword(monkeypatch):
    import sparsedrop_compile.backend as backend

    seen = []
    monkeypatch.setattr(backend, "_inner_compile", lambda gm, ex, config: seen.append(config.mode) or gm.forward)
    x = torch.randn(4, 4)
    torch.compile(lambda x: x + 1, backend="sparsedrop", mode="reduce-overhead")(x)
    torch._dynamo.reset()
    torch.compile(lambda x: x + 2, backend="sparsedrop", options={"mode": "max-autotune"})(x)
    assert seen == ["reduce-overhead", "max-autotune"]
    with pytest.raises(ValueError, match="mode='fast'"):
        sd.SparseDropConfig.from_options({"mode": "fast"})


_STATIC_LAUNCH_SCRIPT = r"""
import os
import torch._inductor.compile_fx as cfx
import sparsedrop_compile.backend as backend
seen = []
cfx.compile_fx = lambda gm, ex, config_patches=None: seen.append(config_patches) or gm.forward
import torch
torch.compile(lambda x: x + 1, backend="sparsedrop")(torch.randn(4))
torch._dynamo.reset()
torch.compile(lambda x: x + 2, backend="sparsedrop", options={"inductor_options": {"static_launch_user_defined_triton_kernels": False}})(torch.randn(4))
print(os.environ.get(backend.STATIC_LAUNCH_ENV), [(p or {}).get("static_launch_user_defined_triton_kernels") for p in seen])
"""


@pytest.mark.parametrize("user_env", [None, "0"])
def test_inductor_launches_our_kernels_statically_unless_the_user_says_not(user_env):
    """Importing the package turns on Inductor's static launch of user-defined Triton kernels for
    the compile workers (they read only the environment) unless the user set the variable, and
    the backend patches the same setting for compiles in this process; inductor_options win."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS"}
    if user_env is not None:
        env["TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS"] = user_env
    out = subprocess.run([sys.executable, "-c", _STATIC_LAUNCH_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    expected = "1 [True, False]" if user_env is None else "0 [None, False]"
    assert out.stdout.strip().splitlines()[-1] == expected, out.stdout


def test_kernel_configs_are_timed_only_when_autotuning_is_asked_for(monkeypatch):
    """Default: the first candidate that runs (one compile per kernel); timed with
    mode="max-autotune", autotune=True or SPARSEDROP_AUTOTUNE=1, and the backend sets the policy
    for exactly the inner compile, where the kernels' configs are picked."""
    import sparsedrop_compile.backend as backend
    from sparsedrop_compile.kernels import runtime

    monkeypatch.delenv("SPARSEDROP_AUTOTUNE", raising=False)
    assert sd.SparseDropConfig().autotune_kernels() is None
    assert sd.SparseDropConfig(mode="max-autotune-no-cudagraphs").autotune_kernels() is True
    assert sd.SparseDropConfig(mode="max-autotune", autotune=False).autotune_kernels() is False
    assert sd.SparseDropConfig(mode="reduce-overhead").autotune_kernels() is None
    with pytest.raises(ValueError, match="autotune='yes'"):
        sd.SparseDropConfig(autotune="yes")

    assert not runtime.autotune_enabled()
    monkeypatch.setenv("SPARSEDROP_AUTOTUNE", "1")
    assert runtime.autotune_enabled()
    with runtime.autotuning(False):
        assert not runtime.autotune_enabled()
    monkeypatch.delenv("SPARSEDROP_AUTOTUNE")

    # The tuner (as on a GPU: not interpreting, timing stubbed by a fixed cost per config).
    monkeypatch.setattr(runtime, "INTERPRET", False)
    cost = {"a": 3.0, "b": 1.0, "c": 2.0}
    monkeypatch.setattr(runtime.triton.testing, "do_bench", lambda fn, **kw: cost[fn()])
    cands = [runtime.KernelConfig(16, 16, 16, stages=s) for s in (1, 2, 3)]
    names = dict(zip(cands, "abc"))
    ran = []

    def run(cfg):
        ran.append(names[cfg])
        if names[cfg] == "a" and not runtime.autotune_enabled():
            raise RuntimeError("does not fit")  # the first candidate fails to launch
        return names[cfg]

    tuner = runtime.Tuner()
    assert names[tuner.pick("k", cands, run)] == "b" and ran == ["a", "b"]  # first that runs, untimed
    assert names[tuner.pick("k", cands, run)] == "b" and ran == ["a", "b"]  # cached
    with runtime.autotuning(True):
        assert tuner.cached("k") is None
        assert names[tuner.pick("k", cands, run)] == "b"  # the fastest
        assert [r for r, _ in tuner.timings["k"]] == cands and names[tuner.cached("k")] == "b"

    seen = []
    monkeypatch.setattr(backend, "_inner_compile", lambda gm, ex, config: seen.append(runtime.autotune_enabled()) or gm.forward)
    x = torch.randn(4, 4)
    torch.compile(lambda x: x + 1, backend="sparsedrop", mode="max-autotune")(x)
    torch._dynamo.reset()
    torch.compile(lambda x: x + 2, backend="sparsedrop")(x)
    torch._dynamo.reset()
    torch.compile(lambda x: x + 3, backend="sparsedrop", options={"autotune": True})(x)
    assert seen == [True, False, True]
    assert not runtime.autotune_enabled()


@pytest.mark.parametrize("dynamic", [False, True])
def test_traced_launches_pick_a_config_without_running_one(monkeypatch, dynamic):
    """While a graph is traced and configs are not timed (or sizes are symbolic, which stand-ins
    cannot reproduce), a launcher takes the first candidate that fits the device's shared memory
    and compiles nothing: the compiled graph compiles what it launches."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from sparsedrop_compile.kernels import block_sparse_matmul_triton as bsm
    from sparsedrop_compile.kernels import runtime

    def run(cfg, *operands):
        raise AssertionError("a config was launched while tracing")

    real_a = torch.randn(1, 64, 48)
    with FakeTensorMode(shape_env=ShapeEnv() if dynamic else None) as mode:
        dims = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 3) if dynamic else None
        a = mode.from_tensor(real_a, symbolic_context=dims)
        b = torch.empty(1, 48, 32)
        keep = torch.empty(1, 2, 2, dtype=torch.bool)
        assert runtime.has_symbolic_sizes([a]) == dynamic
        M, K, N = a.shape[1], a.shape[2], 32
        key = ("test_dsd", dynamic)
        cfg = bsm._choose("dsd", key, M, N, K, (32, 32), a.dtype, False, None, run, (a, b, keep, None, None, None))
    # a candidate, in the launch-bound walk schedule this small problem gets
    assert dataclasses.replace(cfg, walk=False) in bsm.candidate_configs("dsd", 64, 32, 48, (32, 32), torch.float32)
    assert cfg.walk
    # the key records that this size is launch-bound (and that no TMA variant went first)
    assert bsm._TUNER.cached((*key, True, False)) == cfg

    # The fit: two operand tiles per stage (+ the TMA epilogue's output tile) against the SM's
    # shared memory, here a GPU of 64 KiB.
    monkeypatch.setattr(runtime, "sm_resources", lambda device: (100, 64 * 1024, 65536))
    cuda = torch.device("cuda", 0)
    big, small = runtime.KernelConfig(128, 128, 64, stages=4), runtime.KernelConfig(64, 64, 64, stages=3)
    assert bsm._shared_estimate("dsd", big, 2) == 4 * (128 * 64 + 64 * 128) * 2
    assert not bsm._fits_shared_memory("dsd", big, 2, cuda) and bsm._fits_shared_memory("dsd", small, 2, cuda)
    tuner = runtime.Tuner()
    fits = lambda c: bsm._fits_shared_memory("dsd", c, 2, cuda)  # noqa: E731
    assert tuner.first_that_fits("k", [big, small], fits) == small and tuner.cached("k") == small
    with pytest.raises(RuntimeError, match="fits this device's shared memory"):
        tuner.first_that_fits("k2", [big], fits)


def test_launch_bound_kernels_take_configs_that_launch_cheaply(monkeypatch):
    """A matmul too small to hide its launch (runtime.launch_bound) takes no TMA (device-side
    descriptors need scratch memory that Triton allocates on every launch, and Inductor's static
    launcher refuses them), sdd no persistent schedule and dsd / dsd_tn the walk over every block
    (no kept-block lists, each one more launch); large ones, or any size under CUDA graphs
    (replays launch nothing), take lists, and TMA where ``prefer_tma`` says so. An explicit TMA
    config is still taken at any size; an explicit walk config must be a pointer-load dsd or
    dsd_tn one."""
    import torch._inductor.config as inductor_config
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sparsedrop_compile.kernels import block_sparse_matmul_configs as configs
    from sparsedrop_compile.kernels import block_sparse_matmul_triton as bsm
    from sparsedrop_compile.kernels import runtime

    small, large = (2048, 768, 768), (4096, 4096, 1024)
    assert runtime.launch_bound(*small) and not runtime.launch_bound(*large)
    with inductor_config.patch({"triton.cudagraphs": True}):
        assert not runtime.launch_bound(*small)

    monkeypatch.setattr(runtime, "sm_resources", lambda device: (132, 227 * 1024, 65536))  # an H100's
    monkeypatch.setattr(configs, "interpreting", lambda: False)  # the GPU's candidate lists

    def run(cfg, *operands):
        raise AssertionError("nothing is launched: the operands are traced")

    for (M, N, K), light in ((small, True), (large, False)):
        with FakeTensorMode():  # as torch.compile traces a launch on a GPU (no GPU needed here)
            a = torch.empty(1, M, K, dtype=torch.bfloat16, device="cuda")
        for kind in ("dsd", "sdd", "dsd_tn"):
            cfg = bsm._choose(kind, ("test_launch_bound", kind, M, N, K), M, N, K, (128, 128), torch.bfloat16, True, None,
                              run, (a,))
            assert cfg.tma == (not light and configs.prefer_tma(kind, N, K, (a,))), (kind, M, N, K, cfg)
            assert cfg.walk == (light and kind != "sdd"), (kind, M, N, K, cfg)
            if kind == "sdd" or light:
                assert cfg.balance == (not light), (kind, M, N, K, cfg)
        with inductor_config.patch({"triton.cudagraphs": True}):  # no launch costs: dsd's TMA variant first
            cfg = bsm._choose("dsd", ("test_launch_bound_graphs", M, N, K), M, N, K, (128, 128), torch.bfloat16, True,
                              None, run, (a,))
        assert cfg.tma and not cfg.walk, (M, N, K, cfg)
    explicit = bsm.candidate_configs("dsd", *small, (128, 128), torch.bfloat16, tma=True)[0]
    assert explicit.tma
    assert bsm._choose("dsd", ("test_tma_explicit",), *small, (128, 128), torch.bfloat16, True, explicit, run, ()) == explicit
    for kind, bad in (("sdd", dict(walk=True)), ("dsd", dict(walk=True, tma=True)), ("dsd_tn", dict(walk=True, balance=True))):
        cfg = dataclasses.replace(bsm.candidate_configs(kind, *small, (128, 128), torch.bfloat16)[0], **bad)
        with pytest.raises(ValueError, match="walk is a dsd / dsd_tn schedule"):
            bsm._choose(kind, ("test_walk_explicit", kind), *small, (128, 128), torch.bfloat16, True, cfg, run, ())


def test_tma_goes_first_only_where_measured_faster(monkeypatch):
    """``prefer_tma`` (session 24's per-kernel times on an H200): pointer loads first for sdd and
    dsd_tn, TMA first for dsd unless torch compiles the launch for Inductor's static launcher
    outside CUDA graphs (a TMA kernel goes through Triton's Python launcher instead); TMA first
    for every kernel where a size or stride is not a multiple of 16 elements (pointer tiles load
    an element at a time there). The list keeps the other kind's two best tilings for the tuner."""
    import torch._inductor.config as inductor_config
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sparsedrop_compile.kernels import block_sparse_matmul_configs as configs
    from sparsedrop_compile.kernels import traced_descriptors

    monkeypatch.setattr(configs, "interpreting", lambda: False)  # the GPU's candidate lists
    eager = torch.empty(1, 4096, 1024, dtype=torch.bfloat16)
    odd_stride = torch.empty(1, 4096, 1032, dtype=torch.bfloat16)[..., :1024]
    with FakeTensorMode():
        traced = torch.empty(1, 4096, 1024, dtype=torch.bfloat16, device="cuda")
    for kind in ("dsd", "sdd", "dsd_tn"):
        assert configs.prefer_tma(kind, 4096, 1024, (eager,)) == (kind == "dsd"), kind
        assert configs.prefer_tma(kind, 2000, 3000, (eager,)), kind  # K = 3000: not a multiple of 16
        assert configs.prefer_tma(kind, 4096, 1024, (odd_stride,)), kind  # row stride 1032
        monkeypatch.setattr(traced_descriptors, "static_launch", lambda: True)
        assert not configs.prefer_tma(kind, 4096, 1024, (traced,)), kind
        with inductor_config.patch({"triton.cudagraphs": True}):
            assert configs.prefer_tma(kind, 4096, 1024, (traced,)) == (kind == "dsd"), kind
        monkeypatch.setattr(traced_descriptors, "static_launch", lambda: False)
        assert configs.prefer_tma(kind, 4096, 1024, (traced,)) == (kind == "dsd"), kind

        for first in (True, False):
            cands = configs.candidate_configs(kind, 4096, 4096, 1024, (128, 128), torch.bfloat16, tma=True,
                                              tma_first=first)
            assert cands[0].tma == first and cands[0].balance, (kind, first, cands)
            others = [c for c in cands if c.tma != first]
            assert len(others) == 2 and not any(c.balance for c in others), (kind, first, cands)
            assert {dataclasses.replace(c, tma=first) for c in others} <= set(cands), (kind, first, cands)
