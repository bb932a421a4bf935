"""Floating-point operations of the miniFLUX transformer's forwards in a generation, counted from token counts.

Counted: every matrix product over tokens (2 FLOPs per multiply-add) and the attention products QK^T and AV over
exactly the query/key pairs the blockwise causal attention computes (Sec. 3.4: query group g sees the keys of
groups 0..g). Per-sample products (timestep / pooled-text conditioning, adaLN modulation) are included; norms,
RoPE, activations and softmax are not (they are not matrix products and are far below 1% of the total).
Text tokens are what the transformer is given, which the caller says: a guided batch keeps the text columns some row
uses (model_core.text.PromptEmbeddings.without_padding_columns), far fewer than the 128 T5 positions of a prompt.
"""
from model_core.temporal import history_layout, tokens_per_frame


def forward_flops(config: dict, frame_tokens: list, batch: int, text_tokens: int) -> int:
    """FLOPs of one transformer forward over `batch` rows of `text_tokens` text tokens whose image frames have
    `frame_tokens` tokens each (oldest first, the current unit last)."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = config["num_layers"] + config["num_single_layers"]
    image, tokens = sum(frame_tokens), text_tokens + sum(frame_tokens)
    per_token = 2 * 12 * dim * dim * blocks  # q,k,v,out (4 D^2) + MLP 1:4:1 (8 D^2); single blocks fuse the same 12 D^2
    embed = 2 * (config["in_channels"] * dim * image + config["joint_attention_dim"] * dim * text_tokens)
    head = 2 * dim * config["in_channels"] * frame_tokens[-1]
    modulation = 2 * dim * dim * (12 * config["num_layers"] + 3 * config["num_single_layers"] + 2)
    conditioning = 2 * (256 * dim + dim * dim + config["pooled_projection_dim"] * dim + dim * dim)
    attention, end = 0, text_tokens
    for count in frame_tokens:  # group 0 = text + oldest frame; the text queries attend like the oldest frame
        queries = count + (text_tokens if end == text_tokens else 0)
        end += count
        attention += 4 * queries * end * dim
    return batch * (per_token * tokens + embed + head + modulation + conditioning + attention * blocks)


def generation_flops(config: dict, height: int, width: int, num_units: int, first_frame_steps, video_steps,
                     guided: bool, text_tokens: int, vae_scale: int = 8, num_stages: int = 3) -> int:
    """FLOPs of every transformer forward of a text-to-video generation of `num_units` latent frames, each forward
    given `text_tokens` text tokens per row."""
    latent_h, latent_w = height // vae_scale, width // vae_scale
    batch = 2 if guided else 1
    total = 0
    for unit in range(num_units):
        steps = first_frame_steps if unit == 0 else video_steps
        for stage in range(num_stages):
            frames = [tokens_per_frame(latent_h, latent_w, clip.level, num_stages)
                      for clip in history_layout(unit, stage, num_stages) for _ in range(clip.length)]
            frames.append(tokens_per_frame(latent_h, latent_w, stage, num_stages))
            total += steps[stage] * forward_flops(config, frames, batch, text_tokens)
    return total
