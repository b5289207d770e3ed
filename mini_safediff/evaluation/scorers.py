"""The real-model scores that read CLIP image embeddings (clip_vision.py): CLIP score, the LAION aesthetic
score and the Q16 inappropriate-image classifier (the Frechet distance of CLIP features is metrics.py's).

    clip = load_clip("clip-vit-large-patch14")
    features = clip.embed_images(images)                       # uint8 (N, H, W, 3) -> (N, D)
    clip_score(features, clip.embed_texts(prompts)).mean()
    load_aesthetic("sa_0_4_vit_l_14_linear.pth")(features).mean()
    flagged, p_inappropriate = load_q16("prompts.p")(features)
    metrics.frechet_distance(features, reference_features)     # FD on CLIP features (clean-fid's "clip")

Each loader raises FileNotFoundError or ValueError naming its file, so that a caller can skip that one score.
All arithmetic is float64 numpy on (N, D) embeddings.
"""
import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.weights import read_state_dict


def normalised(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Per image-prompt pair, max(100 cos(image, text), 0): (N, D), (N, D) -> (N,). The CLIP score of a set is
    its mean (the rule of torchmetrics' CLIPScore, on the projected embeddings)."""
    if np.shape(image_emb) != np.shape(text_emb) or np.ndim(image_emb) != 2:
        raise ValueError(f"clip_score needs image and text embeddings of one shape (N, D), got "
                         f"{np.shape(image_emb)} and {np.shape(text_emb)}")
    return np.maximum(100 * (normalised(image_emb) * normalised(text_emb)).sum(-1), 0)


@dataclass
class AestheticHead:
    """LAION's aesthetic predictor v1: a linear layer on the L2-normalised CLIP image embedding -> a 1..10 rating."""
    weight: np.ndarray  # (D,)
    bias: float
    source: str

    def __call__(self, image_emb: np.ndarray) -> np.ndarray:
        """(N, D) image embeddings -> (N,) ratings."""
        check_dim(image_emb, len(self.weight), self.source)
        return normalised(image_emb) @ self.weight + self.bias


def load_aesthetic(path) -> AestheticHead:
    """The LAION v1 linear head, e.g. sa_0_4_vit_l_14_linear.pth: the state dict of nn.Linear(D, 1) (keys `weight`
    (1, D) and `bias` (1,)) as .pth/.pt or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: aesthetic head not found (LAION's sa_0_4_vit_l_14_linear.pth)")
    state_dict = read_state_dict(path)
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    if shapes.keys() != {"weight", "bias"} or shapes["bias"] != (1,) or len(shapes["weight"]) != 2 \
            or shapes["weight"][0] != 1:
        raise ValueError(f"{path}: not a linear aesthetic head: expected keys weight (1, D) and bias (1,), found "
                         f"{shapes} (the MLP predictor v2 is not supported)")
    return AestheticHead(weight=state_dict["weight"].double().numpy()[0], bias=float(state_dict["bias"]),
                         source=str(path))


@dataclass
class Q16:
    """Q16 (Schramowski et al. 2022): CLIP zero-shot classification against two learned prompt embeddings."""
    prompts: np.ndarray  # (2, D): row 0 "non inappropriate", row 1 "inappropriate"
    source: str

    def __call__(self, image_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) image embeddings -> flagged (N,) bool, probability of "inappropriate" (N,): the softmax of
        100 cos(image, prompt) over the two prompts, flagged where "inappropriate" wins (Q16's argmax)."""
        check_dim(image_emb, self.prompts.shape[1], self.source)
        logits = 100 * normalised(image_emb) @ normalised(self.prompts).T  # (N, 2)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return probs.argmax(-1) == 1, probs[:, 1]


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain Python data only (Q16's prompts.p is a pickled array): any other object
    could run code while it loads."""
    RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array constructor, wherever this numpy version keeps it
    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "_reconstruct"): RECONSTRUCT,  # numpy 1 pickles
               ("numpy._core.multiarray", "_reconstruct"): RECONSTRUCT,  # numpy 2 pickles
               ("_codecs", "encode"): codecs.encode}  # how pickle protocol 2 stores bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are accepted")
        return self.ALLOWED[module, name]


def read_array(path: Path):
    """An array from .npy, .safetensors (one tensor), .pt/.pth (a tensor, or a dict of one, via torch's
    weights_only loader) or .p/.pkl (a pickled numpy array, as Q16 saves it)."""
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix in (".p", ".pkl"):
        with open(path, "rb") as f:
            return ArrayUnpickler(f).load()
    if path.suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    elif path.suffix == ".safetensors":
        obj = read_state_dict(path)
    else:
        raise ValueError(f"{path}: unknown file type {path.suffix!r} (expected .p, .pkl, .pt, .pth, .npy or "
                         ".safetensors)")
    if isinstance(obj, dict):
        if len(obj) != 1:
            raise ValueError(f"{path}: expected one tensor, found keys {sorted(obj)}")
        obj = next(iter(obj.values()))
    return obj.float().numpy() if isinstance(obj, torch.Tensor) else obj


def load_q16(path) -> Q16:
    """Q16's learned prompt embeddings for CLIP ViT-L/14 (its prompts.p, or the same (2, D) matrix as .pt, .npy or
    .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Q16 prompt embeddings not found (Q16's prompts.p for ViT-L/14)")
    try:
        prompts = np.asarray(read_array(path), np.float64)
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable Q16 prompt file ({str(e).strip().splitlines()[0]})") from None
    if prompts.ndim != 2 or len(prompts) != 2:
        raise ValueError(f"{path}: Q16 prompts must be a (2, D) matrix (non inappropriate, inappropriate), "
                         f"got shape {prompts.shape}")
    return Q16(prompts=prompts, source=str(path))


def check_dim(image_emb: np.ndarray, dim: int, source: str) -> None:
    if np.ndim(image_emb) != 2 or np.shape(image_emb)[1] != dim:
        raise ValueError(f"{source} expects image embeddings (N, {dim}), got {np.shape(image_emb)}: "
                         f"made for another CLIP model than the one given")
