"""Batched greedy and beam-search decoding for evaluation.

Prompts ``source <sep>`` are left-padded to a common length P so every row generates at the
same time step; each row's positions start at 0 at its first real token (RoPE and sinusoids
see the same positions as in training) and the padding is masked out. With ``use_cache`` the
keys/values of earlier positions are kept (:class:`trainer.model.KVCache`); without it the
whole sequence is recomputed every step, the reference the cached path must match.

With the cache, every token after the prompt is one step of fixed shapes (one new token per
row against all ``max_len`` cache slots, the unfilled ones masked, its position a device
tensor). On a GPU that step is captured once per batch as a CUDA graph and replayed: a
12-layer step is ~250 small kernels, and launching them one by one from Python, not the
arithmetic, is what decoding a batch of short sentences costs.
"""

from __future__ import annotations

import torch

from trainer.model import DecoderLM, KVCache, attention_mask

__all__ = ["generate"]

# replayed steps check whether every row is done only every few tokens: a check waits for
# the GPU, and the host then has nothing queued (finished rows only add <eos>)
_SYNC_EVERY = 8


@torch.no_grad()
def generate(
    model: DecoderLM,
    src_ids: list[list[int]],
    sep_id: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    beam_size: int = 1,
    use_cache: bool = True,
    max_new_ratio: float = 0.0,
    static: bool | None = None,
) -> list[list[int]]:
    """Translate each source; returns the target ids of each row without <eos>.

    Generation stops at <eos>, after ``max_new_tokens``, or when the sequence reaches
    ``model.cfg.max_len``; with ``max_new_ratio`` > 0 a row also stops after
    ``ratio * len(source) + 10`` tokens (fairseq's ``max_len_a``/``max_len_b``), so an untrained
    model does not decode every row to the limit. Beam search ranks finished hypotheses by
    mean log-probability. ``static`` (default: on a GPU) steps the cache at fixed shapes and,
    on a GPU, replays them as a CUDA graph; the same tokens as the plain cached steps.
    """
    if not src_ids:
        return []
    device = next(model.parameters()).device
    prompts = [list(s) + [sep_id] for s in src_ids]
    P = max(len(p) for p in prompts)
    max_new = max(0, min(max_new_tokens, model.cfg.max_len - P))
    tokens = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts], device=device)
    start = torch.tensor([P - len(p) for p in prompts], device=device)  # (B,)
    prefix_end = start if model.cfg.attention_mask == "causal" else torch.full_like(start, P)
    if beam_size > 1:
        tokens, start, prefix_end = (t.repeat_interleave(beam_size, 0)
                                     for t in (tokens, start, prefix_end))
    limits = [max_new if max_new_ratio <= 0 else min(max_new, int(max_new_ratio * len(s)) + 10)
              for s in src_ids]
    max_new = max(limits)
    limit = torch.tensor(limits, device=device)  # (B,) tokens each row may generate
    if static is None:
        static = device.type == "cuda"
    step = _Stepper(model, tokens, start, prefix_end, P + max_new, use_cache, static)
    if beam_size == 1:
        return _greedy(step, limit, eos_id, max_new)
    return _beam(step, limit, beam_size, eos_id, max_new)


class _Stepper:
    """Returns next-token log-probabilities (rows, V) for the sequences so far."""

    def __init__(self, model: DecoderLM, prompt: torch.Tensor, start: torch.Tensor,
                 prefix_end: torch.Tensor, max_len: int, use_cache: bool, static: bool) -> None:
        self.model = model
        self.seq = prompt  # (rows, T) everything so far, left-padded
        self.start, self.prefix_end = start, prefix_end
        self.max_len = max_len
        self.cache = KVCache(model.cfg, prompt.size(0), max_len) if use_cache else None
        self.fed = 0  # positions already in the cache
        # after the prompt, fixed-shape steps from these buffers (``static``)
        self.static = static and use_cache
        self.graphed = self.static and prompt.is_cuda
        self.token: torch.Tensor | None = None  # (rows, 1) the newest token
        self.position: torch.Tensor | None = None  # (1,) its position
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None  # the graph's output

    def __call__(self) -> torch.Tensor:
        T = self.seq.size(1)
        if self.static and self.fed:
            return self._static(T)
        new = self.seq[:, self.fed:] if self.cache is not None else self.seq
        positions = (torch.arange(T - new.size(1), T, device=new.device)[None]
                     - self.start[:, None]).clamp(min=0)  # (rows, Tq) 0 at the first real token
        mask = attention_mask(self.start, self.prefix_end, new.size(1), T)
        rows, Tq = new.shape
        last = torch.arange(rows, device=new.device) * Tq + Tq - 1  # the LM head only there
        logits = self.model.run(new, positions, mask, self.cache, select=last)  # (rows, V)
        if self.cache is not None:
            self.fed = T
        return torch.log_softmax(logits.float(), dim=-1)

    def append(self, next_tokens: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        if rows is not None:
            self.seq = self.seq[rows]
            for t in (self.start, self.prefix_end):  # in place: a captured graph reads them
                t.copy_(t[rows])
            if self.cache is not None:
                self.cache.reorder(rows)
        self.seq = torch.cat([self.seq, next_tokens[:, None]], dim=1)

    def _static(self, T: int) -> torch.Tensor:
        """Log-probabilities after the newest token (position T-1), at fixed shapes."""
        assert self.cache is not None
        if self.token is None:
            self.token = self.seq[:, -1:].clone()
            self.position = torch.full((1,), T - 1, device=self.seq.device)
            self.cache.position = self.position
        else:
            assert self.position is not None
            self.token.copy_(self.seq[:, -1:])
            self.position.fill_(T - 1)
        self.fed = T
        if not self.graphed:
            return self._fixed_step()
        if self.graph is None:
            self._capture()
        assert self.graph is not None and self.out is not None
        self.graph.replay()
        return self.out

    def _fixed_step(self) -> torch.Tensor:
        assert self.token is not None and self.position is not None
        mask = attention_mask(self.start, self.prefix_end, 1, self.max_len,
                              queries=self.position)  # (rows, 1, 1, max_len)
        positions = (self.position - self.start).clamp(min=0)[:, None]  # (rows, 1)
        logits = self.model.run(self.token, positions, mask, self.cache)
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

    def _capture(self) -> None:
        """Capture ``_fixed_step`` as a CUDA graph, after one warm-up on a side stream (it
        writes the cache slot the first replay writes again). Autocast's weight cache is off
        inside: cached casts would outlive the graph's memory."""
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast:
            self._fixed_step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread-local: another thread's CUDA call (a torchrun run's NCCL watchdog polling
        # its events) must not invalidate this capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), autocast:
            self.out = self._fixed_step()


def _greedy(step: _Stepper, limit: torch.Tensor, eos_id: int, max_new: int
            ) -> list[list[int]]:
    batch = limit.size(0)
    device = step.seq.device
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out = []
    every = _SYNC_EVERY if step.graphed else 1
    for t in range(max_new):
        next_tokens = step().argmax(-1)  # (B,)
        next_tokens = torch.where(done | (t >= limit), eos_id, next_tokens)
        out.append(next_tokens)
        done |= next_tokens == eos_id
        if t % every == every - 1 and bool(done.all()):  # sync, to stop early
            break
        step.append(next_tokens)
    rows = torch.stack(out, 1).tolist() if out else [[] for _ in range(batch)]
    return [_until_eos(r, eos_id) for r in rows]


def _beam(step: _Stepper, limit: torch.Tensor, k: int, eos_id: int, max_new: int
          ) -> list[list[int]]:
    batch = limit.size(0)
    device = step.seq.device
    scores = torch.zeros(batch, k, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one
    lengths = torch.zeros(batch, k, device=device)
    done = torch.zeros(batch, k, dtype=torch.bool, device=device)
    history = torch.zeros(batch, k, 0, dtype=torch.long, device=device)
    every = _SYNC_EVERY if step.graphed else 1
    for t in range(max_new):
        logp = step().view(batch, k, -1)  # (B, k, V)
        # a finished beam only extends with <eos> at no cost, so it keeps its score; at its
        # row's limit every beam must end
        finished = torch.full_like(logp[0, 0], float("-inf"))
        finished[eos_id] = 0.0
        done = done | (t >= limit)[:, None]
        logp = torch.where(done[..., None], finished, logp)
        V = logp.size(-1)
        scores, flat = (scores[..., None] + logp).view(batch, -1).topk(k, dim=-1)  # (B, k)
        beam, token = flat // V, flat % V
        history = torch.cat([history.gather(1, beam[..., None].expand_as(history)),
                             token[..., None]], dim=-1)
        lengths = lengths.gather(1, beam) + (~done.gather(1, beam)).float()
        done = done.gather(1, beam) | (token == eos_id)
        if t % every == every - 1 and bool(done.all()):  # sync, to stop early
            break
        rows = (beam + torch.arange(batch, device=device)[:, None] * k).view(-1)
        step.append(token.view(-1), rows)
    best = (scores / lengths.clamp(min=1)).argmax(-1)  # mean log-probability per token
    picked = history[torch.arange(batch, device=device), best].tolist()
    return [_until_eos(r, eos_id) for r in picked]


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids
