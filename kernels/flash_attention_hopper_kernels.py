"""Tile-dropout attention forward for Hopper (sm_90), written in Gluon (Triton's explicit dialect).

Kernel only; the host side (when it serves, its launch) is in ``flash_attention_hopper.py``, the
oracle is ``flash_attention.reference_attention_forward`` and the portable kernels are in
``flash_attention_kernels.py``, whose conventions this kernel keeps: base-2 scores with the
softmax scale folded into the exponent's multiply-add, the normaliser summing every visible key
tile (dropout comes after the softmax), ``P̃ V`` only for kept tiles, O scaled by 1 / (1 - p),
the natural-log logsumexp stored per row (+inf for a row with no visible key).

One program owns BLOCK_M query rows of one (batch, head) and walks its key tiles:

- Q is copied once by TMA; K and V tiles by TMA into a ring of STAGES shared-memory stages, a
  stage's K and V completed on one mbarrier (each mbarrier operation costs the warps a CTA-wide
  barrier in Gluon 3.6's lowering, so there are as few as the pipeline needs).
- Both products are asynchronous warpgroup MMAs (wgmma) from shared memory; P̃ is the left
  operand of ``P̃ V`` straight from registers (the score accumulator's layout is the operand's).
- The products are issued as FlashAttention-3 pipelines them inside a warpgroup: for key tile j
  the program issues S_j = Q K_jᵀ, then O += P̃_{j-1} V_{j-1}, waits for S_j only, works out the
  softmax of S_j, then waits for that product and rescales O. A stage is refilled once both of
  its products are done. The overlap this aims at does not happen with the ptxas of Triton 3.6
  (CUDA 12.8, and 12.9's): the SASS waits for every product before the softmax's second
  instruction (NOTES_attention.md, session 15). What its 5-16 % gain over the portable forward at
  head dim 128 comes from was not profiled.
- Key tiles that need no mask (below the causal diagonal, inside Sk) skip the mask arithmetic;
  TMA fills rows past Sq or Sk with zeros, and the store through TMA clips them.

Keep flags: a key tile lies inside one mask tile column (BLOCK_N divides block_k). When BLOCK_M
divides block_q a query tile lies inside one mask tile row, its flag is one scalar and a dropped
tile's ``P̃ V`` is skipped (ROW_FLAGS False); when BLOCK_M spans several mask tile rows each row
takes its own flag and the product runs with P̃ zeroed in the dropped rows (ROW_FLAGS True).

Gluon kernels cannot run under Triton's interpreter, and Inductor cannot emit them in its own
code: the host calls this only on a Hopper GPU, outside traced code.
"""
import triton  # noqa: F401  (Gluon kernels are compiled by Triton's JIT)
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait

from .flash_attention_kernels import _query_tile  # a @triton.jit helper of scalars: Gluon inlines it too
from .gluon_hopper import mma_layout, staged, tma_load, tma_store

_LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bar, tile, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Issue the TMA copies of key tile ``tile``'s K and V into its stage, on the stage's barrier."""
    s = tile % STAGES
    bar = kv_bar.index(s)
    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma_load(k_desc, [tile * BLOCK_N, 0], bar, k_smem.index(s))
    tma_load(v_desc, [tile * BLOCK_N, 0], bar, v_smem.index(s))


@gluon.jit
def _kept(keep_rows, keep_tile, tile, BLOCK_N: gl.constexpr, block_k, stride_en, ROW_FLAGS: gl.constexpr):
    """Key tile ``tile``'s keep flags as fp32: one scalar for the query tile, or with ROW_FLAGS
    one per query row (a vector in the rows' layout)."""
    col = (tile * BLOCK_N // block_k) * stride_en
    if ROW_FLAGS:
        flags = gl.load(keep_rows + col)
    else:
        flags = gl.load(keep_tile + col)
    return (flags != 0).to(gl.float32)


@gluon.jit
def _softmax_step(s, m_i, l_i, tile, n_full, offs_m, Sk, qk_scale, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                  s_layout: gl.constexpr):
    """One key tile of the online softmax: (P, new row max, new normaliser, rescale factor)."""
    if tile >= n_full:  # the causal diagonal or keys past Sk
        offs_n = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        ok = gl.expand_dims(offs_n < Sk, 0)
        if CAUSAL:
            ok = ok & (gl.expand_dims(offs_m, 1) >= gl.expand_dims(offs_n, 0))
        s = gl.where(ok, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    # A row with no visible key so far has m = -inf: shift by 0 instead, so exp2 gives 0, not NaN.
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def _dropped_p(p, kept, dtype: gl.constexpr, p_layout: gl.constexpr, ROW_FLAGS: gl.constexpr):
    """P̃ as the left wgmma operand: P in the MMA dtype, zeroed in dropped rows (ROW_FLAGS)."""
    if ROW_FLAGS:
        p = p * gl.expand_dims(kept, 1)
    return gl.convert_layout(p.to(dtype), p_layout)


@gluon.jit
def _attn_fwd_wgmma_kernel(
    q_ptr, k_ptr, v_ptr, keep_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_eb, stride_eh, stride_em, stride_en,
    stride_ob, stride_oh, stride_om,
    H, GROUP, Sq, Sk, qk_scale, out_scale, block_q, block_k,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, ROW_FLAGS: gl.constexpr, num_warps: gl.constexpr,
):
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    qk_scale = qk_scale.to(gl.float32)
    out_scale = out_scale.to(gl.float32)
    pid_m, pid_bh, off_b, off_h, off_hk = _query_tile(H, GROUP, CAUSAL)
    start_m = pid_m * BLOCK_M

    # --- descriptors over this (batch, head)'s rows, built on the device
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_desc = tma.make_tensor_descriptor(q_ptr + off_b * stride_qb + off_h * stride_qh, [Sq, HEAD_DIM],
                                        [stride_qm, 1], [BLOCK_M, HEAD_DIM], q_layout)
    k_desc = tma.make_tensor_descriptor(k_ptr + off_b * stride_kb + off_hk * stride_kh, [Sk, HEAD_DIM],
                                        [stride_kn, 1], [BLOCK_N, HEAD_DIM], kv_layout)
    v_desc = tma.make_tensor_descriptor(v_ptr + off_b * stride_vb + off_hk * stride_vh, [Sk, HEAD_DIM],
                                        [stride_vn, 1], [BLOCK_N, HEAD_DIM], kv_layout)
    o_desc = tma.make_tensor_descriptor(out_ptr + off_b * stride_ob + off_h * stride_oh, [Sq, HEAD_DIM],
                                        [stride_om, 1], [BLOCK_M, HEAD_DIM], q_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout)  # Q, then O on its way out
    k_smem = gl.allocate_shared_memory(dtype, staged(STAGES, [BLOCK_N, HEAD_DIM]), kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, staged(STAGES, [BLOCK_N, HEAD_DIM]), kv_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_bar.index(i), count=1)
    fence_async_shared()

    # --- the key tiles this query tile sees: [0, n_full) need no mask, [n_full, n_tiles) do
    if CAUSAL:
        hi = gl.minimum(Sk, start_m + BLOCK_M)
        n_full = gl.minimum((start_m + 1) // BLOCK_N, Sk // BLOCK_N)
    else:
        hi = Sk
        n_full = Sk // BLOCK_N
    n_tiles = gl.cdiv(hi, BLOCK_N)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma_load(q_desc, [start_m, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        if i < n_tiles:
            _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bar, i, BLOCK_N, STAGES)

    s_layout: gl.constexpr = mma_layout(BLOCK_M, BLOCK_N, num_warps)
    o_layout: gl.constexpr = mma_layout(BLOCK_M, HEAD_DIM, num_warps)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    offs_m = start_m + gl.arange(0, BLOCK_M, layout=rows)
    keep_head = keep_ptr + off_b * stride_eb + off_h * stride_eh
    keep_rows = keep_head + (gl.minimum(offs_m, Sq - 1) // block_q) * stride_em
    keep_tile = keep_head + (start_m // block_q) * stride_em
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows)
    l_i = gl.zeros([BLOCK_M], gl.float32, rows)

    # --- key tile 0: its scores and softmax; its product P̃_0 V_0 is issued with tile 1's scores
    kept = _kept(keep_rows, keep_tile, 0, BLOCK_N, block_k, stride_en, ROW_FLAGS)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(kv_bar.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, 0, n_full, offs_m, Sk, qk_scale, BLOCK_N, CAUSAL, s_layout)
    p_prev = _dropped_p(p, kept, dtype, p_layout, ROW_FLAGS)
    kept_prev = kept

    for j in range(1, n_tiles):
        sj = j % STAGES
        sp = (j - 1) % STAGES
        kept = _kept(keep_rows, keep_tile, j, BLOCK_N, block_k, stride_en, ROW_FLAGS)  # read well before its use
        mbarrier.wait(kv_bar.index(sj), (j // STAGES) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(sj).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if ROW_FLAGS:
            acc_tok = warpgroup_mma(p_prev, v_smem.index(sp), acc, is_async=True)
            s, acc = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, acc_tok))
        elif kept_prev != 0:
            acc_tok = warpgroup_mma(p_prev, v_smem.index(sp), acc, is_async=True)
            s, acc = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, acc_tok))
        else:
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
        # the softmax of tile j runs while the tensor cores add P̃_{j-1} V_{j-1}
        p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, j, n_full, offs_m, Sk, qk_scale, BLOCK_N, CAUSAL, s_layout)
        acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_prev))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
        # stage sp's products are done: refill it with the tile STAGES ahead of j - 1
        if j - 1 + STAGES < n_tiles:
            _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bar, j - 1 + STAGES, BLOCK_N, STAGES)
        p_prev = _dropped_p(p, kept, dtype, p_layout, ROW_FLAGS)
        kept_prev = kept

    last = (n_tiles - 1) % STAGES
    if ROW_FLAGS:
        acc = warpgroup_mma(p_prev, v_smem.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    elif kept_prev != 0:
        acc = warpgroup_mma(p_prev, v_smem.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    # --- epilogue: rows with no visible key give O = 0 and lse = +inf (P = exp(S - lse) = 0 in
    # the backward); O goes out through Q's buffer and TMA, which clips the rows past Sq
    l_ok = l_i > 0.0
    l_safe = gl.where(l_ok, l_i, 1.0)
    out = acc * gl.expand_dims(gl.convert_layout(out_scale / l_safe, o_rows), 1)
    q_smem.store(out.to(dtype))
    fence_async_shared()
    tma_store(o_desc, [start_m, 0], q_smem)
    lse = gl.where(l_ok, (m_i + gl.log2(l_safe)) * _LN2, float("inf"))
    gl.store(lse_ptr + pid_bh.to(gl.int64) * Sq + offs_m, lse, mask=offs_m < Sq)
    tma.store_wait(pendings=0)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bar.index(i))

