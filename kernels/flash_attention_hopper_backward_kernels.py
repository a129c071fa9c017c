"""Tile-dropout attention backward for Hopper (sm_90), written in Gluon: the dK/dV pass.

Kernel only; the host side (when it serves, its launch) is in ``flash_attention_hopper.py``, the
oracle is ``flash_attention.reference_attention_backward`` and the portable dK/dV pass it stands
in for is ``_attn_bwd_dkdv`` in ``flash_attention_backward_kernels.py``, whose conventions it
keeps: the transposed (keys x queries) frame, base-2 scores with the softmax scale folded into
the exponent's multiply-add, Δ read as the dQ pass stored it (divided by the dropout scale), dK
and dV scaled once at the end, one program a key tile of one kv head summed over its GQA group.
It serves the problems the Gluon forward does: no attention mask, dropout after the softmax.

One program owns BLOCK_N keys (a warpgroup a 64 of them) and walks the query tiles that see them:

- K and V are copied once by TMA and stay in shared memory as the left operand of Sᵀ = K Qᵀ and
  dP̃ᵀ = V dOᵀ; Q and dO tiles come by TMA into a ring of STAGES stages, a stage's two tiles on
  one mbarrier.
- The four products are asynchronous warpgroup MMAs (wgmma); Pᵀ and dSᵀ are the left operands of
  dV += P̃ᵀ dO and dK += dSᵀ Q straight from registers. For a kept tile the program issues Sᵀ and
  dP̃ᵀ together, waits for Sᵀ only, works out Pᵀ while dP̃ᵀ runs, issues dV's product, then waits
  for dP̃ᵀ and works out dSᵀ while dV's product runs.
- A dropped tile (its keep flag 0) has dP = 0, so the program skips dP̃ᵀ and dV's product and
  still adds dSᵀ = -Pᵀ Δ into dK.
- Query rows past Sq come as TMA's zero fill and get lse = +inf, so their P is exactly 0; keys
  past Sk are zero rows whose dK, dV rows the TMA store clips. Under the causal mask the query
  tiles that straddle the diagonal take the mask, the tiles below it none.

Keep flags: the key tile lies inside one mask tile column (BLOCK_N divides block_k) and a query
tile inside one mask tile row (BLOCK_M divides block_q), so each step reads one flag.

Gluon kernels cannot run under Triton's interpreter, and Inductor cannot emit them in its own
code: the host calls this only on a Hopper GPU, outside traced code.
"""
import triton  # noqa: F401  (Gluon kernels are compiled by Triton's JIT)
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait

from .gluon_hopper import cta_barrier, mma_layout, staged, tma_load, tma_store

_LOG2E = gl.constexpr(1.4426950408889634)


@gluon.jit
def _load_rows(q_desc, do_desc, q_smem, do_smem, bars, step, row, STAGES: gl.constexpr):
    """Issue the TMA copies of the Q and dO rows from ``row`` into step ``step``'s stage."""
    s = step % STAGES
    bar = bars.index(s)
    mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma_load(q_desc, [row, 0], bar, q_smem.index(s))
    tma_load(do_desc, [row, 0], bar, do_smem.index(s))


@gluon.jit
def _probs_t(st, lse2, offs_n, offs_m, qk_scale, masked, CAUSAL: gl.constexpr):
    """Pᵀ of one step from its scores Sᵀ; ``masked`` (a step across the causal diagonal) zeroes
    the keys a query does not see."""
    pt = gl.exp2(st * qk_scale - gl.expand_dims(lse2, 0))
    if CAUSAL:
        if masked:
            pt = gl.where(gl.expand_dims(offs_m, 0) >= gl.expand_dims(offs_n, 1), pt, 0.0)
    return pt


@gluon.jit
def _attn_bwd_dkdv_wgmma_kernel(
    q_ptr, k_ptr, v_ptr, keep_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_eb, stride_eh, stride_em, stride_en,
    stride_gb, stride_gh, stride_gm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, H_KV, GROUP, Sq, Sk, qk_scale, dk_scale, dv_scale, block_q, block_k,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, num_warps: gl.constexpr,
):
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    qk_scale = qk_scale.to(gl.float32)
    dk_scale = dk_scale.to(gl.float32)
    dv_scale = dv_scale.to(gl.float32)
    pid_n = gl.program_id(0)
    pid_bh = gl.program_id(1)
    off_b = (pid_bh // H_KV).to(gl.int64)
    off_hk = (pid_bh % H_KV).to(gl.int64)
    start_n = pid_n * BLOCK_N

    # --- K, V (and dK, dV on their way out) of this key tile; Q and dO rows per head below
    rows_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    keys_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    k_desc = tma.make_tensor_descriptor(k_ptr + off_b * stride_kb + off_hk * stride_kh, [Sk, HEAD_DIM],
                                        [stride_kn, 1], [BLOCK_N, HEAD_DIM], keys_layout)
    v_desc = tma.make_tensor_descriptor(v_ptr + off_b * stride_vb + off_hk * stride_vh, [Sk, HEAD_DIM],
                                        [stride_vn, 1], [BLOCK_N, HEAD_DIM], keys_layout)
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], keys_layout)  # K, then dK
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], keys_layout)  # V, then dV
    q_smem = gl.allocate_shared_memory(dtype, staged(STAGES, [BLOCK_M, HEAD_DIM]), rows_layout)
    do_smem = gl.allocate_shared_memory(dtype, staged(STAGES, [BLOCK_M, HEAD_DIM]), rows_layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma_load(k_desc, [start_n, 0], kv_bar, k_smem)
    tma_load(v_desc, [start_n, 0], kv_bar, v_smem)

    # --- the query tiles that see this key tile: [t_lo, t_hi), the first n_masked of them across
    # the causal diagonal (a query before some key of the tile)
    t_hi = gl.cdiv(Sq, BLOCK_M)
    if CAUSAL:
        t_lo = gl.minimum(start_n // BLOCK_M, t_hi)
        n_masked = (start_n + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M - t_lo
    else:
        t_lo = 0
        n_masked = 0
    n_q = t_hi - t_lo

    s_layout: gl.constexpr = mma_layout(BLOCK_N, BLOCK_M, num_warps)
    kv_acc_layout: gl.constexpr = mma_layout(BLOCK_N, HEAD_DIM, num_warps)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_acc_layout, k_width=2)
    q_cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_acc_layout)
    keep_n = (start_n // block_k) * stride_en
    mbarrier.wait(kv_bar, 0)

    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        bh = off_b * H + off_h
        q_desc = tma.make_tensor_descriptor(q_ptr + off_b * stride_qb + off_h * stride_qh, [Sq, HEAD_DIM],
                                            [stride_qm, 1], [BLOCK_M, HEAD_DIM], rows_layout)
        do_desc = tma.make_tensor_descriptor(do_ptr + off_b * stride_gb + off_h * stride_gh, [Sq, HEAD_DIM],
                                             [stride_gm, 1], [BLOCK_M, HEAD_DIM], rows_layout)
        base = g * n_q  # steps before this head's: they set the stages' mbarrier phases
        for i in gl.static_range(STAGES):
            if i < n_q:
                _load_rows(q_desc, do_desc, q_smem, do_smem, bars, base + i, (t_lo + i) * BLOCK_M, STAGES)
        keep_col = keep_ptr + off_b * stride_eb + off_h * stride_eh + keep_n
        lse_row = lse_ptr + bh * Sq
        delta_row = delta_ptr + bh * Sq
        for j in range(n_q):
            step = base + j
            start_m = (t_lo + j) * BLOCK_M
            offs_m = start_m + gl.arange(0, BLOCK_M, layout=q_cols)
            row_ok = offs_m < Sq
            # flag, lse and Δ are read before the wait for the step's tiles
            kept = gl.load(keep_col + (start_m // block_q) * stride_em)
            lse2 = gl.load(lse_row + offs_m, mask=row_ok, other=float("inf")) * _LOG2E
            delta = gl.load(delta_row + offs_m, mask=row_ok, other=0.0)
            masked = j < n_masked
            mbarrier.wait(bars.index(step % STAGES), (step // STAGES) & 1)
            q_s = q_smem.index(step % STAGES)
            do_s = do_smem.index(step % STAGES)
            st_tok = warpgroup_mma(k_smem, q_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            if kept != 0:
                dpt_tok = warpgroup_mma(v_smem, do_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                st = warpgroup_mma_wait(num_outstanding=1, deps=(st_tok,))
                pt = _probs_t(st, lse2, offs_n, offs_m, qk_scale, masked, CAUSAL)
                pt_op = gl.convert_layout(pt.to(dtype), op_layout)
                dv = warpgroup_mma(pt_op, do_s, dv, is_async=True)
                dpt = warpgroup_mma_wait(num_outstanding=1, deps=(dpt_tok,))
                dst_op = gl.convert_layout((pt * (dpt - gl.expand_dims(delta, 0))).to(dtype), op_layout)
                dk = warpgroup_mma(dst_op, q_s, dk, is_async=True)
                dk, dv, pt_op, dst_op = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv, pt_op, dst_op))
            else:
                st = warpgroup_mma_wait(num_outstanding=0, deps=(st_tok,))
                pt = _probs_t(st, lse2, offs_n, offs_m, qk_scale, masked, CAUSAL)
                dst_op = gl.convert_layout((pt * -gl.expand_dims(delta, 0)).to(dtype), op_layout)
                dk = warpgroup_mma(dst_op, q_s, dk, is_async=True)
                dk, dst_op = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dst_op))
            # this stage's products are done (in every warpgroup): refill it STAGES steps ahead
            if num_warps > 4:
                cta_barrier()
            if j + STAGES < n_q:
                _load_rows(q_desc, do_desc, q_smem, do_smem, bars, step + STAGES, start_m + STAGES * BLOCK_M, STAGES)

    # --- epilogue: dK and dV out through K's and V's buffers and TMA, which clips keys past Sk
    dk_desc = tma.make_tensor_descriptor(dk_ptr + off_b * stride_dkb + off_hk * stride_dkh, [Sk, HEAD_DIM],
                                         [stride_dkn, 1], [BLOCK_N, HEAD_DIM], keys_layout)
    dv_desc = tma.make_tensor_descriptor(dv_ptr + off_b * stride_dvb + off_hk * stride_dvh, [Sk, HEAD_DIM],
                                         [stride_dvn, 1], [BLOCK_N, HEAD_DIM], keys_layout)
    cta_barrier()  # every warpgroup's last product has read K and V
    k_smem.store((dk * dk_scale).to(dtype))
    v_smem.store((dv * dv_scale).to(dtype))
    fence_async_shared()
    tma_store(dk_desc, [start_n, 0], k_smem)
    tma_store(dv_desc, [start_n, 0], v_smem)
    tma.store_wait(pendings=0)
    mbarrier.invalidate(kv_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
