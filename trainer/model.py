"""The decoder of Report 03 §1 and §3: a decoder-only transformer used as a prefix LM.

A sequence is ``source <sep> target <eos>``. With ``attention_mask: prefix`` the source and
``<sep>`` see each other in both directions and the target is causal; with ``causal`` every
position sees only the past. Read top to bottom: positions -> attention -> MLP -> Block ->
DecoderLM. Shapes in comments: B batch, T time, nh heads, hs head size, C = d_model, V vocab.

Attention masks are one rule for training and decoding (see :func:`attention_mask`):
key ``k`` is visible to query ``q`` of row ``b`` when ``start[b] <= k`` (left padding is
hidden) and (``k < prefix_end[b]`` or ``k <= q``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer import attention, gelu
from trainer import norm as norm_kernels
from trainer.config import ModelConfig
from trainer.dropout import dropout, random_mask

__all__ = ["DecoderLM", "KVCache", "PackedRows", "attention_mask"]


# ---------------------------------------------------------------------------------------------
# positions


def rotary_angles(positions: torch.Tensor, head_size: int, base: float) -> torch.Tensor:
    """Angles (B, T, hs/2) for RoPE at integer ``positions`` (B, T); computed once per forward."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, device=positions.device) / head_size)
    return positions.float()[..., None] * inv_freq  # (B, T, hs/2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: str = "half"
                 ) -> torch.Tensor:
    """Rotate pairs of head dims of ``x`` (B, T, nh, hs) by angles (B, T, 1, hs/2): dims
    (i, i + hs/2) with ``pairs="half"``, (2i, 2i + 1) with ``"interleaved"``."""
    if pairs == "half":
        x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, nh, hs/2) each
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


def sinusoid(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """Vaswani et al.'s fixed encoding (B, T, C) at integer ``positions`` (B, T)."""
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, device=positions.device) / d_model)
    angles = positions.float()[..., None] * inv_freq  # (B, T, C/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def attention_mask(
    start: torch.Tensor, prefix_end: torch.Tensor, n_queries: int, n_keys: int,
    queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask (B, 1, Tq, Tk), True = attend; the queries are the last ``n_queries`` keys,
    or at the absolute positions ``queries`` (Tq,) (a device tensor: a replayed decoding step).

    ``start`` (B,): first real position of each row (left padding before it is hidden).
    ``prefix_end`` (B,): positions below it are seen bidirectionally (the source and <sep>).
    """
    k = torch.arange(n_keys, device=start.device)
    q = (k[n_keys - n_queries :] if queries is None else queries)[:, None]  # (Tq, 1)
    visible = (k < prefix_end[:, None, None]) | (k <= q)  # (B, Tq, Tk)
    visible = visible & (k >= start[:, None, None])
    return visible[:, None]


class PackedRows(NamedTuple):
    """A batch's rows without their padding, back to back: the blocks' input is (N, C), row
    ``b`` its tokens ``starts[b]`` to ``starts[b] + lengths[b] - 1``. Training with the fused
    attention kernel only (the mask the blocks get, see :meth:`DecoderLM.forward`)."""

    prefix_end: torch.Tensor  # (B,) int32; zeros: causal
    starts: torch.Tensor  # (B,) int32
    lengths: torch.Tensor  # (B,) int32
    rows: torch.Tensor  # (N,) each token's row (stochastic depth draws per row)
    width: int  # the padded batch's T (>= every length)


class KVCache:
    """Preallocated keys/values of every layer for incremental decoding (no per-step concat).

    Allocated on the first update, in the dtype of the keys (bf16/fp16 under autocast).
    Two ways to fill it: after ``length`` positions (a Python int; each call sees the
    filled part), or, with ``position`` set (a (1,) device tensor), one token at that
    position and every call sees all ``max_len`` keys (the mask hides the unfilled ones):
    fixed shapes and no host value, so a CUDA graph can replay the step."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int) -> None:
        self.shape = (cfg.n_layers, batch, cfg.n_heads, max_len, cfg.d_model // cfg.n_heads)
        self.k = self.v = torch.empty(0)
        self.length = 0  # positions filled so far, the same in every row
        self.position: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (B, nh, T, hs) after the cached positions; return all keys/values."""
        if self.k.numel() == 0:
            self.k = k.new_zeros(self.shape)
            self.v = v.new_zeros(self.shape)
        if self.position is not None:
            self.k[layer].index_copy_(2, self.position, k)
            self.v[layer].index_copy_(2, self.position, v)
            return self.k[layer], self.v[layer]
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` (beam search), in place (a captured graph keeps its buffers)."""
        if self.k.numel():
            self.k.copy_(self.k[:, rows])
            self.v.copy_(self.v[:, rows])


# ---------------------------------------------------------------------------------------------
# the transformer


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.n_heads
        self.rope_pairs = cfg.rope_pairs
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | PackedRows | None, cache: KVCache | None,
                add_bias: bool = True, qkv: torch.Tensor | None = None) -> torch.Tensor:
        """The attention's output projection; without its bias if not ``add_bias`` (the
        caller adds it: trainer.norm's kernels). ``qkv``: ``self.qkv(x)`` if the caller
        computed it (trainer.norm.residual_linear)."""
        dropout = self.dropout if self.training else 0.0
        bias = self.proj.bias if add_bias else None
        qkv = self.qkv(x) if qkv is None else qkv
        if isinstance(mask, PackedRows):  # x (N, C): rows without padding
            y = attention.fused_attention(qkv, rope, mask.prefix_end, self.n_heads, dropout,
                                          packed=(mask.starts, mask.lengths, mask.width))
            return F.linear(y, self.proj.weight, bias)
        if mask is not None and mask.dim() == 1:  # prefix ends (B,): the fused kernel
            y = attention.fused_attention(qkv, rope, mask, self.n_heads, dropout)
            return F.linear(y, self.proj.weight, bias)
        B, T, C = x.shape
        q, k, v = qkv.view(B, T, 3, self.n_heads, C // self.n_heads).unbind(2)
        if rope is not None:  # in the qkv layout (B, T, nh, hs): reads and writes in order
            q, k = apply_rotary(q, *rope, self.rope_pairs), apply_rotary(k, *rope, self.rope_pairs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs) views
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, Tk, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
        )  # (B, nh, T, hs)
        return F.linear(y.transpose(1, 2).reshape(B, T, C), self.proj.weight, bias)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model)
        # in training, the up-projection's bias and GELU in trainer.gelu's kernels (set by
        # the trainer where they can run: a GPU with Triton, train.fused_mlp)
        self.fused = False

    def forward(self, x: torch.Tensor, add_bias: bool = True, up: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The down-projection's output; without its bias if not ``add_bias`` (the caller
        adds it: trainer.norm's kernels). ``up``: ``x`` up-projected without the bias, if
        the caller computed it (trainer.norm.residual_linear)."""
        if self.fused and self.training:
            h = gelu.bias_gelu(F.linear(x, self.up.weight) if up is None else up, self.up.bias)
        else:
            h = F.gelu(self.up(x) if up is None else up + self.up.bias)
        return F.linear(h, self.down.weight, self.down.bias if add_bias else None)


def drop_path(x: torch.Tensor, p: torch.Tensor, training: bool,
              packed: PackedRows | None = None) -> torch.Tensor:
    """Stochastic depth: zero the whole residual branch of a row with probability ``p`` (a
    0-dim tensor, not a float: a compiled block would be specialised, and recompiled, for
    every layer's rate). ``x`` (B, T, C), or (N, C) rows without padding (``packed``)."""
    if not training:
        return x
    return x * row_keep(x, p, packed) / (1 - p)


def row_keep(x: torch.Tensor, p: torch.Tensor, packed: PackedRows | None) -> torch.Tensor:
    """Stochastic depth's keep (1) or drop (0) of each row, broadcast to ``x``'s tokens:
    (B, 1, 1) for ``x`` (B, T, C), (N, 1) for packed rows (the same draws either way)."""
    if packed is None:
        return drop_path_keep(x.size(0), p, x)[:, None, None]
    return drop_path_keep(packed.prefix_end.size(0), p, x)[packed.rows][:, None]


def drop_path_keep(rows: int, p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(rows,) 1 where a row keeps its branch, 0 (probability ``p``) where stochastic depth
    drops it, in ``like``'s dtype and device."""
    return like.new_empty(rows).bernoulli_(1 - p)


class Block(nn.Module):
    """Attention and MLP, each with dropout, drop-path and "Add & Norm" (post) or pre-norm."""

    def __init__(self, cfg: ModelConfig, layer: int, drop_path_p: float) -> None:
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        # the rate is a tensor (a float would specialise a compiled block to each layer's
        # rate); whether the model uses stochastic depth at all is one flag for every block
        self.drop_path_p: torch.Tensor
        self.register_buffer("drop_path_p", torch.tensor(drop_path_p), persistent=False)
        self.stochastic_depth = cfg.drop_path > 0
        self.attn = SelfAttention(cfg, layer)
        self.mlp = MLP(cfg)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.dropout = cfg.dropout
        # in post-norm training, dropout, drop-path, the residual add and the LayerNorm in
        # trainer.norm's kernels (set by the trainer where they can run, train.fused_norm)
        self.fused_norm = False
        # and the residual's gradient added by each branch's first input-gradient matmul
        # (trainer.norm.residual_linear, train.residual_addmm)
        self.residual_addmm = False

    def residual(self, x: torch.Tensor, branch: torch.Tensor, norm: nn.LayerNorm,
                 branch_bias: torch.Tensor | None = None, packed: PackedRows | None = None
                 ) -> torch.Tensor:
        """``x`` plus the dropped-out ``branch``, normalised (post-norm); ``branch_bias``: the
        bias the branch was computed without (only with the fused kernels, see forward);
        ``packed``: ``x`` is (N, C), rows without padding."""
        if self.fuses_norm():
            mask = scale = None
            if self.dropout > 0:  # the same draws as trainer.dropout.dropout's
                mask = random_mask(list(branch.shape), self.dropout, x.device)
            if self.stochastic_depth:  # and as drop_path's: per row (B,) or per token (N,)
                p = self.drop_path_p
                scale = row_keep(x, p, packed).flatten().float() / (1 - p)
            return norm_kernels.residual_norm(x, branch, mask, scale, self.dropout, norm,
                                              branch_bias)
        # compiled for a GPU: the mask from trainer.dropout's kernel, not Inductor's
        branch = dropout(branch, self.dropout, self.training)
        if self.stochastic_depth:
            branch = drop_path(branch, self.drop_path_p, self.training, packed)
        x = x + branch
        # post-norm: the stream keeps its input's dtype (autocast's LayerNorm returns fp32)
        return x if self.pre_norm else norm(x).type_as(x)

    def fuses_norm(self) -> bool:
        return self.fused_norm and self.training and not self.pre_norm

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | PackedRows | None, cache: KVCache | None = None
                ) -> torch.Tensor:
        # with trainer.norm's kernels, the projections' biases are added (and their gradients
        # summed) there, not in the matmuls
        fused = self.fuses_norm()
        first = fused and self.residual_addmm  # the branches' first matmuls here, see init
        packed = mask if isinstance(mask, PackedRows) else None
        qkv = up = None
        if first:
            qkv, x = norm_kernels.residual_linear(x, self.attn.qkv.weight, self.attn.qkv.bias)
        h = self.norm1(x) if self.pre_norm else x
        x = self.residual(x, self.attn(h, rope, mask, cache, add_bias=not fused, qkv=qkv),
                          self.norm1, self.attn.proj.bias if fused else None, packed)
        if first:
            up, x = norm_kernels.residual_linear(x, self.mlp.up.weight, None)
        h = self.norm2(x) if self.pre_norm else x
        return self.residual(x, self.mlp(h, add_bias=not fused, up=up), self.norm2,
                             self.mlp.down.bias if fused else None, packed)


class DecoderLM(nn.Module):
    """Token embedding -> ``n_layers`` blocks -> (final norm if pre-norm) -> tied LM head.

    Args:
        cfg: the model's shape; ``vocab_size`` and ``pad_id`` come from the tokenizer.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int) -> None:
        super().__init__()
        self.cfg = cfg
        # forward() uses trainer.attention's kernel in training (set by the trainer where it
        # can run: a GPU with Triton)
        self.fused_attention = False
        # under bf16 autocast, the residual stream in bf16 (train.fp32_residual: false)
        self.bf16_residual = True
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.wte = nn.Embedding(vocab_size, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        # stochastic depth grows linearly from 0 at the bottom block to drop_path at the top
        rates = [cfg.drop_path * i / max(cfg.n_layers - 1, 1) for i in range(cfg.n_layers)]
        self.blocks = nn.ModuleList(Block(cfg, i, p) for i, p in enumerate(rates))
        self.norm_f = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self.lm_head = (None if cfg.tie_embeddings
                        else nn.Linear(cfg.d_model, vocab_size, bias=False))
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def param_counts(self) -> dict[str, int]:
        """``total``, ``embedding`` (token embedding, plus the LM head when untied) and
        ``non_embedding`` (what Report 03 calls "86 M")."""
        total = sum(p.numel() for p in self.parameters())
        embedding = self.wte.weight.numel()
        if self.lm_head is not None:
            embedding += self.lm_head.weight.numel()
        return {"total": total, "embedding": embedding, "non_embedding": total - embedding}

    def forward(self, tokens: torch.Tensor, prefix_lens: torch.Tensor,
                select: torch.Tensor | None = None, packed: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits (B, T, V) for right-padded ``tokens`` (B, T); ``prefix_lens`` (B,) counts the
        source tokens and <sep> of each row (ignored by the ``causal`` mask). With ``select``
        (S,), indices into the flattened B*T positions, only those logits (S, V): training
        skips the LM head where there is no target.

        ``packed`` (N,), with the fused attention only: the flattened positions of the rows'
        real tokens, ascending (found on the host: no device sync). The blocks then run on
        those N tokens alone, rows back to back with no padding (:class:`PackedRows`), and
        ``select`` indexes them; the result is the same as padded rows give at those
        positions (a training step with less work: the matmuls skip the padding)."""
        B, T = tokens.shape
        if packed is not None:
            if not self.fused_attention:
                raise ValueError("packed rows need the fused attention kernel")
            # row b's tokens are packed[bounds[b]:bounds[b + 1]]
            bounds = torch.searchsorted(
                packed, torch.arange(B + 1, device=tokens.device) * T).to(torch.int32)
            rows = packed // T
            causal = self.cfg.attention_mask == "causal"
            rows_mask = PackedRows((torch.zeros_like(prefix_lens) if causal else prefix_lens)
                                   .to(torch.int32), bounds[:-1], bounds.diff(), rows, T)
            return self.run(tokens.flatten()[packed], packed - rows * T, rows_mask,
                            select=select)
        positions = torch.arange(T, device=tokens.device).expand(B, T)
        mask: torch.Tensor | None
        if self.fused_attention:
            # the kernel takes the prefix ends (int32, cast once, not per layer), not a
            # (B, 1, T, T) mask; 0: causal
            causal = self.cfg.attention_mask == "causal"
            mask = (torch.zeros_like(prefix_lens) if causal else prefix_lens).to(torch.int32)
        elif self.cfg.attention_mask == "causal":
            mask = None  # right padding only follows real tokens: SDPA's is_causal fast path
        else:
            mask = attention_mask(torch.zeros_like(prefix_lens), prefix_lens, T, T)
        return self.run(tokens, positions, mask, select=select)

    def run(self, tokens: torch.Tensor, positions: torch.Tensor,
            mask: torch.Tensor | PackedRows | None, cache: KVCache | None = None,
            select: torch.Tensor | None = None) -> torch.Tensor:
        """The network on ``tokens`` (B, T) at ``positions`` (B, T) with a prepared ``mask``
        (None: causal; a (B,) tensor: the prefix ends, for the fused kernel; or tokens and
        positions (N,) of :class:`PackedRows`); with ``cache``, the tokens follow the cached
        ones. Logits (B, T, V) (or (N, V))."""
        x = self.wte(tokens)  # (B, T, C)
        rope = None
        if self.cfg.positional == "rope":
            angles = rotary_angles(positions, self.cfg.d_model // self.cfg.n_heads,
                                   self.cfg.rope_base)[..., None, :]
            rope = (angles.cos(), angles.sin())  # (B, T, 1, hs/2) or (N, 1, hs/2)
        else:
            x = x * math.sqrt(self.cfg.d_model) + sinusoid(positions, self.cfg.d_model)
        x = self.dropout(x)
        dev = x.device.type
        if (self.bf16_residual and torch.is_autocast_enabled(dev)
                and torch.get_autocast_dtype(dev) == torch.bfloat16):
            x = x.to(torch.bfloat16)  # the stream's dtype from here on (Block.residual)
        for block in self.blocks:
            if not self.training or cache is not None:
                # block.forward, not block(...): a block compiled for training
                # (``train.compile``) runs evaluation and decoding eagerly, never recompiled
                # for a cache or captured in a decoding graph
                x = block.forward(x, rope, mask, cache)
            elif self.cfg.grad_checkpointing:
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask)
        if cache is not None:
            cache.length += tokens.size(1)
        x = self.norm_f(x)
        if select is not None:  # (S, C); backward: index_add_
            x = x.reshape(-1, x.size(-1)).index_select(0, select)
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight)  # (B, T, V)
