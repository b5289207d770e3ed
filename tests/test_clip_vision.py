"""CLIPModel (both towers and projections) and CLIP's image preprocessing against transformers' CLIPModel and
CLIPImageProcessor on the same random weights, loaded by load_clip from folders that transformers wrote."""
import json

import numpy as np
import pytest
import torch
from oracles import oracle  # noqa: I001
from safetensors.torch import load_file, save_file

oracle("transformers")  # every test here compares with transformers
from transformers import CLIPConfig as RefCLIPConfig
from transformers import CLIPImageProcessorPil
from transformers import CLIPModel as RefCLIPModel

from mini_safediff.evaluation.clip_vision import CLIPConfig, CLIPImageConfig, CLIPModel, load_clip, preprocess
from mini_safediff.models.config import ConfigError, config_from_dict, read_config
from mini_safediff.models.weights import WeightsError

from tiny_models import BOS, EOS, TEXT, TOKENIZER_FILES, VISION, sample_images, save_reference

# What transformers 4.16 wrote into each tower of openai/clip-vit-large-patch14's config.json besides the tower's
# own options: generation, fine-tuning and output settings.
TRANSFORMERS4_DUMP = {
    "_name_or_path": "", "add_cross_attention": False, "architectures": None, "bad_words_ids": None,
    "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
    "diversity_penalty": 0.0, "do_sample": False, "dropout": 0.0, "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0, "finetuning_task": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "initializer_factor": 1.0,
    "initializer_range": 0.02, "is_decoder": False, "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0, "max_length": 20, "min_length": 0,
    "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False, "prefix": None,
    "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False, "repetition_penalty": 1.0,
    "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None, "task_specific_params": None,
    "temperature": 1.0, "tie_encoder_decoder": False, "tie_word_embeddings": True, "tokenizer_class": None,
    "top_k": 50, "top_p": 1.0, "torch_dtype": None, "torchscript": False, "transformers_version": "4.16.0.dev0",
    "use_bfloat16": False, "bos_token_id": None, "pad_token_id": None, "eos_token_id": None}
OPENAI_PREPROCESSOR = {  # openai/clip-vit-large-patch14's preprocessor_config.json, in the old format
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}


def legacy_config(text: dict, vision: dict, projection_dim: int, **text_ids) -> dict:
    """A CLIPModel config.json as transformers 4.16 wrote openai/clip-vit-large-patch14's: full tower dumps, the
    tower sizes repeated in *_config_dict, and the old text ids (eos_token_id 2). The full dumps carry a stale
    layer count: the *_config_dict values must win (loading is strict, so a wrong count fails)."""
    return {
        "_name_or_path": "clip-vit-large-patch14/", "architectures": ["CLIPModel"], "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": projection_dim,
        "text_config": {**TRANSFORMERS4_DUMP, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2,
                        "pad_token_id": 1, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                        "max_position_embeddings": 77, "model_type": "clip_text_model", "vocab_size": 49408,
                        "projection_dim": projection_dim, **text, **text_ids, "num_hidden_layers": 1},
        "text_config_dict": {**text, "projection_dim": projection_dim},
        "torch_dtype": "float32", "transformers_version": None,
        "vision_config": {**TRANSFORMERS4_DUMP, "attention_dropout": 0.0, "hidden_act": "quick_gelu",
                          "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_channels": 3,
                          "projection_dim": projection_dim, **vision, "num_hidden_layers": 1},
        "vision_config_dict": {**vision, "projection_dim": projection_dim}}


def rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("eos_token_id, hidden_act", [(EOS, "quick_gelu"), (2, "gelu")])
@torch.no_grad()
def test_embeddings_equal_transformers(tmp_path, eos_token_id, hidden_act):
    ref, processor = save_reference(tmp_path, eos_token_id, hidden_act)
    clip = load_clip(tmp_path, device="cpu")
    assert clip.model.config.text_config.eos_token_id == eos_token_id
    pixels = torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    ids = clip.tokenizer(["a photo of a cat", "an astronaut riding a horse on the moon", "x"])
    # The end token's position decides the pooled output: a row with id 2 before the end token (where the legacy
    # rule must still find <|endoftext|>) and a truncated row with no end token at all (where the two rules differ).
    ids[1, 3] = 2
    ids[2] = torch.randint(0, BOS, (77,), generator=torch.Generator().manual_seed(2))
    image_emb, text_emb = clip.model.image_embeddings(pixels), clip.model.text_embeddings(ids)
    assert image_emb.shape == (3, 16) and text_emb.shape == (3, 16)
    assert rel_err(image_emb, ref.get_image_features(pixel_values=pixels).pooler_output) < 1e-5
    assert rel_err(text_emb, ref.get_text_features(input_ids=ids).pooler_output) < 1e-5
    out = ref(input_ids=ids, pixel_values=pixels)  # CLIPModel's own normalised embeddings
    assert (image_emb / image_emb.norm(dim=-1, keepdim=True) - out.image_embeds).abs().max() < 1e-4
    assert (text_emb / text_emb.norm(dim=-1, keepdim=True) - out.text_embeds).abs().max() < 1e-4

    images = sample_images()  # the whole path: uint8 images of any size and prompts -> embeddings
    expected = ref.get_image_features(**processor(images, return_tensors="pt")).pooler_output
    assert np.abs(clip.embed_images(images, batch_size=3) - expected.numpy()).max() < 1e-4 * expected.abs().max()
    assert np.allclose(clip.embed_texts(["a photo of a cat"]), text_emb[:1].numpy(), atol=1e-6)


def test_preprocessing_equals_clip_image_processor(tmp_path):
    ref, processor = save_reference(tmp_path)
    ours = preprocess(sample_images(), read_config(tmp_path / "preprocessor_config.json", CLIPImageConfig))
    expected = processor(sample_images(), return_tensors="pt").pixel_values
    assert ours.shape == expected.shape == (4, 3, 30, 30)
    assert (ours - expected).abs().max() < 1e-6


def test_preprocessing_of_real_photos_equals_openai_defaults(tmp_path):
    data = oracle("skimage.data")
    photos = [data.chelsea(), data.rocket(), data.astronaut()]  # 300x451, 427x640, 512x512
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(OPENAI_PREPROCESSOR))
    config = read_config(tmp_path / "preprocessor_config.json", CLIPImageConfig)
    assert config == CLIPImageConfig()  # OpenAI's values are the defaults used when a folder has no such file
    expected = CLIPImageProcessorPil()(photos, return_tensors="pt").pixel_values
    assert (preprocess(photos, config) - expected).abs().max() < 1e-6


@torch.no_grad()
def test_published_layout_loads(tmp_path):
    """openai/clip-vit-large-patch14's layout: the legacy config.json, pytorch_model.bin with the old position_ids
    buffers, the old preprocessor_config.json, and vocab.json + merges.txt only."""
    ref, _ = save_reference(tmp_path / "ref")
    folder = tmp_path / "openai"
    folder.mkdir()
    config = legacy_config({**TEXT, "eos_token_id": 2}, VISION, 16)
    (folder / "config.json").write_text(json.dumps(config))
    state_dict = load_file(tmp_path / "ref" / "model.safetensors")
    state_dict["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state_dict["vision_model.embeddings.position_ids"] = torch.arange(26)[None]
    torch.save(state_dict, folder / "pytorch_model.bin")
    (folder / "preprocessor_config.json").write_text(json.dumps({**OPENAI_PREPROCESSOR, "size": 34, "crop_size": 30}))
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((TOKENIZER_FILES / name).read_bytes())
    clip = load_clip(folder, device="cpu")
    assert clip.model.config.text_config.eos_token_id == 2 and clip.image_config.crop_size == {"height": 30, "width": 30}
    ids = clip.tokenizer(["a photo of a cat"])
    assert rel_err(clip.model.text_embeddings(ids), ref.get_text_features(input_ids=ids).pooler_output) < 1e-5
    pixels = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    assert rel_err(clip.model.image_embeddings(pixels), ref.get_image_features(pixel_values=pixels).pooler_output) < 1e-5


def test_full_size_keys_and_shapes_equal_transformers(tmp_path):
    """openai/clip-vit-large-patch14's config read from its legacy layout gives ViT-L/14 with transformers' keys."""
    config = legacy_config(dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
                           dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                num_hidden_layers=24, image_size=224, patch_size=14), 768)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours_config = read_config(tmp_path / "config.json", CLIPConfig)
    assert (ours_config.vision_config.patch_size, ours_config.projection_dim,
            ours_config.text_config.eos_token_id) == (14, 768, 2)
    with torch.device("meta"):
        ours = CLIPModel(ours_config)
        ref = RefCLIPModel(RefCLIPConfig.from_json_file(tmp_path / "config.json"))
    assert ({key: tuple(value.shape) for key, value in ours.state_dict().items()}
            == {key: tuple(value.shape) for key, value in ref.state_dict().items()})
    assert ours.state_dict().keys() == {name for name, _ in ours.named_parameters()}  # no buffers of ours


@pytest.mark.parametrize("key, value", [
    ("hidden_act", "relu"), ("attention_dropout", 0.1), ("image_size", [224, 224]), ("patch_size", 7),
    ("use_cache", True),  # the last is an unknown option
])
def test_unsupported_vision_config_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=f"config.json: vision_config: .*{key}"):
        config_from_dict(CLIPConfig, {"vision_config": {**VISION, key: value}}, "config.json")


def test_unsupported_preprocessing_refused_by_name():
    with pytest.raises(ConfigError, match="'size'"):
        config_from_dict(CLIPImageConfig, {"size": {"height": 224, "width": 224}}, "preprocessor_config.json")
    with pytest.raises(ConfigError, match="resample"):
        config_from_dict(CLIPImageConfig, {"resample": 2}, "preprocessor_config.json")


def test_missing_or_wrong_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_clip(tmp_path / "nowhere")
    save_reference(tmp_path)
    processor_config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**processor_config, "crop_size": 24}))
    with pytest.raises(ConfigError, match="preprocessor_config.json: crop_size .* image_size 30"):
        load_clip(tmp_path, device="cpu")
    (tmp_path / "preprocessor_config.json").unlink()
    state_dict = load_file(tmp_path / "model.safetensors")
    del state_dict["visual_projection.weight"]  # e.g. a CLIPVisionModel without the projection
    save_file(state_dict, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="model.safetensors.*\n.*missing keys.*\n.*visual_projection.weight"):
        load_clip(tmp_path, device="cpu")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no weight file .*\n.*whole transformers CLIPModel folder"):
        load_clip(tmp_path, device="cpu")
    save_file(state_dict, tmp_path / "model.safetensors")
    text_encoder = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, **TEXT,
                    "model_type": "clip_text_model"}
    (tmp_path / "config.json").write_text(json.dumps(text_encoder))  # an SD text_encoder/ folder
    with pytest.raises(ConfigError, match="config.json: .*attention_dropout.*\n.*whole transformers CLIPModel folder"):
        load_clip(tmp_path, device="cpu")


def test_wrong_inputs_refused():
    model = CLIPModel(config_from_dict(CLIPConfig, {"text_config": TEXT, "vision_config": VISION,
                                                    "projection_dim": 16}))
    with pytest.raises(ValueError, match="30x30"):
        model.image_embeddings(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((1, 40, 40, 3), np.float32), CLIPImageConfig())
