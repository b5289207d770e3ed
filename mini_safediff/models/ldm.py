"""Single-file LDM checkpoints (the CompVis / Stability layout) <-> diffusers / transformers keys, SD 1.x, 2.x, XL.

One LDM file holds three models (SDXL: four) under these prefixes:
    model.diffusion_model.*                UNet     <-> diffusers UNet2DConditionModel
    first_stage_model.*                    VAE      <-> diffusers AutoencoderKL
    cond_stage_model.transformer.*         SD 1 text encoder, already in the transformers CLIPTextModel layout
    cond_stage_model.model.*               SD 2 text encoder, an OpenCLIP ViT-H/14 text tower
    conditioner.embedders.0.transformer.*  SDXL's first text encoder, as SD 1's
    conditioner.embedders.1.model.*        SDXL's second, an OpenCLIP ViT-bigG/14 text tower with its projection
Each component has one rename table, built by loops from its block counts. A table maps module
paths (key prefixes) and the names below a module are the same on both sides, so one table serves
both directions. Configs are read from tensor shapes, plus the few facts only the SD version
tells (attention heads, upcast, activation), told apart by the layout.

The prediction type is not in the weights: SD 2.x 768-v checkpoints (v_prediction) look exactly like
SD 2.x base ones (epsilon). It defaults to "epsilon"; pass `prediction_type` for v-models.
"""
import torch

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "clip": "cond_stage_model.transformer.", "openclip": "cond_stage_model.model.",
            "sdxl": "conditioner.embedders.0.transformer.", "sdxl_2": "conditioner.embedders.1.model."}
# SD 2 conditions on the penultimate layer of OpenCLIP's 24-block text tower, so its text encoder has 23 layers.
OPENCLIP_UNUSED_BLOCK = 23
# Keys that hold nothing the three models need; everything else must be mapped or loading fails.
SAFE_TO_DROP = (
    "model_ema.",  # EMA copy of the UNet in training checkpoints (model.diffusion_model.* is the one loaded)
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
    "posterior_mean_coef2",  # the noise schedule, rebuilt from the scheduler config
    "cond_stage_model.transformer.text_model.embeddings.position_ids",  # arange(77), rebuilt by the model
    "cond_stage_model.transformer.embeddings.position_ids",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale",  # CLIP's contrastive head
    "conditioner.embedders.1.model.logit_scale",  # SDXL keeps the projection (its pooled text), not the scale
    f"cond_stage_model.model.transformer.resblocks.{OPENCLIP_UNUSED_BLOCK}.",  # see OPENCLIP_UNUSED_BLOCK
)
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                    "beta_end": 0.012, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}
VAE_SCALING_FACTOR = {"clip": 0.18215, "openclip": 0.18215, "sdxl": 0.13025}  # not stored in the file
PAD_TOKENS = {"clip": "<|endoftext|>", "openclip": "!", "sdxl": "<|endoftext|>", "sdxl_2": "!"}
SDXL_TIME_EMBED_DIM = 256  # sinusoids per size / crop number: not in the weights
TEXT_PROJECTION = "text_projection"  # OpenCLIP's (width, embed) matrix x @ P; transformers' Linear weight is P.T

UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "attn": "self_attn", "ln_2": "layer_norm2",
                  "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# The VAE mid-block attention: 1x1 convs (C, C, 1, 1) in LDM, linears (C, C) in diffusers.
VAE_ATTENTION_LINEARS = [f"{coder}.mid_block.attentions.0.{name}.weight"
                         for coder in ("encoder", "decoder") for name in ("to_q", "to_k", "to_v", "to_out.0")]


# --- rename tables: LDM module path -> diffusers module path ---------------------------------------------------
# Modules a given model lacks (shortcut convs, attentions of plain blocks) may stay in a table: unused entries
# rename nothing. Missing weights are reported by name when the model is loaded strictly.

def _add(table: dict, ldm: str, diffusers: str, names: dict) -> None:
    table.update({f"{ldm}.{a}": f"{diffusers}.{b}" for a, b in names.items()})


def unet_renames(blocks: int, layers: int, up_attention: list) -> dict:
    """LDM numbers the UNet as flat lists. input_blocks: [conv_in], then per resolution `layers` (resnet,
    attention) pairs and a downsampler `.0.op`; output_blocks: per resolution `layers + 1` (resnet, attention)
    pairs, the upsampler after the last pair (index 1 without attention, 2 with it)."""
    table = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",  # SDXL
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "middle_block.1": "mid_block.attentions.0"}
    _add(table, "middle_block.0", "mid_block.resnets.0", UNET_RESNET)
    _add(table, "middle_block.2", "mid_block.resnets.1", UNET_RESNET)
    for b in range(blocks):
        for j in range(layers):
            i = 1 + b * (layers + 1) + j
            _add(table, f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}", UNET_RESNET)
            table[f"input_blocks.{i}.1"] = f"down_blocks.{b}.attentions.{j}"
        for j in range(layers + 1):
            i = b * (layers + 1) + j
            _add(table, f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}", UNET_RESNET)
            table[f"output_blocks.{i}.1"] = f"up_blocks.{b}.attentions.{j}"
        if b < blocks - 1:
            table[f"input_blocks.{(b + 1) * (layers + 1)}.0.op"] = f"down_blocks.{b}.downsamplers.0.conv"
            last = (b + 1) * (layers + 1) - 1
            table[f"output_blocks.{last}.{2 if up_attention[b] else 1}.conv"] = f"up_blocks.{b}.upsamplers.0.conv"
    return table


def vae_renames(blocks: int, layers: int) -> dict:
    """LDM numbers the decoder's `up` list by resolution (0 = full size) and runs it backwards; diffusers'
    up_blocks are in execution order. The decoder has `layers + 1` resnets per block."""
    table = {name: name for name in ("quant_conv", "post_quant_conv", "encoder.conv_in", "encoder.conv_out",
                                     "decoder.conv_in", "decoder.conv_out")}
    for coder in ("encoder", "decoder"):
        table[f"{coder}.norm_out"] = f"{coder}.conv_norm_out"
        _add(table, f"{coder}.mid.block_1", f"{coder}.mid_block.resnets.0", VAE_RESNET)
        _add(table, f"{coder}.mid.block_2", f"{coder}.mid_block.resnets.1", VAE_RESNET)
        _add(table, f"{coder}.mid.attn_1", f"{coder}.mid_block.attentions.0", VAE_ATTENTION)
    for b in range(blocks):
        level = blocks - 1 - b
        for j in range(layers):
            _add(table, f"encoder.down.{b}.block.{j}", f"encoder.down_blocks.{b}.resnets.{j}", VAE_RESNET)
        for j in range(layers + 1):
            _add(table, f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{b}.resnets.{j}", VAE_RESNET)
        if b < blocks - 1:
            table[f"encoder.down.{b}.downsample.conv"] = f"encoder.down_blocks.{b}.downsamplers.0.conv"
            table[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{b}.upsamplers.0.conv"
    return table


def openclip_renames(layers: int) -> dict:
    """The attention's fused `in_proj` is split into `attn.{q,k,v}_proj` on the LDM side before renaming."""
    table = {"token_embedding": "text_model.embeddings.token_embedding",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final": "text_model.final_layer_norm"}
    for i in range(layers):
        _add(table, f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", OPENCLIP_BLOCK)
    return table


def _refuse(unexpected: list) -> None:
    if unexpected:
        raise ValueError(f"unexpected keys in the checkpoint ({len(unexpected)}): {', '.join(sorted(unexpected)[:20])}")


def _rename(state_dict: dict, table: dict, source: str) -> dict:
    """Rename each key by the longest key prefix (in whole dotted parts) found in `table`; refuse the rest."""
    renamed, unexpected = {}, []
    for key, value in state_dict.items():
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in table:
                renamed[table[prefix] + key[len(prefix):]] = value
                break
        else:
            unexpected.append(source + key)
    _refuse(unexpected)
    return renamed


def _inverse(table: dict) -> dict:
    return {diffusers: ldm for ldm, diffusers in table.items()}


def _count(state_dict: dict, prefix: str) -> int:
    """How many numbered children `prefix` has, e.g. "down_blocks." -> 4."""
    return len({key[len(prefix):].split(".")[0] for key in state_dict if key.startswith(prefix)})


def _has(state_dict: dict, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state_dict)


def _take(state_dict: dict, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


# --- LDM -> diffusers -------------------------------------------------------------------------------------------

def ldm_unet_to_diffusers(state_dict: dict) -> dict:
    """UNet keys without the `model.diffusion_model.` prefix -> diffusers keys."""
    blocks = 1 + sum(key.startswith("input_blocks.") and key.endswith(".op.weight") for key in state_dict)
    layers = (_count(state_dict, "input_blocks.") - blocks) // blocks  # 1 + blocks * layers + (blocks - 1) entries
    up_attention = [_has(state_dict, f"output_blocks.{b * (layers + 1)}.1.proj_in.") for b in range(blocks)]
    return _rename(state_dict, unet_renames(blocks, layers, up_attention), PREFIXES["unet"])


def _vae_to_diffusers(state_dict: dict) -> dict:
    blocks, layers = _count(state_dict, "encoder.down."), _count(state_dict, "encoder.down.0.block.")
    vae = _rename(state_dict, vae_renames(blocks, layers), PREFIXES["vae"])
    for key in VAE_ATTENTION_LINEARS:
        if key in vae:
            vae[key] = vae[key].flatten(1)  # (C, C, 1, 1) -> (C, C); also accepts files already holding (C, C)
    return vae


def _openclip_to_diffusers(state_dict: dict, source: str) -> dict:
    """OpenCLIP text tower keys -> transformers keys; its projection (SDXL) to `text_projection.weight`."""
    state_dict = dict(state_dict)
    projection = state_dict.pop(TEXT_PROJECTION, None)
    for key in [k for k in state_dict if k.endswith((".in_proj_weight", ".in_proj_bias"))]:
        module, kind = key.rsplit(".in_proj_", 1)
        fused = state_dict.pop(key)  # (3 * hidden, ...): q, k, v stacked
        for name, part in zip("qkv", fused.chunk(3)):
            # A copy: views sharing one storage could not be saved back to safetensors once loaded with assign.
            state_dict[f"{module}.{name}_proj.{kind}"] = part.clone()
    text = _rename(state_dict, openclip_renames(_count(state_dict, "transformer.resblocks.")), source)
    if projection is not None:
        text["text_projection.weight"] = projection.T.contiguous()
    return text


def unet_config(unet: dict) -> dict:
    """diffusers UNet2DConditionModel config from diffusers keys."""
    blocks = _count(unet, "down_blocks.")
    channels = [unet[f"down_blocks.{b}.resnets.0.conv1.weight"].shape[0] for b in range(blocks)]
    cross = ["CrossAttn" if _has(unet, f"{side}_blocks.{b}.attentions.") else "" for side in ("down", "up")
             for b in range(blocks)]
    linear = unet["mid_block.attentions.0.proj_in.weight"].ndim == 2
    # transformer blocks per level (SDXL: 1, 2, 10); SDXL's published config says 1 where a level has no attention
    depths = [_count(unet, f"down_blocks.{b}.attentions.0.transformer_blocks.") or 1 for b in range(blocks)]
    sdxl = "add_embedding.linear_1.weight" in unet
    added = {"addition_embed_type": "text_time", "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
             "projection_class_embeddings_input_dim": unet["add_embedding.linear_1.weight"].shape[1]} if sdxl else {}
    return {**added, "transformer_layers_per_block": depths if set(depths) != {1} else 1,
        "in_channels": unet["conv_in.weight"].shape[1], "out_channels": unet["conv_out.weight"].shape[0],
        "block_out_channels": channels, "layers_per_block": _count(unet, "down_blocks.0.resnets."),
        "down_block_types": [f"{c}DownBlock2D" for c in cross[:blocks]],
        "up_block_types": [f"{c}UpBlock2D" for c in cross[blocks:]],
        "cross_attention_dim": unet["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        # Not in the weights: SD 1.x has 8 heads and 1x1-conv proj_in/proj_out; SD 2.x and XL have 64-channel
        # heads and linear proj_in/proj_out, SD 2.x computes attention in float32 (its fp16 attention overflows;
        # SDXL's config says null).
        "use_linear_projection": linear,
        "attention_head_dim": [c // 64 for c in channels] if linear else 8,
        "upcast_attention": None if sdxl else linear,
    }


def vae_config(vae: dict, kind: str) -> dict:
    """diffusers AutoencoderKL config from diffusers keys; kind "clip", "openclip" (SD 1, 2) or "sdxl"."""
    blocks = _count(vae, "encoder.down_blocks.")
    return {
        "in_channels": vae["encoder.conv_in.weight"].shape[1], "out_channels": vae["decoder.conv_out.weight"].shape[0],
        "latent_channels": vae["decoder.conv_in.weight"].shape[1],
        "block_out_channels": [vae[f"encoder.down_blocks.{b}.resnets.0.conv1.weight"].shape[0] for b in range(blocks)],
        "layers_per_block": _count(vae, "encoder.down_blocks.0.resnets."),
        "down_block_types": ["DownEncoderBlock2D"] * blocks, "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "scaling_factor": VAE_SCALING_FACTOR[kind],
    }


def text_config(text: dict, kind: str) -> dict:
    """transformers CLIPTextConfig from `text_model.*` keys; kind "clip" (SD 1, SDXL's first) or "openclip"
    (SD 2, SDXL's second, whose `text_projection.weight` gives projection_dim)."""
    vocab_size, hidden_size = text["text_model.embeddings.token_embedding.weight"].shape
    projection = {"projection_dim": text["text_projection.weight"].shape[0]} if "text_projection.weight" in text else {}
    return {**projection,
        "vocab_size": vocab_size, "hidden_size": hidden_size,
        "intermediate_size": text["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": _count(text, "text_model.encoder.layers."),
        "num_attention_heads": hidden_size // 64,  # CLIP ViT-L, OpenCLIP ViT-H and bigG all use 64-channel heads
        "max_position_embeddings": text["text_model.embeddings.position_embedding.weight"].shape[0],
        "hidden_act": "quick_gelu" if kind == "clip" else "gelu",  # OpenAI's CLIP was trained with quick_gelu
    }


def _safe_to_drop(key: str) -> bool:
    return any(key == name or (name.endswith(".") and key.startswith(name)) for name in SAFE_TO_DROP)


def _clip_to_diffusers(state_dict: dict) -> dict:
    """SD 1 files hold transformers keys, with or without the `text_model.` level."""
    return {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state_dict.items()}


def ldm_to_diffusers(state_dict: dict, prediction_type: str | None = None) -> dict:
    """A single-file SD 1.x / 2.x / XL checkpoint -> diffusers state dicts and configs:
    {"unet": (sd, config), "vae": (sd, config), "text_encoder": (sd, config), "scheduler": config,
     "tokenizer_pad_token": str}, for SDXL also "text_encoder_2": (sd, config) and "tokenizer_2_pad_token".
    Unknown keys raise a ValueError naming them."""
    state_dict = {key: value for key, value in state_dict.items() if not _safe_to_drop(key)}
    _refuse([key for key in state_dict if not key.startswith(tuple(PREFIXES.values()))])
    texts = [kind for kind in ("clip", "openclip", "sdxl", "sdxl_2") if _has(state_dict, PREFIXES[kind])]
    for part, found in (("UNet", PREFIXES["unet"]), ("VAE", PREFIXES["vae"])):
        if not _has(state_dict, found):
            raise ValueError(f"not a Stable Diffusion checkpoint: no {part} keys ({found}*)")
    if texts not in (["clip"], ["openclip"], ["sdxl", "sdxl_2"]):
        raise ValueError(f"expected one text encoder ({PREFIXES['clip']}* or {PREFIXES['openclip']}*) or SDXL's "
                         f"two ({PREFIXES['sdxl']}* and {PREFIXES['sdxl_2']}*), found "
                         f"{[PREFIXES[kind] + '*' for kind in texts]}")
    kind = texts[0]

    unet = ldm_unet_to_diffusers(_take(state_dict, PREFIXES["unet"]))
    vae = _vae_to_diffusers(_take(state_dict, PREFIXES["vae"]))
    text = _take(state_dict, PREFIXES[kind])
    encoders = {"text_encoder": (_openclip_to_diffusers(text, PREFIXES[kind]), "openclip") if kind == "openclip"
                else (_clip_to_diffusers(text), "clip")}
    if kind == "sdxl":
        encoders["text_encoder_2"] = (_openclip_to_diffusers(_take(state_dict, PREFIXES["sdxl_2"]),
                                                             PREFIXES["sdxl_2"]), "openclip")
    try:
        parts = {"unet": (unet, unet_config(unet)), "vae": (vae, vae_config(vae, kind)),
                 **{name: (text, text_config(text, text_kind)) for name, (text, text_kind) in encoders.items()}}
    except KeyError as e:
        raise ValueError(f"checkpoint lacks a weight needed to read its shape: {e.args[0]} (diffusers name)") from None
    # SDXL's published scheduler config spaces the steps "leading" for every sampler.
    spacing = {"timestep_spacing": "leading"} if kind == "sdxl" else {}
    parts["scheduler"] = {**SCHEDULER_CONFIG, **spacing, "prediction_type": prediction_type or "epsilon"}
    parts["tokenizer_pad_token"] = PAD_TOKENS[kind]
    if kind == "sdxl":
        parts["tokenizer_2_pad_token"] = PAD_TOKENS["sdxl_2"]
    return parts


# --- diffusers -> LDM -------------------------------------------------------------------------------------------

def _openclip_from_diffusers(text_sd: dict, source: str) -> dict:
    text_sd = dict(text_sd)
    projection = text_sd.pop("text_projection.weight", None)
    text = _rename(text_sd, _inverse(openclip_renames(_count(text_sd, "text_model.encoder.layers."))), source)
    for key in [k for k in text if ".attn.q_proj." in k]:
        module, kind = key.split(".q_proj.")
        text[f"{module}.in_proj_{kind}"] = torch.cat([text.pop(f"{module}.{n}_proj.{kind}") for n in "qkv"])
    if projection is not None:
        text[TEXT_PROJECTION] = projection.T.contiguous()
    return text


def diffusers_to_ldm(unet_sd: dict, vae_sd: dict, text_sd: dict, text_kind: str, text_2_sd: dict | None = None) -> dict:
    """diffusers UNet / VAE and `text_model.*` CLIP text state dicts -> one LDM state dict. text_kind: "clip"
    (SD 1, written as cond_stage_model.transformer.*), "openclip" (SD 2, cond_stage_model.model.*) or "sdxl"
    (conditioner.embedders.0.transformer.*, and text_2_sd, with its text_projection, as
    conditioner.embedders.1.model.*)."""
    blocks, layers = _count(unet_sd, "down_blocks."), _count(unet_sd, "down_blocks.0.resnets.")
    up_attention = [_has(unet_sd, f"up_blocks.{b}.attentions.") for b in range(blocks)]
    unet = _rename(unet_sd, _inverse(unet_renames(blocks, layers, up_attention)), "UNet: ")

    vae = dict(vae_sd)
    for key in VAE_ATTENTION_LINEARS:
        vae[key] = vae[key][:, :, None, None]  # (C, C) -> (C, C, 1, 1)
    blocks, layers = _count(vae, "encoder.down_blocks."), _count(vae, "encoder.down_blocks.0.resnets.")
    vae = _rename(vae, _inverse(vae_renames(blocks, layers)), "VAE: ")

    if (text_kind == "sdxl") != (text_2_sd is not None):
        raise ValueError("a second text encoder goes with text_kind 'sdxl', and only there")
    texts = {}
    if text_kind in ("clip", "sdxl"):
        texts[text_kind] = text_sd
    elif text_kind == "openclip":
        layers = _count(text_sd, "text_model.encoder.layers.")
        # A 24th block cannot be written: readers (ours, diffusers') drop block 23 as SD 2's unused last layer.
        # For the same reason, the block that SD 2 files carry there is lost on loading and cannot be restored.
        if layers > OPENCLIP_UNUSED_BLOCK:
            raise ValueError(f"an OpenCLIP text encoder for SD 2 has at most {OPENCLIP_UNUSED_BLOCK} layers, "
                             f"got {layers}")
        texts[text_kind] = _openclip_from_diffusers(text_sd, "text encoder: ")
    else:
        raise ValueError(f"text_kind must be 'clip', 'openclip' or 'sdxl', got {text_kind!r}")
    if text_2_sd is not None:
        texts["sdxl_2"] = _openclip_from_diffusers(text_2_sd, "text encoder 2: ")

    return {PREFIXES[part] + key: value
            for part, component in (("unet", unet), ("vae", vae), *texts.items())
            for key, value in component.items()}
