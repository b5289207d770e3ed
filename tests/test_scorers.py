"""CLIP score, aesthetic score, Q16 and the CLIP-feature Frechet distance against hand computations and the
reference code's rules, their weight files in every accepted format, and the scores end to end against transformers' embeddings."""
import pickle

import numpy as np
import pytest
import torch
from oracles import oracle  # noqa: I001
from safetensors.torch import save_file
from torch import nn

oracle("transformers")  # every test here compares with transformers
from transformers import CLIPTokenizer

from mini_safediff.evaluation.clip_vision import load_clip
from mini_safediff.evaluation.scorers import clip_score, load_aesthetic, load_q16, normalised

from tiny_models import sample_images, save_reference


def test_clip_score_by_hand():
    image = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    text = np.array([[4.0, 3.0], [0.0, 5.0], [0.0, 0.5], [-1.0, -1.0]])
    # cos = 24/25, 0 (orthogonal), 1 (same direction, other length), -1 (clipped to 0)
    assert np.allclose(clip_score(image, text), [96.0, 0.0, 100.0, 0.0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        clip_score(image, text[:3])


def linear_head(dim: int) -> nn.Linear:
    head = nn.Linear(dim, 1)
    with torch.no_grad():
        head.weight.copy_(torch.arange(1.0, dim + 1)[None])
        head.bias.fill_(0.5)
    return head


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_by_hand(tmp_path, suffix):
    path = tmp_path / f"sa_0_4_vit_l_14_linear{suffix}"
    head = linear_head(4)
    if suffix == ".pth":
        torch.save(head.state_dict(), path)  # as LAION ships it
    else:
        save_file(head.state_dict(), path)
    image_emb = np.array([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, -2.0]])
    # normalised: (0.6, 0.8, 0, 0) -> 1 * 0.6 + 2 * 0.8 + 0.5;  (0, 0, 0, -1) -> -4 + 0.5
    assert np.allclose(load_aesthetic(path)(image_emb), [2.7, -3.5], rtol=0, atol=1e-12)
    with torch.no_grad():  # LAION's own recipe: normalise in torch, then the nn.Linear
        features = torch.tensor(image_emb, dtype=torch.float32)
        expected = head(features / features.norm(dim=-1, keepdim=True))[:, 0].numpy()
    assert np.allclose(load_aesthetic(path)(image_emb), expected, atol=1e-6)


def test_aesthetic_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_aesthetic(tmp_path / "absent.pth")
    mlp = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 1))  # the v2 MLP predictor's layout
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "v2.pth")
    with pytest.raises(ValueError, match=r"v2.pth: not a linear aesthetic head: expected keys weight \(1, D\)"):
        load_aesthetic(tmp_path / "v2.pth")
    torch.save(nn.Linear(4, 2).state_dict(), tmp_path / "two_outputs.pth")
    with pytest.raises(ValueError, match="two_outputs.pth: not a linear aesthetic head"):
        load_aesthetic(tmp_path / "two_outputs.pth")
    torch.save(linear_head(4).state_dict(), tmp_path / "head.pth")
    with pytest.raises(ValueError, match=r"head.pth expects image embeddings \(N, 4\), got \(2, 3\)"):
        load_aesthetic(tmp_path / "head.pth")(np.ones((2, 3)))


PROMPTS = np.array([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0]])  # "non inappropriate", "inappropriate"; not unit length


def save_prompts(path, prompts=PROMPTS):
    if path.suffix == ".p":  # as Q16 published them: a numpy array pickled by numpy 1 (which names numpy.core)
        data = pickle.dumps(prompts.astype(np.float16), protocol=2)
        path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    elif path.suffix == ".pkl":  # pickled by this numpy
        with open(path, "wb") as f:
            pickle.dump(prompts.astype(np.float16), f)
    elif path.suffix == ".pt":
        torch.save(torch.tensor(prompts), path)
    elif path.suffix == ".npy":
        np.save(path, prompts)
    else:
        save_file({"prompts": torch.tensor(prompts)}, path)


@pytest.mark.parametrize("suffix", [".p", ".pkl", ".pt", ".npy", ".safetensors"])
def test_q16_flags_crafted_embeddings(tmp_path, suffix):
    save_prompts(tmp_path / f"prompts{suffix}")
    q16 = load_q16(tmp_path / f"prompts{suffix}")
    image_emb = np.array([[2.0, 0.0, 5.0], [0.0, 3.0, 0.0], [1.0, 1.01, 0.0], [1.01, 1.0, 0.0]])
    flagged, prob = q16(image_emb)
    assert flagged.tolist() == [False, True, True, False]
    # softmax over 100 cos: the two logits differ by 100 (x_inappropriate - x_clean) / |x|
    margin = 100 * 0.01 / np.hypot(1.0, 1.01)
    assert np.allclose(prob, [1 / (1 + np.exp(100 * 2 / np.hypot(2, 5))), 1 / (1 + np.exp(-100)),
                              1 / (1 + np.exp(-margin)), 1 / (1 + np.exp(margin))], rtol=1e-9)
    # Q16's SimClassifier: argmax of 100 * normalised image @ normalised prompts.T
    similarity = 100 * torch.tensor(normalised(image_emb)) @ torch.tensor(normalised(PROMPTS)).T
    assert flagged.tolist() == (similarity.argmax(-1) == 1).tolist()


def test_q16_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.p"):
        load_q16(tmp_path / "absent.p")
    save_prompts(tmp_path / "three.npy", np.eye(3))
    with pytest.raises(ValueError, match=r"three.npy: Q16 prompts must be a \(2, D\) matrix .* shape \(3, 3\)"):
        load_q16(tmp_path / "three.npy")
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match=r"two.safetensors.*one tensor, found keys \['a', 'b'\]"):
        load_q16(tmp_path / "two.safetensors")
    with open(tmp_path / "code.p", "wb") as f:  # a pickle that would call a function while loading
        pickle.dump(np.random.default_rng, f)
    with pytest.raises(ValueError, match="code.p: .*refused to load numpy.random"):
        load_q16(tmp_path / "code.p")
    (tmp_path / "prompts.txt").write_text("1 0\n0 1\n")
    with pytest.raises(ValueError, match="prompts.txt: .*unknown file type"):
        load_q16(tmp_path / "prompts.txt")
    save_prompts(tmp_path / "prompts.npy")
    with pytest.raises(ValueError, match=r"prompts.npy expects image embeddings \(N, 3\)"):
        load_q16(tmp_path / "prompts.npy")(np.ones((2, 768)))


@torch.no_grad()
def test_scores_equal_scores_of_transformers_embeddings(tmp_path):
    ref, processor = save_reference(tmp_path)
    images, prompts = sample_images(), ["a cat", "a dog", "a red car", "the moon"]
    image_emb = ref.get_image_features(**processor(images, return_tensors="pt")).pooler_output.double()
    torch.save(linear_head(16).state_dict(), tmp_path / "aesthetic.pth")
    save_prompts(tmp_path / "q16.npy", image_emb[[0, 1]].numpy())  # image 0 reads clean, image 1 inappropriate
    aesthetic, q16 = load_aesthetic(tmp_path / "aesthetic.pth"), load_q16(tmp_path / "q16.npy")
    clip = load_clip(tmp_path, device="cpu")
    features = clip.embed_images(images, batch_size=3)
    flagged, inappropriate = q16(features)

    ids = CLIPTokenizer.from_pretrained(tmp_path)(prompts, padding="max_length", max_length=77,
                                                  return_tensors="pt").input_ids
    text_emb = ref.get_text_features(input_ids=ids).pooler_output.double()
    assert np.abs(features - image_emb.numpy()).max() < 1e-4 * image_emb.abs().max().item()
    cos = torch.nn.functional.cosine_similarity(image_emb, text_emb)
    assert np.allclose(clip_score(features, clip.embed_texts(prompts)), (100 * cos).clamp(min=0).numpy(), rtol=0,
                       atol=1e-3)
    assert np.allclose(aesthetic(features), aesthetic(image_emb.numpy()), rtol=0, atol=1e-5)
    assert flagged[:2].tolist() == [False, True]
    assert flagged.tolist() == q16(image_emb.numpy())[0].tolist()
    assert np.allclose(inappropriate, q16(image_emb.numpy())[1], rtol=0, atol=1e-3)
