"""A tiny DeepSeek-style decoder: latent attention and a mixture of experts, at toy scale.

What is DeepSeek about it (V2/V3, much simplified):

- Multi-head latent attention (MLA): keys and values are not projected from the hidden state
  directly but from a small compressed latent (`kv_latent_dim`), so a KV cache would hold the
  latent plus one shared rotary key per token instead of full keys and values for every head.
  Rotary position embedding is *decoupled*: each head's query and key have a non-rotary part
  (from the latent) and a small rotary part (`rope_dim`; the key's is shared by all heads).
- DeepSeekMoE feed-forward layers: shared experts that see every token, plus routed experts of
  which each token uses `top_k`. Affinities are sigmoids; the choice adds a per-expert bias
  that is nudged after every optimizer step towards an even load (V3's auxiliary-loss-free
  balancing), and a small sequence-wise balance loss (`aux_loss`) complements it.
- RMSNorm before each sublayer, a causal mask, and input/output embeddings tied.

The vocabulary is bytes (256), so any text is input and nothing needs a tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DeepSeekTiny",
    "Expert",
    "LatentAttention",
    "MoE",
    "ModelConfig",
    "RMSNorm",
    "route_bias_step",
]


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape. Every field can be set as a hyperparameter of the same name."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    #: Width of the compressed key/value latent (the low-rank bottleneck of MLA).
    kv_latent_dim: int = 32
    #: Per head: the non-rotary part of queries/keys, and the value width.
    head_dim: int = 32
    #: Per head: the decoupled rotary part of queries/keys (the key's is shared by all heads).
    rope_dim: int = 16
    rope_theta: float = 10_000.0
    max_seq_len: int = 256
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    top_k: int = 2
    #: Hidden width of one expert's SwiGLU; the shared experts are one FFN this many times wider.
    expert_hidden: int = 128
    #: How far a routing bias moves per step towards an even load (V3's gamma).
    route_bias_rate: float = 0.01

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.n_routed_experts:
            raise ValueError(
                f"top_k ({self.top_k}) must be between 1 and n_routed_experts "
                f"({self.n_routed_experts})"
            )
        if self.rope_dim % 2:
            raise ValueError(f"rope_dim ({self.rope_dim}) must be even")
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name not in ("route_bias_rate", "n_shared_experts") and value <= 0:
                raise ValueError(f"{field.name} must be positive, got {value}")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain values (what a checkpoint stores)."""
        return asdict(self)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned scale (no mean, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(seq_len: int, dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of each position's rotation angles, shape (seq_len, dim // 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of the last dimension of x (..., T, dim) by each position's angle."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class LatentAttention(nn.Module):
    """Simplified multi-head latent attention with decoupled rotary keys."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.rope_dim = cfg.rope_dim
        self.latent_dim = cfg.kv_latent_dim
        self.q_proj = nn.Linear(
            cfg.d_model, cfg.n_heads * (cfg.head_dim + cfg.rope_dim), bias=False
        )
        # Down-projection to the latent, and the shared rotary key, in one matmul.
        self.kv_down = nn.Linear(cfg.d_model, cfg.kv_latent_dim + cfg.rope_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_latent_dim)
        # Up-projection of the latent to every head's (non-rotary) key and value.
        self.kv_up = nn.Linear(cfg.kv_latent_dim, cfg.n_heads * 2 * cfg.head_dim, bias=False)
        self.out_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        batch, seq, _ = x.shape
        heads, dim, rope = self.n_heads, self.head_dim, self.rope_dim
        q = self.q_proj(x).view(batch, seq, heads, dim + rope).transpose(1, 2)
        q_nope, q_rope = q.split((dim, rope), dim=-1)
        latent, k_rope = self.kv_down(x).split((self.latent_dim, rope), dim=-1)
        kv = self.kv_up(self.kv_norm(latent)).view(batch, seq, heads, 2 * dim).transpose(1, 2)
        k_nope, v = kv.split((dim, dim), dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin).expand(batch, heads, seq, rope)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope), dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq, heads * dim))


class Expert(nn.Module):
    """A SwiGLU feed-forward network."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    """Shared experts on every token plus `top_k` of the routed experts per token.

    After each forward, `load` holds how many tokens each routed expert received and
    `last_choice` the experts each token was sent to (both detached); `aux_loss` is the
    sequence-wise balance loss of that forward (zero outside training).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.n_routed = cfg.n_routed_experts
        self.shared = (
            Expert(cfg.d_model, cfg.expert_hidden * cfg.n_shared_experts)
            if cfg.n_shared_experts
            else None
        )
        self.experts = nn.ModuleList(
            Expert(cfg.d_model, cfg.expert_hidden) for _ in range(cfg.n_routed_experts)
        )
        self.router = nn.Linear(cfg.d_model, cfg.n_routed_experts, bias=False)
        # Used only to choose experts, never to weight them; changed by route_bias_step, not
        # by gradients. Persistent: it is part of the trained model.
        self.route_bias: Tensor
        self.register_buffer("route_bias", torch.zeros(cfg.n_routed_experts))
        self.load = torch.zeros(cfg.n_routed_experts)
        self.last_choice = torch.zeros(0, cfg.top_k, dtype=torch.long)
        self.aux_loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, d_model = x.shape
        flat = x.reshape(-1, d_model)
        scores = torch.sigmoid(self.router(flat))  # (tokens, experts) affinities
        choice = torch.topk(scores + self.route_bias, self.top_k, dim=-1).indices
        weights = scores.gather(1, choice)
        weights = weights / weights.sum(-1, keepdim=True)
        routed = torch.zeros_like(flat)
        for index, expert in enumerate(self.experts):
            token, slot = torch.where(choice == index)
            # An expert with no tokens still runs (on nothing), so every parameter takes part
            # in every backward, as DDP requires without find_unused_parameters.
            out = expert(flat[token]) * weights[token, slot].unsqueeze(-1)
            routed = routed.index_add(0, token, out)
        out = routed if self.shared is None else routed + self.shared(flat)
        self.last_choice = choice.detach()
        self.load = torch.bincount(choice.flatten(), minlength=self.n_routed).detach()
        if self.training:
            # DeepSeek-V3's complementary sequence-wise balance loss: for each sequence, the
            # fraction of choices per expert times its mean normalised affinity.
            share = (scores / scores.sum(-1, keepdim=True)).view(batch, seq, -1).mean(1)
            chosen = F.one_hot(choice, self.n_routed).sum(1).view(batch, seq, -1).float()
            fraction = chosen.mean(1) * self.n_routed / self.top_k
            self.aux_loss = (fraction * share).sum(-1).mean()
        else:
            self.aux_loss = torch.zeros((), device=x.device)
        return out.view(batch, seq, d_model)


class Block(nn.Module):
    """Pre-norm transformer block: latent attention, then the mixture of experts."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = LatentAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model)
        self.moe = MoE(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.moe(self.ffn_norm(x))


class DeepSeekTiny(nn.Module):
    """The decoder: byte embeddings, blocks, a final RMSNorm, logits through the embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.rope_dim, cfg.rope_theta)
        self.rope_cos: Tensor
        self.rope_sin: Tensor
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaling of the projections that add into the residual stream.
        for name, parameter in self.named_parameters():
            if name.endswith(("out_proj.weight", "down.weight")):
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def moe_layers(self) -> list[MoE]:
        """Every mixture-of-experts layer, first to last."""
        return [block.moe for block in self.blocks if isinstance(block, Block)]

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits (batch, seq, vocab) for the next token at each position of `tokens`."""
        seq = tokens.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens is longer than max_seq_len")
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x) @ self.embed.weight.T

    def aux_loss(self) -> Tensor:
        """The balance loss of the last forward, summed over layers."""
        return torch.stack([moe.aux_loss for moe in self.moe_layers]).sum()

    def count_parameters(self) -> tuple[int, int]:
        """(total, active per token): a token uses the shared and top_k routed experts."""
        total = sum(p.numel() for p in self.parameters())
        per_expert = sum(p.numel() for p in self.moe_layers[0].experts[0].parameters())
        idle = (self.cfg.n_routed_experts - self.cfg.top_k) * per_expert * self.cfg.n_layers
        return total, total - idle


@torch.no_grad()
def route_bias_step(model: DeepSeekTiny, all_reduce: Any = None) -> None:
    """Move each routing bias towards an even load: down for busy experts, up for idle ones.

    `all_reduce` (e.g. torch.distributed.all_reduce) sums the loads over processes first, so
    every process applies the same change and the biases stay identical without a broadcast.
    """
    layers = model.moe_layers
    loads = torch.stack([moe.load.float() for moe in layers])
    if all_reduce is not None:
        all_reduce(loads)
    rate = model.cfg.route_bias_rate
    for moe, load in zip(layers, loads, strict=True):
        moe.route_bias += rate * torch.sign(load.mean() - load)
