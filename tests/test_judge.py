"""The miniature's judge: the shipped one reads real digits it never saw; training it is deterministic."""
import json

import numpy as np
import torch

from mini_safediff.miniature import digits
from mini_safediff.miniature.judge import load_judge, save_judge, train_judge
from mini_safediff.models.pipeline import BUILTIN_MODEL


def test_shipped_judge_reads_unseen_digits():
    judge = load_judge()
    info = json.loads((BUILTIN_MODEL / "judge.json").read_text())
    assert info["val_accuracy"] >= 0.95
    images, labels = digits.digits("generator")  # the judge trained on the other part only
    probs, features = judge.classify(images)
    assert probs.shape == (len(labels), 10) and features.shape == (len(labels), judge.config.features)
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-9)
    assert (probs.argmax(-1) == labels).mean() >= 0.95
    big = np.repeat(np.repeat(images[:200], 2, axis=1), 2, axis=2)  # other sizes are resized first
    assert judge.accuracy(big, labels[:200]) >= 0.9


def test_train_judge_is_deterministic(tmp_path):
    images, labels = digits.digits("judge")
    first, info = train_judge(images, labels, seed=3, steps=3, progress=False)
    second, _ = train_judge(images, labels, seed=3, steps=3, progress=False)
    assert info["n_train"] + info["n_val"] == len(labels)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    save_judge(first, tmp_path, info)
    loaded = load_judge(tmp_path)
    np.testing.assert_array_equal(loaded.classify(images[:10])[0], first.classify(images[:10])[0])
