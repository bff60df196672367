"""EVA2-CLIP vision tower, 2x2 conv downsample and GLU adapter (``transformer.vision`` in the checkpoint).

image [B,3,S,S] -> patches + CLS + learned positions -> N post-LN ("sandwich") blocks -> drop CLS
-> 2x2/stride-2 conv to the LM width -> GLU adapter -> [boi, patches, eoi] / scaling_factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm4v.config import GLM4VConfig, VisionConfig
from glm4v.kernels import upcast_attention, upcast_conv2d, vision_attention
from glm4v.model.language import Linear


def run_conv(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    out = upcast_conv2d(x, layer.weight, layer.bias, layer.stride)
    return layer(x) if out is None else out


class PatchEmbedding(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, config.hidden_size))
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = run_conv(self.proj, images).flatten(2).transpose(1, 2)
        cls = self.cls_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight[None]


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.query_key_value = Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.query_key_value(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = vision_attention(qkv[0], qkv[1], qkv[2])
        if out is None:
            out = upcast_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(B, L, D)
        return self.dense(out)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """Post-LN residual block: the LayerNorms normalise the sub-block outputs, not their inputs."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    """Adapter from the conv output to the LM's embedding space (uses the LM's widths)."""

    def __init__(self, config: GLM4VConfig):
        super().__init__()
        d, ffn = config.hidden_size, config.ffn_hidden_size
        self.linear_proj = Linear(d, d, bias=False)
        self.norm1 = nn.LayerNorm(d)
        self.gate_proj = Linear(d, ffn, bias=False)
        self.dense_h_to_4h = Linear(d, ffn, bias=False)
        self.dense_4h_to_h = Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    def __init__(self, config: GLM4VConfig):
        super().__init__()
        vc = config.vision_config
        self.patch_embedding = PatchEmbedding(vc)
        self.transformer = VisionTransformer(vc)
        self.conv = nn.Conv2d(vc.hidden_size, config.hidden_size, kernel_size=2, stride=2)
        self.linear_proj = GLU(config)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.scaling_factor = vc.scaling_factor

    def forward(self, images: torch.Tensor, return_intermediates: bool = False):
        """images [B,3,S,S] -> [B, P+2, D_lm]: boi, P patch tokens, eoi, all divided by scaling_factor."""
        inter = {}
        x = self.patch_embedding(images)
        inter["patch_embed"] = x
        x = self.transformer(x)
        inter["transformer"] = x
        x = x[:, 1:]
        B, N, D = x.shape
        grid = int(round(N**0.5))
        x = run_conv(self.conv, x.view(B, grid, grid, D).permute(0, 3, 1, 2))
        inter["conv"] = x
        # Through the adapter as 2-D rows: the 3-D view of the conv output has a batch stride that
        # makes F.linear take a batched matmul that copies each weight (70 ms for the 4096x4096 one).
        B, D_lm = x.shape[:2]
        x = self.linear_proj(x.flatten(2).transpose(1, 2).reshape(-1, D_lm)).view(B, -1, D_lm)
        inter["glu"] = x
        x = torch.cat([self.boi.expand(B, -1, -1), x, self.eoi.expand(B, -1, -1)], dim=1) / self.scaling_factor
        return (x, inter) if return_intermediates else x
