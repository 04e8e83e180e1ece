"""DiP: a DiT trunk on large pixel patches plus a Patch Detailer Head (paper §3.3, Fig. 5).

Placements: `post_hoc` (head replaces the DiT final layer), `intermediate` (head after block k,
its refined patch projected back to the token width and added to the stream; the DiT final
layer still produces the output) and `hybrid` (both). `model.head.type: none` is the DiT-only
baseline. forward(x_t, t, y) -> prediction of x_t's shape (v = eps - x0, paper Appendix A).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dip_scale.models.blocks import (
    Block,
    FinalLayer,
    LabelEmbedder,
    TimestepEmbedder,
    patchify,
    rope_2d,
    unpatchify,
)
from dip_scale.models.heads import build_head
from dip_scale.models.presets import TrunkSpec

# Modules on the output path; everything else is the trunk (for parameter accounting).
HEAD_MODULES = ("head", "mid_head", "inject", "final_layer")


class DiP(nn.Module):
    def __init__(self, trunk: TrunkSpec, head_cfg, image_size: int, num_classes: int, in_ch: int = 3, init: str = "released",
                 activation_checkpointing: bool = False):
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        d, p = trunk.hidden_size, trunk.patch_size
        self.trunk = trunk
        self.image_size = image_size
        self.num_classes = num_classes
        self.patch_size = p
        patch_dim = in_ch * p * p

        self.x_embed = nn.Linear(patch_dim, d)
        self.t_embed = TimestepEmbedder(d)
        self.y_embed = LabelEmbedder(num_classes, d)
        self.blocks = nn.ModuleList(Block(d, trunk.num_heads, trunk.mlp_ratio) for _ in range(trunk.depth))

        detailed = head_cfg.type != "none"
        self.inject_after = None
        if detailed and head_cfg.placement in ("intermediate", "hybrid"):
            self.inject_after = head_cfg.inject_after or trunk.depth // 2
            self.mid_head = build_head(head_cfg, d, p)
            self.inject = nn.Linear(patch_dim, d)
        if detailed and head_cfg.placement in ("post_hoc", "hybrid"):
            self.head = build_head(head_cfg, d, p)
        else:
            self.final_layer = FinalLayer(d, patch_dim)
        if init not in ("released", "dit"):
            raise ValueError(f"model.init: {init!r}; valid: released, dit")
        if init == "dit":
            self._init_dit()
        self._init_embeddings()

    @classmethod
    def from_config(cls, cfg) -> "DiP":
        """Build from a dip_scale.models.spec.ModelConfig."""
        return cls(cfg.trunk(), cfg.head, cfg.image_size, cfg.num_classes, init=cfg.init,
                   activation_checkpointing=cfg.activation_checkpointing)

    def _init_embeddings(self) -> None:
        # As released: the patch embedding xavier with zero bias, the label table and both time-MLP
        # weights N(0, 0.02); every other module keeps PyTorch's default init (no adaLN-zero).
        nn.init.xavier_uniform_(self.x_embed.weight)
        nn.init.zeros_(self.x_embed.bias)
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)

    def _init_dit(self) -> None:
        # DiT's recipe: xavier trunk linears with zero biases, adaLN-Zero (every block starts as
        # the identity), a zero DiT final layer and a zero injection; the embeddings then as
        # above. The detailer heads keep PyTorch's default init either way.
        for module in [self.t_embed, self.blocks, getattr(self, "final_layer", None), getattr(self, "inject", None)]:
            for m in module.modules() if module is not None else ():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        zero = [b.adaLN for b in self.blocks]
        if hasattr(self, "final_layer"):
            zero += [self.final_layer.adaLN, self.final_layer.linear]
        if hasattr(self, "inject"):
            zero.append(self.inject)
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def compile_trunk(self, mode: str = "default") -> None:
        """torch.compile each trunk block in place (regional compilation): parameter names, so
        checkpoints and EMA exports, are unchanged, and the identical blocks share one compiled
        graph, so compile time does not grow with depth (tiny/16, CPU inductor, cold: 30 s; the
        whole module: 82 s). Embeddings, head and final layer run eager: a few batched library
        kernels whose compile would cost more than it saves (the head alone: +34 s on CPU)."""
        for block in self.blocks:
            block.compile(mode=mode)

    def _detail(self, head: nn.Module, patches: torch.Tensor, h: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """Run a detailer head on every patch; the token enters as silu(t_emb + h) (released code)."""
        b, n = patches.shape[:2]
        tokens = F.silu(t_emb[:, None] + h)
        return head(patches.flatten(0, 1), tokens.flatten(0, 1)).reshape(b, n, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, capture: int | None = None):
        """x: (B,C,H,W) noisy images, t: (B,) in [0,1] (1 = noise), y: (B,) labels (num_classes =
        null). Returns the velocity prediction, or (prediction, hidden state after `capture`
        blocks) when `capture` is given (for REPA)."""
        x = x.to(self.x_embed.weight.dtype)  # no-op in fp32/autocast; DeepSpeed bf16 params need bf16 input
        b, _, hgt, wid = x.shape
        p = self.patch_size
        gh, gw = hgt // p, wid // p
        patches = patchify(x, p)
        h = self.x_embed(patches.flatten(2))
        t_emb = self.t_embed(t)
        c = F.silu(t_emb + self.y_embed(y))
        rope = rope_2d(self.trunk.hidden_size // self.trunk.num_heads, gh, gw, x.device)
        captured = None
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks, start=1):
            h = checkpoint(block, h, c, rope, use_reentrant=False) if recompute else block(h, c, rope)
            if i == self.inject_after:
                h = h + self.inject(self._detail(self.mid_head, patches, h, t_emb))
            if i == capture:
                captured = h
        if hasattr(self, "head"):
            out = self._detail(self.head, patches, h, t_emb)
        else:
            out = self.final_layer(h, c)
        out = unpatchify(out.view(patches.shape), gh, gw)
        return out if capture is None else (out, captured)
