"""A GPT-2 in one file, shaped like nanoGPT (Karpathy), for the MARS training runs.

Pre-LayerNorm transformer blocks, causal self-attention through
``F.scaled_dot_product_attention``, a GELU MLP, learned position embeddings, and the
output head tied to the token embedding (``lm_head.weight is wte.weight``).
Initialisation is GPT-2's: every weight normal(0, 0.02), biases zero, and the two
projections that write into the residual stream (``attn.c_proj``, ``mlp.c_proj``)
normal(0, 0.02/sqrt(2·n_layer)) so the residual stream's variance does not grow with depth.

Presets (``PRESETS``): ``gpt2-small`` (124M, the paper's "small"), ``gpt2-medium``
(355M), two CPU sizes for character-level Shakespeare: ``cpu-tiny`` (4 × 128) and
``cpu-mini`` (2 × 64), and ``gpu-lab`` (6 × 384, block 256, ~30M parameters with GPT-2's vocabulary):
a GPT-2-shaped model for a lab on one GPU (a few minutes per run, estimated in docs/gpu.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class GPTConfig:
    """Shape of the network. ``vocab_size`` 50304 is GPT-2's 50257 padded to a multiple of 64."""

    block_size: int = 1024  # longest context, in tokens
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm layers (GPT-2 had them; the paper's runs do not)


PRESETS: dict[str, GPTConfig] = {
    "gpt2-small": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    # CPU sizes for character-level data: the vocabulary is set from the data set's meta.json.
    "cpu-tiny": GPTConfig(block_size=128, vocab_size=128, n_layer=4, n_head=4, n_embd=128),
    "cpu-mini": GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=4, n_embd=64),
    "gpu-lab": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, bias=False),
}


def preset(name: str, **overrides) -> GPTConfig:
    """The preset ``name`` with some fields replaced, e.g. ``preset("cpu-tiny", vocab_size=65)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions ≤ t only."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd={config.n_embd} is not a multiple of n_head={config.n_head}")
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, time, channels) -> q, k, v: (batch, heads, time, head_dim)
        q, k, v = rearrange(self.c_attn(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = rearrange(y, "b h t d -> b t (h d)")  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: n_embd -> 4·n_embd -> GELU -> n_embd."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block:  x ← x + attn(ln(x));  x ← x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2: token + position embeddings, ``n_layer`` blocks, final LayerNorm, tied output head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: one (vocab, n_embd) matrix embeds tokens and scores the next token.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2·n_layer) (two per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, the tied matrix counted once; ``non_embedding`` leaves out wte and wpe."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits for every position of ``idx`` (batch, time); with ``targets``, also the mean
        cross-entropy loss. Returns ``(logits, loss)`` (``loss`` is None without targets)."""
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence of length {t} is longer than block_size={self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(rearrange(logits, "b t v -> (b t) v").float(), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue each row of ``idx`` (batch, time) by ``max_new_tokens`` sampled tokens.

        ``temperature`` divides the logits (→ 0 approaches greedy decoding); ``top_k`` keeps
        only the k most likely tokens. The context is cropped to the last ``block_size`` tokens.
        """
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits, _ = self(context)
            logits = logits[:, -1, :].float() / max(temperature, 1e-8)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_token = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
        self.train(was_training)
        return idx
