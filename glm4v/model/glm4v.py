"""GLM-4V: splices the vision tower's output into the token stream and runs the GLM-4 decoder.

The chat template marks the image with three tokens ``<|begin_of_image|> <|endoftext|>
<|end_of_image|>``. Their embeddings are replaced by the P+2 vision rows (boi, P patches, eoi), so
a prompt of L tokens becomes a sequence of L+P-1 embeddings. RoPE positions are NOT the sequence
index: boi keeps the position of its token, all P patch rows share the placeholder's position, and
eoi and everything after keep their original token positions. Generation therefore continues from
the unspliced length L (see tests/fixtures/GOLDEN_README.md, section 4.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from glm4v.config import GLM4VConfig
from glm4v.errors import ConversationError
from glm4v.model.language import GLMTransformer, KVCache, Linear, build_step, rope_table
from glm4v.model.vision import EVA2CLIPModel


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    position_ids: torch.Tensor  # [B, S] RoPE positions actually used
    attention_mask: torch.Tensor | None  # [B, S] after the splice (None = no padding)
    inputs_embeds: torch.Tensor | None = None
    hidden_states: list | None = None  # [embeddings, after layer 0, ...] when requested
    hidden_final_norm: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    vision_intermediates: dict | None = None


class Embedding(nn.Module):
    def __init__(self, config: GLM4VConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class RotaryBuffer(nn.Module):
    """Holds ``inv_freq`` only because the official checkpoints store it; positions use ``rope_table``."""

    def __init__(self, config: GLM4VConfig):
        super().__init__()
        dim = config.rope_dim
        inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq)


class ChatGLMTransformer(nn.Module):
    def __init__(self, config: GLM4VConfig):
        super().__init__()
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryBuffer(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.vision = EVA2CLIPModel(config)


class GLM4VForConditionalGeneration(nn.Module):
    def __init__(self, config: GLM4VConfig):
        super().__init__()
        self.config = config
        self.transformer = ChatGLMTransformer(config)
        self.register_buffer("rope", rope_table(config), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.embedding.word_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.embedding.word_embeddings.weight.device

    def encode_images(self, pixel_values: torch.Tensor, return_intermediates: bool = False):
        """[B,3,S,S] pixels -> [B, P+2, D] features ready to splice (already divided by scaling_factor)."""
        vision = self.transformer.vision
        dtype = vision.patch_embedding.proj.weight.dtype
        return vision(pixel_values.to(device=self.device, dtype=dtype), return_intermediates=return_intermediates)

    def splice(self, input_ids, embeds, attention_mask, position_ids, image_features):
        """Replace each row's [boi, placeholder, eoi] embeddings by its image features."""
        boi, eoi = self.config.boi_token_id, self.config.eoi_token_id
        P = image_features.shape[1] - 2
        out_embeds, out_pos, out_mask = [], [], []
        for row in range(input_ids.shape[0]):
            ids = input_ids[row]
            b_hits = (ids == boi).nonzero()
            e_hits = (ids == eoi).nonzero()
            if len(b_hits) == 0 or len(e_hits) == 0:
                raise ConversationError(
                    f"row {row} of the batch has image features but no <|begin_of_image|> ... <|end_of_image|> "
                    "tokens; every row of a batch with images must hold exactly one image"
                )
            b, e = int(b_hits[0]), int(e_hits[0])
            if e - b != 2:
                raise ConversationError(f"row {row}: expected <|begin_of_image|><|endoftext|><|end_of_image|>, got a gap of {e - b}")
            feats = image_features[row].to(embeds.dtype)
            out_embeds.append(torch.cat([embeds[row, :b], feats, embeds[row, e + 1 :]]))
            pos = position_ids[row]
            out_pos.append(torch.cat([pos[: b + 1], pos[b + 1].repeat(P), pos[e:]]))
            if attention_mask is not None:
                m = attention_mask[row]
                out_mask.append(torch.cat([m[: b + 1], m.new_ones(P), m[e:]]))
        mask = torch.stack(out_mask) if attention_mask is not None else None
        return torch.stack(out_embeds), torch.stack(out_pos), mask

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        image_features: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int | None = None,
        output_hidden_states: bool = False,
        return_intermediates: bool = False,
    ) -> ModelOutput:
        """Run the model on token ids (and an image per row if given).

        Without a cache this is the official prefill: logits [B, L+P-1, V] with an image,
        [B, L, V] without. With ``kv_cache`` the new tokens are appended to each row's cache and
        positions continue from the row's last position unless ``position_ids`` is given.
        ``logits_to_keep=n`` computes logits of the last n positions only (generation needs 1;
        the full [S, 151552] matrix of a 1,650-token prompt would be 1 GB in fp32).
        """
        device = self.device
        input_ids = input_ids.to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
            if bool(attention_mask.all()):
                attention_mask = None
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
            if kv_cache is not None:
                position_ids = position_ids + kv_cache.positions[:, None]
        position_ids = position_ids.to(device)

        embeds = self.transformer.embedding(input_ids)
        intermediates = None
        if pixel_values is not None and image_features is None:
            if return_intermediates:
                image_features, intermediates = self.encode_images(pixel_values, return_intermediates=True)
            else:
                image_features = self.encode_images(pixel_values)
        if image_features is not None:
            embeds, position_ids, attention_mask = self.splice(input_ids, embeds, attention_mask, position_ids, image_features)

        rope_rows = self.rope[position_ids].to(embeds.dtype)
        step = build_step(rope_rows, attention_mask, kv_cache)
        hidden, hidden_states = self.transformer.encoder(embeds, step, output_hidden_states)
        if kv_cache is not None:
            kv_cache.lengths += embeds.shape[1]
            kv_cache.positions.copy_(position_ids[:, -1] + 1)

        head_input = hidden if logits_to_keep is None else hidden[:, -logits_to_keep:]
        # Flattened to 2-D: a [1, 1, D] slice keeps the parent's batch stride, and torch's matmul
        # then takes a batched path that copies the whole [V, D] output layer (seconds per call).
        logits = (self.transformer.output_layer(head_input.flatten(0, 1)).unflatten(0, head_input.shape[:2])
                  if logits_to_keep != 0 else None)
        return ModelOutput(
            logits=logits,
            position_ids=position_ids,
            attention_mask=attention_mask,
            inputs_embeds=embeds if output_hidden_states else None,
            hidden_states=hidden_states,
            hidden_final_norm=hidden if output_hidden_states else None,
            image_features=image_features,
            vision_intermediates=intermediates,
        )

    def allocate_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        return KVCache.allocate(
            self.config, batch_size, max_len or self.config.seq_length, dtype or self.dtype, self.device
        )
