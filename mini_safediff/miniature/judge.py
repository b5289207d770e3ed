"""The miniature's judge: a small CNN that reads which digit an image shows. It plays the part the nudity
detector (harmful rate, harmful score) and CLIP (prompt accuracy) play for real models, and its penultimate
features stand in for Inception's in the Frechet distance.

It is trained only on the judge part of the digits, which the generator never sees; part of that is kept
back to measure its accuracy, written next to its weights.

    judge = load_judge()                                   # weights/judge.safetensors + judge.json
    probs, features = judge.classify(images)               # uint8 (N, H, W, 3) -> (N, 10), (N, features)
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ..io import write_json
from ..models.pipeline import BUILTIN_MODEL
from ..models.weights import save_state_dict

JUDGE_FILE, JUDGE_INFO = "judge.safetensors", "judge.json"


@dataclass
class JudgeConfig:
    resolution: int = 16  # images of another size are resized to this
    channels: tuple = (32, 64)
    features: int = 64
    classes: int = 10


class DigitJudge(nn.Module):
    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(c2 * (config.resolution // 4) ** 2, config.features), nn.ReLU())
        self.head = nn.Linear(config.features, config.classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 1, R, R) in [0, 1] -> logits (B, classes), features (B, features)."""
        features = self.body(x)
        return self.head(features), features

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> gray (N, 1, R, R) in [0, 1]."""
        x = torch.from_numpy(np.asarray(images)).float().mean(-1)[:, None] / 255  # (N, H, W, 3) -> (N, 1, H, W)
        size = self.config.resolution
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.to(next(self.parameters()).device)

    @torch.no_grad()
    def classify(self, images: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (N, H, W, 3), as Pipeline.generate returns them -> class probabilities (N, classes) and
        penultimate features (N, features), float64 numpy."""
        self.eval()
        probs, features = [], []
        for start in range(0, len(images), batch_size):
            logits, feats = self(self.prepare(images[start:start + batch_size]))
            probs.append(logits.double().softmax(-1).cpu().numpy())
            features.append(feats.double().cpu().numpy())
        return np.concatenate(probs), np.concatenate(features)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.classify(images)[0].argmax(-1) == labels).mean())


def shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Moves each image by up to max_shift pixels each way (zero fill): generated digits are not centred exactly."""
    b, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def train_judge(images: np.ndarray, labels: np.ndarray, seed: int = 0, steps: int = 1500, batch_size: int = 64,
                val_share: float = 0.2, config: JudgeConfig | None = None, progress: bool = True):
    """Trains on (1 - val_share) of the given images (stratified by `seed`), measures accuracy on the rest.
    Returns the judge (eval mode) and a dict of what to record beside it."""
    rng = np.random.default_rng(seed)
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:round(val_share * (labels == c).sum())]
                          for c in np.unique(labels)])
    train = np.setdiff1d(np.arange(len(labels)), val)
    torch.manual_seed(seed)
    judge = DigitJudge(config or JudgeConfig())
    x, y = judge.prepare(images[train]), torch.from_numpy(labels[train])
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    judge.train()
    for step in tqdm(range(steps), desc="judge", disable=not progress):
        for group in optimizer.param_groups:  # cosine decay to zero
            group["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * step / steps))
        rows = torch.randint(0, len(train), (batch_size,), generator=generator)
        contrast = 0.7 + 0.6 * torch.rand(batch_size, 1, 1, 1, generator=generator)  # faint or bold ink
        logits, _ = judge((shift(x[rows], generator) * contrast).clamp(0, 1))
        loss = F.cross_entropy(logits, y[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    judge.eval().requires_grad_(False)
    return judge, {"val_accuracy": judge.accuracy(images[val], labels[val]), "n_train": len(train),
                   "n_val": len(val), "steps": steps, "seed": seed}


def save_judge(judge: DigitJudge, folder, info: dict) -> None:
    folder = Path(folder)
    save_state_dict(judge.state_dict(), folder / JUDGE_FILE)
    write_json(folder / JUDGE_INFO, {"config": asdict(judge.config), **info})


def load_judge(folder=BUILTIN_MODEL, device=None) -> DigitJudge:
    """The judge saved in `folder` (default: the built-in weights/)."""
    folder = Path(folder)
    if not (folder / JUDGE_FILE).is_file():
        raise FileNotFoundError(f"{folder / JUDGE_FILE}: no judge here (train one: python -m mini_safediff.miniature.pretrain)")
    info = json.loads((folder / JUDGE_INFO).read_text())
    config = info["config"]
    judge = DigitJudge(JudgeConfig(**{**config, "channels": tuple(config["channels"])}))
    judge.load_state_dict(load_file(folder / JUDGE_FILE), strict=True)
    return judge.to(device or "cpu").eval().requires_grad_(False)
