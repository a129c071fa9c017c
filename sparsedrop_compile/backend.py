"""The ``sparsedrop`` torch.compile backend: run the rewrite passes, then hand the graph on."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from sparsedrop_compile import distributed, report
from sparsedrop_compile.config import SparseDropConfig
from sparsedrop_compile.kernels.traced_descriptors import STATIC_LAUNCH_ENV

log = logging.getLogger("sparsedrop_compile")


def run_passes(gm: fx.GraphModule, config: SparseDropConfig, example_inputs: Sequence[Any] = ()) -> list:
    """Apply every pass to a Dynamo graph in place and return the sites they looked at."""
    import sparsedrop_compile.mask_ops  # registers the ops the passes emit
    import sparsedrop_compile.ops  # noqa: F401
    import sparsedrop_compile.output_ops  # noqa: F401
    from sparsedrop_compile.passes._names import compiled_root, naming
    from sparsedrop_compile.passes.dropout_matmul import rewrite_dropout_matmul
    from sparsedrop_compile.passes.dropout_mha import rewrite_dropout_mha
    from sparsedrop_compile.passes.dropout_sdpa import rewrite_dropout_sdpa
    from sparsedrop_compile.passes.keep_sampling import draw_keeps_together
    from sparsedrop_compile.passes.matmul_dropout import rewrite_matmul_dropout
    from sparsedrop_compile.passes.regions import rewrite_regions

    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    index = report.next_graph_index()
    root = compiled_root()

    def rewrite(g: fx.GraphModule, cfg: SparseDropConfig) -> list:
        sites = rewrite_dropout_matmul(g, cfg, index, fake_mode)
        if g is gm:  # the input side's reason, then why its matmul may be in another graph
            _explain_graph_outputs(gm, sites, root)
        # The output side completes the input side's rows (a dropout is one row, fused on either
        # side or refused with both reasons) and fuses the matmuls it already made input-sparse.
        sites = rewrite_matmul_dropout(g, cfg, index, fake_mode, sites)
        sites += [site for rewrite_pass in (rewrite_dropout_sdpa, rewrite_dropout_mha) for site in rewrite_pass(g, cfg, index, fake_mode)]
        merged, draws = draw_keeps_together(g, fake_mode)  # one launch per p for the graph's keep flags
        report.record_shared_draws(merged, draws)
        return sites

    # The graph and every higher-order-op body in it (checkpointed regions), in program order;
    # sites named as in the compiled model's named_modules().
    with naming(root):
        sites = [site for _, site in sorted(rewrite_regions(gm, config, rewrite), key=lambda pair: pair[0])]
    distributed.mark_rewritten(gm, index)  # DDPOptimizer's pieces of this graph are not rewritten again
    if sites and log.isEnabledFor(logging.DEBUG):
        log.debug("sparsedrop: graph %d\n%s", index, report.format_sites(sites))
    report.record(sites)
    return sites


def _explain_graph_outputs(gm: fx.GraphModule, sites: list, root) -> None:
    """A dropout whose output leaves the graph may have its matmul in another graph (a graph
    break, an FSDP2 unit boundary, a DDPOptimizer piece): say which, instead of only "no matmul".
    ``sites`` are the input side's rows of gm itself (not of a body); the output side adds its
    reason after this."""
    units = None
    for site in sites:
        if site.rewritten or "graph output" not in site.consumers:
            continue
        if not (site.reason or "").startswith("no matmul consumer"):
            continue
        if units is None:
            units = distributed.fsdp_units(root)
        site.reason = f"{site.reason}; {distributed.split_reason(gm, site.module_path, units)}"


def sparsedrop(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
    """torch.compile backend. ``torch.compile(m, backend="sparsedrop", options={...})``.

    ``options`` fills :class:`SparseDropConfig`. Inductor's ``mode`` (e.g. "reduce-overhead")
    comes from ``torch.compile(mode=...)`` when no options are given, else from options["mode"]
    (torch.compile refuses both keywords together).
    """
    options = kwargs.pop("options", None)
    mode = kwargs.pop("mode", None)
    if kwargs:
        raise TypeError(f"sparsedrop backend got unexpected arguments {sorted(kwargs)}; pass settings as options={{...}}")
    config = SparseDropConfig.from_options(options)
    if mode is not None and config.mode is None:
        config = config.replace(mode=mode)
    if distributed.piece_of(gm) is None:  # else DDPOptimizer's piece of a graph rewritten whole
        with torch._dynamo.utils.dynamo_timed("sparsedrop.run_passes"):  # in torch's compile-time counters
            run_passes(gm, config, example_inputs)
    if distributed.whole_graph_pass():  # the DDP hook: rewrite before the split, compile the pieces later
        return gm.forward
    from sparsedrop_compile.kernels.runtime import autotuning

    # Kernel configs are picked while the graph is traced, i.e. inside the inner compile.
    with autotuning(config.autotune_kernels()):
        return _inner_compile(gm, example_inputs, config)


sparsedrop._sparsedrop_backend = True  # the DDP hook looks for this (distributed.is_sparsedrop_backend)


def _inner_compile(gm: fx.GraphModule, example_inputs, config: SparseDropConfig):
    if config.inner == "eager":
        return gm.forward
    if config.inner == "aot_eager":
        return _aot_eager(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = _inductor_defaults()
    patches.update(list_mode_options(config.mode) if config.mode else {})
    patches.update(config.inductor_options)
    return compile_fx(gm, example_inputs, config_patches=patches or None)


# Inductor launches the Triton kernels it generates through its static launcher (C++), but
# user-defined ones, which our ops trace into the graph, through Triton's Python launcher unless
# this switch is on: on an H200 that was 20-35 us of host time per rewritten site, forward and
# backward (benchmarks/results/host_overhead_*). Kernels the static launcher cannot take (global
# scratch: TMA descriptors built on the device) fall back to Triton's launcher by themselves.
# Inductor decides this in its compile workers, which read only the environment when they start,
# so the switch is set here, when the package is imported (before the first compile starts the
# workers), unless the user has set it; the backend also patches the config for compiles that
# run in this process. It reaches every user-defined kernel Inductor compiles in this process;
# TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=0 in the environment opts out.
# Attention's K and V loads by TMA need Triton's launcher: with this switch on, compiled attention
# keeps pointer loads (kernels/traced_descriptors.py).
os.environ.setdefault(STATIC_LAUNCH_ENV, "1")


def _inductor_defaults() -> dict:
    """Inductor settings the backend changes unless ``inductor_options`` says otherwise."""
    from torch._inductor import config as inductor_config

    defaults = {}
    if hasattr(inductor_config, "static_launch_user_defined_triton_kernels") and os.environ.get(STATIC_LAUNCH_ENV) == "1":
        defaults["static_launch_user_defined_triton_kernels"] = True
    return defaults


def _aot_eager(gm: fx.GraphModule, example_inputs):
    """torch's aot_eager, except that each forward and backward graph sets Triton's scratch
    allocator before it runs. Traced-into kernels that build TMA descriptors on the device need
    one, Triton keeps it per thread, and the autograd engine runs backward on a thread of its
    own; Inductor's generated code sets it before each launch, aot_eager's replay does not."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    from sparsedrop_compile.kernels.runtime import set_scratch_allocator

    def compiler(fx_g, inputs):
        compiled = boxed_nop(fx_g, inputs)

        def run(args):
            set_scratch_allocator()
            return compiled(args)

        run._boxed_call = True
        return run

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler, partition_fn=min_cut_rematerialization_partition,
                        keep_inference_input_mutations=True)(gm, example_inputs)
