"""A/B of the attention kernels' TMA loads (K and V through TMA descriptors in the forward and the
dQ pass, Hopper, eager calls) at head dims the sweeps do not cover: forward + backward and the
forward alone, each by CUDA-graph replay, with the loads on (the default) and off
(``_tma_loads`` answering False; the single pass's TMA dQ reductions are left as they are).

    python benchmarks/attention_tma_loads.py      # needs a Hopper GPU

Session 17's run: ``results/raw/session17/call6_head_dims_tma_loads.log``.
"""
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as ba  # noqa: E402  (the inputs and timers of the attention benchmark)

from sparsedrop_compile.attention_ops import sparse_dropout_attention  # noqa: E402
from sparsedrop_compile.kernels import flash_attention_triton as fat  # noqa: E402

SHAPES = [(8, 16, 1024, 32, False), (4, 16, 2048, 80, True), (8, 16, 1024, 96, False), (4, 16, 2048, 96, True),
          (4, 16, 2048, 256, True), (8, 8, 1024, 256, False), (2, 16, 4096, 128, True)]


def main():
    if not torch.cuda.is_available():
        sys.exit("attention_tma_loads.py needs a CUDA GPU (Hopper for the TMA loads)")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    real = fat._tma_loads
    for b, h, s, d, causal in SHAPES:
        q, k, v, grad, _ = ba.make_inputs(b, h, s, d, None)
        times = {}
        for name, rule in (("tma", real), ("ptr", lambda pb, tensors: False)):
            fat._tma_loads = rule
            try:
                def attention():
                    return sparse_dropout_attention(q, k, v, None, p=0.1, is_causal=causal)
                times[name] = (ba.time_graph(ba.fwd_bwd(attention, q, k, v, grad), 30),
                               ba.time_graph(ba.fwd_only(attention), 30))
            finally:
                fat._tma_loads = real
        (on_both, on_fwd), (off_both, off_fwd) = times["tma"], times["ptr"]
        shape = f"{b}x{h}x{s}x{d}{'-causal' if causal else ''}"
        print(f"{shape}: fwd+bwd tma {on_both:.4f} / ptr {off_both:.4f} ms ({on_both / off_both:.3f}); "
              f"fwd tma {on_fwd:.4f} / ptr {off_fwd:.4f} ms ({on_fwd / off_fwd:.3f})", flush=True)


if __name__ == "__main__":
    main()
