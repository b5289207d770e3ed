"""CLIPTextModel against transformers' CLIPTextModel on the same random weights, loaded from a saved folder."""
import pytest
import torch
from oracles import oracle  # noqa: I001
from safetensors.torch import load_file

oracle("transformers")  # every test here compares with transformers
from transformers import CLIPTextConfig as RefCLIPTextConfig
from transformers import CLIPTextModel as RefCLIPTextModel
from transformers import CLIPTextModelWithProjection as RefCLIPTextModelWithProjection

from mini_safediff.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from mini_safediff.models.config import ConfigError, config_from_dict, read_config

from sd_configs import SD15_TEXT, SD21_TEXT, SDXL_TEXT, SDXL_TEXT_2

BOS, EOS = 49406, 49407


def rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


def with_prefix(state_dict: dict) -> dict:
    """transformers 5 saves CLIPTextModel's keys without the `text_model.` level that published SD files have."""
    return {key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}": value
            for key, value in state_dict.items()}


def saved_pair(folder, hidden_act):
    """A random transformers text encoder saved with save_pretrained, and ours loaded from that folder."""
    torch.manual_seed(0)
    ref = RefCLIPTextModel(RefCLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37,
                                             num_attention_heads=4, num_hidden_layers=2, hidden_act=hidden_act))
    with torch.no_grad():  # move every weight off its initial value (layer norms start at 1 and 0)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.eval().save_pretrained(folder)
    ours = CLIPTextModel(read_config(folder / "config.json", CLIPTextConfig))
    ours.load_state_dict(with_prefix(load_file(folder / "model.safetensors")), strict=True)
    return ours.eval(), ref


def token_ids():
    words = torch.randint(0, BOS, (3, 75), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([torch.full((3, 1), BOS), words, torch.full((3, 1), EOS)], dim=1)  # (3, 77)
    ids[0, 5:] = EOS  # SD 1 pads with <|endoftext|>
    ids[1, 9] = EOS
    ids[1, 10:] = 0  # SD 2 and SDXL's second tokenizer pad with "!" (id 0)
    return ids


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@torch.no_grad()
def test_last_hidden_state_equals_transformers(tmp_path, hidden_act):
    ours, ref = saved_pair(tmp_path, hidden_act)
    ids = token_ids()
    hidden = ours(ids)
    assert hidden.shape == (3, 77, 32)
    assert rel_err(hidden, ref(ids).last_hidden_state) < 1e-4
    short = ids[:, :12]  # fewer than 77 tokens use the first position embeddings
    assert rel_err(ours(short), ref(short).last_hidden_state) < 1e-4


@torch.no_grad()
def test_penultimate_hidden_states_equal_transformers(tmp_path):
    """SDXL's context: hidden_states[-2] of the text model, from the same pass as the last hidden state."""
    ours, ref = saved_pair(tmp_path, "quick_gelu")
    ids = token_ids()
    penultimate, last = ours.text_model.hidden_states(ids)
    out = ref(ids, output_hidden_states=True)
    assert rel_err(penultimate, out.hidden_states[-2]) < 1e-4
    assert rel_err(last, out.last_hidden_state) < 1e-4


@pytest.mark.parametrize("eos_token_id", [2, EOS])  # SDXL's published legacy value, and the token itself
@torch.no_grad()
def test_projection_model_equals_transformers(tmp_path, eos_token_id):
    """SDXL's second encoder: penultimate hidden states and the projected pooled output (text_embeds)."""
    torch.manual_seed(0)
    ref = RefCLIPTextModelWithProjection(RefCLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
        hidden_act="gelu", projection_dim=24, eos_token_id=eos_token_id))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.eval().save_pretrained(tmp_path)
    ours = CLIPTextModelWithProjection(read_config(tmp_path / "config.json", CLIPTextConfig)).eval()
    ours.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)  # text_model.*, text_projection.*
    ids = token_ids()
    penultimate, pooled = ours(ids)
    out = ref(ids, output_hidden_states=True)
    assert pooled.shape == (3, 24)
    assert rel_err(pooled, out.text_embeds) < 1e-4
    assert rel_err(penultimate, out.hidden_states[-2]) < 1e-4


def test_too_many_tokens_refused():
    model = CLIPTextModel(CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_attention_heads=2,
                                         num_hidden_layers=1, max_position_embeddings=4))
    with pytest.raises(ValueError, match="at most 4"):
        model(torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("raw", [SD15_TEXT, SD21_TEXT, SDXL_TEXT, SDXL_TEXT_2], ids=["sd15", "sd21", "sdxl", "sdxl-2"])
def test_full_size_keys_and_shapes_equal_transformers(raw):
    projection = raw["architectures"] == ["CLIPTextModelWithProjection"]
    with torch.device("meta"):
        ours = (CLIPTextModelWithProjection if projection else CLIPTextModel)(
            config_from_dict(CLIPTextConfig, raw, "text_encoder/config.json"))
        ref = (RefCLIPTextModelWithProjection if projection else RefCLIPTextModel)(RefCLIPTextConfig(**raw))
    ours_shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    ref_shapes = {key: tuple(value.shape) for key, value in with_prefix(ref.state_dict()).items()
                  if key != "text_model.embeddings.position_ids"}  # a buffer some published files carry
    assert ours_shapes == ref_shapes
    assert ours_shapes.keys() == {name for name, _ in ours.named_parameters()}  # no buffers of ours


@pytest.mark.parametrize("key, value", [
    ("hidden_act", "relu"), ("attention_dropout", 0.1), ("use_cache", True),  # the last is an unknown option
])
def test_unsupported_config_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=key):
        config_from_dict(CLIPTextConfig, {**SD15_TEXT, key: value}, "text_encoder/config.json")
