"""Session 29: one forward + backward of tile-dropout attention (p = 0.1) and of SDPA without
dropout at 4x16x2048x128 causal, bf16, for ncu (profiled between cudaProfilerStart/Stop, after
three warm-up steps of each, so only those two steps' kernels are captured)."""
import sys
import torch
import torch.nn.functional as F
from sparsedrop_compile.attention_ops import sparse_dropout_attention

B, H, S, D = (int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "4x16x2048x128").split("x"))
torch.manual_seed(0)
q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
do = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)


def ours():
    sparse_dropout_attention(q, k, v, p=0.1, is_causal=True).backward(do)


def sdpa():
    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)


for _ in range(3):
    ours()
    sdpa()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
ours()
sdpa()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
print("done", torch.cuda.get_device_name(), torch.__version__, flush=True)
