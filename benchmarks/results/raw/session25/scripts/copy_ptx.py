import re, collections, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sparsedrop_compile.kernels.block_sparse_matmul_kernels import _copy_rows_kernel
for align in (1, 8):
    sig = {"src_ptr": "*bf16", "dst_ptr": "*bf16", "cols": "i32", "stride_src": "i32", "stride_dst": "i32", "ALIGN": "constexpr", "BLOCK": "constexpr"}
    attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (4,): [["tt.divisibility", 16]]}
    src = ASTSource(_copy_rows_kernel, sig, constexprs={"ALIGN": align, "BLOCK": 1024}, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = ck.asm["ptx"]
    print(align, dict(collections.Counter(re.findall(r"((?:ld|st)\.global[\w.]*)", ptx)).most_common(6)))
