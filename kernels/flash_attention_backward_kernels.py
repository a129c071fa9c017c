"""The flash-attention backward kernels of SparseDrop's tile dropout (``@triton.jit`` code only).

    _attn_bwd_delta  Δ = rowsum(dO ⊙ O), scaled, for the single-pass backward
    _attn_bwd_dkdv   dK, dV of one key block, summed over its GQA group (with ATOMIC_DQ also dQ
                     through fp32 atomics, and dMask: the single-pass backward)
    _attn_bwd_dq     dQ (and dMask) of one query block; in the two-pass backward it runs first and
                     works out its rows' Δ for the dK/dV pass (DELTA_HERE)

The forward, the helpers both directions share and the conventions these kernels keep (base-2
scores, Δ stored divided by the dropout scale, padded head dims, mask tile classes, loop ranges,
what a dropped tile costs, TMA loads) are in ``flash_attention_kernels.py``: read its docstring
and notes first. Host side: ``flash_attention_triton.py``.
"""
import triton
import triton.language as tl

from .flash_attention_kernels import (
    _BOOL_MASK,
    _DENSE,
    _FLOAT_MASK,
    _LAZY,
    _NO_MASK,
    _dot,
    _dot_acc,
    _head,
    _key_range,
    _kv_tile,
    _live_span,
    _load_mask,
    _query_range,
    _query_tile,
    _row_mask,
    _step_flags,
    _visible,
)


@triton.jit
def _attn_bwd_delta(
    Out, dOut, Delta,
    stride_ob, stride_oh, stride_om, stride_gb, stride_gh, stride_gm,
    H, Sq, delta_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Δ = rowsum(dO ⊙ O) · delta_scale (= (1-p), see the module docstring), fp32 (B*H, Sq)."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D  # no d masks (see "head dims" above)
    # Float arguments arrive as fp64 from Inductor's launcher (fp32 from Triton's): fix them at fp32.
    delta_scale = tl.cast(delta_scale, tl.float32)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # dead code with EVEN_D
    row_ok = offs_m < Sq
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=row_ok[:, None] if EVEN_D else row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(dOut + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :],
                 mask=row_ok[:, None] if EVEN_D else row_ok[:, None] & d_ok[None, :], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) * delta_scale
    tl.store(Delta + pid_bh.to(tl.int64) * Sq + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_cols, dq_base, dmask_base, keep_col, cls_col,
    start_n, offs_n, m_lo, m_hi, Sq, Sk, stride_qm, stride_gm, stride_mm, stride_em, stride_cm, qk_scale, dmask_scale,
    block_q,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_SHARED: tl.constexpr, TILE_CLS: tl.constexpr, CAUSAL: tl.constexpr,
    DROPKEY: tl.constexpr,
    MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_TMA: tl.constexpr, MASK_GRAD: tl.constexpr,
    SKIP: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One of a key block's two query ranges (``_query_range``) against the block, one head of
    its group, in the transposed (keys x queries) frame.

    Rows past Sq are read from row Sq - 1 (clamped, so no load needs a predicate) and get
    lse = +inf, which makes their P exactly 0: the ragged end needs no loop of its own, which
    keeps one loop body fewer alive in a kernel that is short of registers. MASKED only adds
    the causal mask for chunks that straddle the diagonal.
    """
    lo, hi = _query_range(start_n, Sq, m_lo, m_hi, BLOCK_M, BLOCK_N, CAUSAL, TILE_CLS, MASKED)
    TILE_SKIP: tl.constexpr = _LAZY if DROPKEY else SKIP  # see the note above _fwd_inner (flash_attention_kernels.py)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    for start_m in range(lo, hi, BLOCK_M):
        kept, need_mask = _step_flags(keep_col, cls_col, start_m, block_q, stride_em, stride_cm, BLOCK_M, TILE_CLS)
        visit = kept if DROPKEY else True
        if visit:
            offs_m = start_m + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, BLOCK_D)
            d_ok = offs_d < HEAD_DIM  # dead code with EVEN_D
            rows = tl.minimum(offs_m, Sq - 1)
            qt_ptrs = q_base + rows[None, :] * stride_qm + offs_d[:, None]
            do_ptrs = do_base + rows[:, None] * stride_gm + offs_d[None, :]
            if EVEN_D:
                qt = tl.load(qt_ptrs)
            else:
                qt = tl.load(qt_ptrs, mask=d_ok[:, None], other=0.0)
            lse = tl.where(offs_m < Sq, tl.load(lse_base + rows), float("inf"))
            delta = tl.load(delta_base + rows)
            if TILE_SKIP != _LAZY:
                if EVEN_D:
                    do = tl.load(do_ptrs)
                else:
                    do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
            st = _dot(k, qt, INTERPRET) * qk_scale
            if MASK_KIND == _BOOL_MASK and TILE_CLS and not MASK_SHARED:
                pass  # read below, under a branch on the tile's class
            elif MASK_KIND != _NO_MASK:
                if MASK_SHARED:
                    mv = _load_mask(mask_cols, need_mask, MASK_KIND, TILE_CLS)[:, None]
                else:
                    mv = _load_mask(mask_cols[:, None] + rows[None, :] * stride_mm, need_mask, MASK_KIND, TILE_CLS)
                if MASK_KIND == _FLOAT_MASK:
                    st = st + mv.to(tl.float32) * 1.4426950408889634
            # Masks are applied to P, after the exponent, so scale and shift fuse into one FMA.
            pt = tl.exp2(st - (lse * 1.4426950408889634)[None, :])
            if MASK_KIND == _BOOL_MASK and TILE_CLS and not MASK_SHARED:
                if need_mask:
                    mv = tl.load(mask_cols[:, None] + rows[None, :] * stride_mm)
                    pt = tl.where(mv != 0, pt, 0.0)
            elif MASK_KIND == _BOOL_MASK:
                pt = tl.where(mv != 0, pt, 0.0)
            if MASKED:
                pt = tl.where(offs_m[None, :] >= offs_n[:, None], pt, 0.0)
            if TILE_SKIP == _DENSE:
                keepf = kept.to(tl.float32)
                dv = _dot_acc((pt * keepf).to(do.dtype), do, dv, INTERPRET)
                dpt = _dot(v, tl.trans(do), INTERPRET)
                dst = pt * (dpt * keepf - delta[None, :])
            else:
                if kept:
                    if TILE_SKIP == _LAZY:
                        if EVEN_D:
                            do = tl.load(do_ptrs)
                        else:
                            do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
                    dv = _dot_acc(pt.to(do.dtype), do, dv, INTERPRET)
                    dpt = _dot(v, tl.trans(do), INTERPRET)
                    dst = pt * (dpt - delta[None, :])
                else:
                    # Dropped tile: dP = 0 but dS = -P Δ is not, so dK still gets a product.
                    dst = -pt * delta[None, :]
            dst_lo = dst.to(qt.dtype)
            dk = _dot_acc(dst_lo, tl.trans(qt), dk, INTERPRET)
            if ATOMIC_DQ:
                # Single-pass backward: this chunk's share of dQ = dS K goes straight into an fp32
                # buffer (scaled and cast once at the end), so no second pass recomputes P and dP.
                dq_part = _dot(tl.trans(dst_lo), k, INTERPRET)
                if DQ_TMA:
                    # One bulk reduction by the TMA unit (it clips rows past Sq and columns past
                    # HEAD_DIM) instead of BLOCK_M x BLOCK_D element atomics from registers.
                    dq_base.atomic_add([start_m, 0], dq_part)
                else:
                    tl.atomic_add(dq_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq_part,
                                  mask=(offs_m < Sq)[:, None] if EVEN_D else (offs_m < Sq)[:, None] & d_ok[None, :],
                                  sem="relaxed")
            if MASK_GRAD:
                tl.store(dmask_base + offs_m[None, :].to(tl.int64) * Sk + offs_n[:, None],
                         (dst * dmask_scale).to(dmask_base.dtype.element_ty),
                         mask=(offs_m < Sq)[None, :] & (offs_n < Sk)[:, None])
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Mask, Keep, Cls, dOut, Lse, Delta, dK, dV, dQacc, dMask,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_eb, stride_eh, stride_em, stride_en,
    stride_cb, stride_ch, stride_cm, stride_cn,
    stride_gb, stride_gh, stride_gm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, H_KV, GROUP, Sq, Sk, qk_scale, dk_scale, dv_scale, dmask_scale, block_q, block_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_SHARED: tl.constexpr, TILE_CLS: tl.constexpr, CAUSAL: tl.constexpr,
    DROPKEY: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_TMA: tl.constexpr,
    MASK_GRAD: tl.constexpr, SKIP: tl.constexpr, INTERPRET: tl.constexpr,
):
    """dK, dV of one key block of one kv head, summed over the query heads of its GQA group.

    With ATOMIC_DQ it also adds each chunk's dQ into the fp32 buffer dQacc (B, H, Sq, D) (with
    DQ_TMA by the TMA unit's bulk reduction, else by element atomics) and,
    with MASK_GRAD, writes dS into dMask (B, H, Sq, Sk): the whole backward in one pass.
    """
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D  # no d masks (see "head dims" above)
    # Float arguments arrive as fp64 from Inductor's launcher (fp32 from Triton's): fix them at fp32.
    qk_scale = tl.cast(qk_scale, tl.float32)
    dk_scale = tl.cast(dk_scale, tl.float32)
    dv_scale = tl.cast(dv_scale, tl.float32)
    dmask_scale = tl.cast(dmask_scale, tl.float32)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H_KV).to(tl.int64)
    off_hk = (pid_bh % H_KV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # dead code with EVEN_D
    col_ok = offs_n < Sk
    # Keys past Sk are zero rows: whatever their scores, they only touch their own rows of
    # dK and dV, which are never stored.
    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=col_ok[:, None] if EVEN_D else col_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=col_ok[:, None] if EVEN_D else col_ok[:, None] & d_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    keep_n = (start_n // block_k) * stride_en

    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        bh = off_b * H + off_h
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = dOut + off_b * stride_gb + off_h * stride_gh
        lse_base = Lse + bh * Sq
        delta_base = Delta + bh * Sq
        mask_cols = Mask + off_b * stride_mb + off_h * stride_mh + tl.minimum(offs_n, Sk - 1) * stride_mn
        keep_col = Keep + off_b * stride_eb + off_h * stride_eh + keep_n
        if DQ_TMA:  # this head's (Sq, HEAD_DIM) rows of the buffer, as a TMA descriptor
            dq_base = tl.make_tensor_descriptor(dQacc + bh * Sq * HEAD_DIM, shape=[Sq, HEAD_DIM], strides=[HEAD_DIM, 1],
                                                block_shape=[BLOCK_M, BLOCK_D])
        else:
            dq_base = dQacc + bh * Sq * HEAD_DIM
        dmask_base = dMask + bh.to(tl.int64) * Sq * Sk  # B*H*Sq*Sk may pass 2**31
        # With tile classes both ranges are trimmed to this key block's non-hidden query
        # chunks [m_lo, m_hi) of this head's mask.
        cls_col = Cls + off_b * stride_cb + off_h * stride_ch + pid_n * stride_cn
        m_lo, m_hi = _live_span(cls_col, stride_cm, Sq, BLOCK_M, TILE_CLS)
        # Stage 0 (causal only): the query chunks that straddle the diagonal; stage 1: the chunks
        # whose queries all see every key of the block.
        for stage in tl.static_range(0 if CAUSAL else 1, 2):
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_cols, dq_base, dmask_base,
                                 keep_col, cls_col, start_n, offs_n, m_lo, m_hi, Sq, Sk, stride_qm, stride_gm,
                                 stride_mm, stride_em, stride_cm, qk_scale, dmask_scale, block_q,
                                 BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, MASK_KIND, MASK_SHARED, TILE_CLS, CAUSAL,
                                 DROPKEY, stage == 0, ATOMIC_DQ, DQ_TMA, MASK_GRAD, SKIP, INTERPRET)

    dk = dk * dk_scale
    dv = dv * dv_scale
    tl.store(dK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(dK.dtype.element_ty), mask=col_ok[:, None] if EVEN_D else col_ok[:, None] & d_ok[None, :])
    tl.store(dV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(dV.dtype.element_ty), mask=col_ok[:, None] if EVEN_D else col_ok[:, None] & d_ok[None, :])


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, tb, th, mask_rows, dmask_rows, keep_row, cls_row, start_m, n_lo, n_hi,
    Sq, Sk, stride_kn, stride_vn, stride_mn, stride_en, stride_cn, qk_scale, dmask_scale, block_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_SHARED: tl.constexpr, TILE_CLS: tl.constexpr, CAUSAL: tl.constexpr,
    DROPKEY: tl.constexpr,
    MASKED: tl.constexpr, MASK_GRAD: tl.constexpr, SKIP: tl.constexpr, TMA_LOADS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """dQ (and dMask) of a query block over one of its two key ranges (``_key_range``)."""
    lo, hi = _key_range(start_m, Sk, n_lo, n_hi, BLOCK_M, BLOCK_N, CAUSAL, TILE_CLS, MASKED)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Sq
    TILE_SKIP: tl.constexpr = _LAZY if DROPKEY else SKIP  # see the note above _fwd_inner (flash_attention_kernels.py)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    for start_n in range(lo, hi, BLOCK_N):
        kept, need_mask = _step_flags(keep_row, cls_row, start_n, block_k, stride_en, stride_cn, BLOCK_N, TILE_CLS)
        visit = kept if DROPKEY else True
        if visit:
            # offs_n and col_ok address dMask's stores: worked out here, not in a helper (see
            # "one loop step" in flash_attention_kernels.py)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, BLOCK_D)
            d_ok = offs_d < HEAD_DIM  # dead code with EVEN_D
            col_ok = offs_n < Sk
            kt = _kv_tile(k_base, tb, th, start_n, offs_n, offs_d, col_ok, d_ok, stride_kn, BLOCK_N, BLOCK_D, EVEN_D,
                          MASKED, True, TMA_LOADS)
            if TILE_SKIP != _LAZY:
                vt = _kv_tile(v_base, tb, th, start_n, offs_n, offs_d, col_ok, d_ok, stride_vn, BLOCK_N, BLOCK_D, EVEN_D,
                              MASKED, True, TMA_LOADS)
            s = _dot(q, kt, INTERPRET) * qk_scale
            if MASK_KIND == _BOOL_MASK and TILE_CLS and not MASK_SHARED:
                pass  # read below, under a branch on the tile's class
            elif MASK_KIND != _NO_MASK:
                mv = _row_mask(mask_rows, offs_n, Sk, stride_mn, need_mask, MASK_KIND, MASK_SHARED, TILE_CLS)
                if MASK_KIND == _FLOAT_MASK:
                    s = s + mv.to(tl.float32) * 1.4426950408889634
            # Masks are applied to P, after the exponent, so scale and shift fuse into one FMA.
            prob = tl.exp2(s - lse2[:, None])
            if MASK_KIND == _BOOL_MASK and TILE_CLS and not MASK_SHARED:
                if need_mask:
                    mv = tl.load(mask_rows[:, None] + tl.minimum(offs_n, Sk - 1)[None, :] * stride_mn)
                    prob = tl.where(mv != 0, prob, 0.0)
            elif MASK_KIND == _BOOL_MASK:
                prob = tl.where(mv != 0, prob, 0.0)
            if MASKED:
                # Keys past Sk must give exact zeros: exp2(0 - lse) of a zero key can overflow.
                prob = tl.where(_visible(offs_m, offs_n, col_ok, CAUSAL), prob, 0.0)
            if TILE_SKIP == _DENSE:
                dp = _dot(do, vt, INTERPRET)
                ds = prob * (dp * kept.to(tl.float32) - delta[:, None])
            else:
                if kept:
                    if TILE_SKIP == _LAZY:
                        vt = _kv_tile(v_base, tb, th, start_n, offs_n, offs_d, col_ok, d_ok, stride_vn, BLOCK_N, BLOCK_D,
                                      EVEN_D, MASKED, True, TMA_LOADS)
                    dp = _dot(do, vt, INTERPRET)
                    ds = prob * (dp - delta[:, None])
                else:
                    ds = -prob * delta[:, None]
            dq = _dot_acc(ds.to(q.dtype), tl.trans(kt), dq, INTERPRET)
            if MASK_GRAD:
                # dMask = dS (S = q kᵀ scale + mask); written per element, summed over broadcast dims later.
                tl.store(dmask_rows[:, None] + offs_n[None, :], (ds * dmask_scale).to(dmask_rows.dtype.element_ty),
                         mask=row_ok[:, None] & col_ok[None, :])
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, Mask, Keep, Cls, dOut, Lse, Delta, dQ, dMask, Out,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_eb, stride_eh, stride_em, stride_en,
    stride_cb, stride_ch, stride_cm, stride_cn,
    stride_gb, stride_gh, stride_gm,
    stride_dqb, stride_dqh, stride_dqm,
    stride_ob, stride_oh, stride_om,
    H, GROUP, Sq, Sk, qk_scale, dq_scale, dmask_scale, delta_scale, block_q, block_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_SHARED: tl.constexpr, TILE_CLS: tl.constexpr, CAUSAL: tl.constexpr,
    DROPKEY: tl.constexpr, MASK_GRAD: tl.constexpr, DELTA_HERE: tl.constexpr,
    SKIP: tl.constexpr, TMA_LOADS: tl.constexpr, INTERPRET: tl.constexpr,
):
    """dQ of one query block (and its rows of dMask), looping over key chunks.

    ``DELTA_HERE``: the program works out its rows' Δ (as ``_attn_bwd_delta`` does) from O and
    the dO it loads anyway, and stores it for the dK/dV pass that runs next: one launch fewer."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D  # no d masks (see "head dims" above)
    # Float arguments arrive as fp64 from Inductor's launcher (fp32 from Triton's): fix them at fp32.
    qk_scale = tl.cast(qk_scale, tl.float32)
    dq_scale = tl.cast(dq_scale, tl.float32)
    dmask_scale = tl.cast(dmask_scale, tl.float32)
    delta_scale = tl.cast(delta_scale, tl.float32)
    pid_m, pid_bh, off_b, off_h, off_hk = _query_tile(H, GROUP, CAUSAL)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # dead code with EVEN_D
    row_ok = offs_m < Sq
    bh = pid_bh.to(tl.int64)

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] if EVEN_D else row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(dOut + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :],
                 mask=row_ok[:, None] if EVEN_D else row_ok[:, None] & d_ok[None, :], other=0.0)
    # Rows past Sq get lse = +inf, so their P is exactly 0.
    lse2 = tl.load(Lse + bh * Sq + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    if DELTA_HERE:
        o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                    mask=row_ok[:, None] if EVEN_D else row_ok[:, None] & d_ok[None, :], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) * delta_scale
        tl.store(Delta + bh * Sq + offs_m, delta, mask=row_ok)
    else:
        delta = tl.load(Delta + bh * Sq + offs_m, mask=row_ok, other=0.0)
    k_base = _head(K, off_b, off_hk, stride_kb, stride_kh, TMA_LOADS)
    v_base = _head(V, off_b, off_hk, stride_vb, stride_vh, TMA_LOADS)
    if MASK_SHARED:
        # One mask row for every query (e.g. a (B, 1, 1, Sk) padding mask): load it as a vector.
        mask_rows = Mask + off_b * stride_mb + off_h * stride_mh
    else:
        mask_rows = Mask + off_b * stride_mb + off_h * stride_mh + tl.minimum(offs_m, Sq - 1) * stride_mm
    dmask_rows = dMask + bh.to(tl.int64) * Sq * Sk + offs_m.to(tl.int64) * Sk
    keep_row = Keep + off_b * stride_eb + off_h * stride_eh + (start_m // block_q) * stride_em
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Trimmed to the row's non-hidden key tiles, as in the forward.
    cls_row = Cls + off_b * stride_cb + off_h * stride_ch + pid_m * stride_cm
    n_lo, n_hi = _live_span(cls_row, stride_cn, Sk, BLOCK_N, TILE_CLS)
    # Stage 0: the key tiles that need no mask; stage 1: the diagonal band and the ragged end.
    for stage in tl.static_range(2):
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, off_b, off_hk, mask_rows, dmask_rows, keep_row, cls_row, start_m, n_lo,
                       n_hi, Sq, Sk, stride_kn, stride_vn, stride_mn, stride_en, stride_cn, qk_scale, dmask_scale,
                       block_k, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, MASK_KIND, MASK_SHARED, TILE_CLS, CAUSAL,
                       DROPKEY, stage == 1, MASK_GRAD, SKIP, TMA_LOADS, INTERPRET)

    dq = dq * dq_scale
    tl.store(dQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(dQ.dtype.element_ty), mask=row_ok[:, None] if EVEN_D else row_ok[:, None] & d_ok[None, :])
