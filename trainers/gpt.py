"""A decoder-only transformer: pre-norm blocks of causal self-attention (``F.scaled_dot_product_attention``) and an
MLP, learned positions, the output layer tied to the token embedding. The blocks are separate modules
(``model.blocks``), so that they can be sharded or checkpointed one by one."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPT", "Block", "flops_per_token"]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.out(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    """LayerNorm -> attention -> residual, LayerNorm -> MLP (4x, GELU) -> residual."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = Attention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Token ids (batch, time) -> next-token logits (batch, time, vocabulary)."""

    def __init__(self, vocab_size: int, context: int, layers: int, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied: one matrix reads and writes tokens
        self.apply(self._init)
        for name, p in self.named_parameters():  # residual projections scaled down with depth (GPT-2)
            if name.endswith(("out.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / (2 * layers) ** 0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.embed(tokens) + self.position(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, tokens: int, temperature: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``prompt`` (1-D ids) continued by ``tokens`` sampled ids: the same generator state gives the same text."""
        out = prompt.clone()
        for _ in range(tokens):
            logits = self(out[-self.context:][None])[0, -1] / temperature
            if top_k:
                cut = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < cut, float("-inf"))
            out = torch.cat([out, torch.multinomial(F.softmax(logits, -1), 1, generator=generator)])
        return out[len(prompt):]


def flops_per_token(model: GPT, context: int) -> int:
    """Training FLOPs per token (forward and backward, 6 per parameter plus attention), as nanoGPT and PaLM count
    them: 6 N + 12 L W T, with N the parameters outside the position embedding."""
    params = sum(p.numel() for p in model.parameters()) - model.position.weight.numel()
    width, layers = model.embed.weight.shape[1], len(model.blocks)
    return 6 * params + 12 * layers * width * context
