"""Forward FLOP counts of the DiT (docs/skiparse.md#compute-cost: attention 4*N^2*C, linears 2*N*params)."""

from __future__ import annotations

from ospfn.model.config import DiTConfig
from ospfn.model.dit import block_schedule

__all__ = ["forward_flops"]


def forward_flops(cfg: DiTConfig, grid: tuple[int, int, int], text_len: int | None = None) -> dict[str, float]:
    """FLOPs of one forward at token grid (T, H, W): ``{"attention", "linear", "total"}``.

    Self-attention costs 4*n^2*C per sub-sequence of n tokens (a full block has one of N tokens, a Skiparse
    block P^2 of N_pad/P^2, padding included); cross-attention 4*N*L_txt*C; every Linear 2*tokens*params.
    Embeddings and the head are included; norms, RoPE and element-wise work are not.
    """
    T, H, W = grid
    N = T * H * W
    C, Fd, L = cfg.dim, cfg.ffn_dim, text_len or cfg.text_len
    P = cfg.sparse_ratio
    m = P * P
    Hp, Wp = -(-H // m) * m, -(-W // m) * m
    n_pad = T * Hp * Wp
    attn = lin = 0.0
    for layout in block_schedule(cfg):
        tokens = N if layout == "full" or P == 1 else n_pad
        if layout == "full" or P == 1:
            attn += 4.0 * N * N * C
        else:
            attn += 4.0 * m * (n_pad / m) ** 2 * C
        attn += 4.0 * tokens * L * C  # cross-attention scores + weighted sum
        lin += 2.0 * tokens * (4 * C * C + 2 * C * C + 2 * C * Fd)  # self qkvo, cross q/o, ffn
        lin += 2.0 * L * (2 * C * C)  # cross k/v on the text tokens
    lin += 2.0 * N * cfg.in_dim * cfg.patch_numel * C + 2.0 * L * (cfg.text_dim * C + C * C)
    lin += 2.0 * N * C * cfg.out_dim * cfg.patch_numel
    return {"attention": attn, "linear": lin, "total": attn + lin}
