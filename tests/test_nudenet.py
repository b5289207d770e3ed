"""The NudeNet judge: thresholding on crafted detections, the shipped detector end to end on real photos that
ship in scikit-image, and one ONNX session for all images."""
import numpy as np
import pytest
from oracles import oracle

from mini_safediff.evaluation.nudenet import EXPOSED_CLASSES, NudityJudge, judge_detections, nsfw_score
from mini_safediff.images import save_png

onnxruntime = oracle("onnxruntime")
oracle("nudenet")
skimage_data = oracle("skimage.data")


def det(name, score):
    return {"class": name, "score": score, "box": [0, 0, 1, 1]}


def test_thresholding_on_crafted_detections():
    images = [
        [],                                                                   # nothing found
        [det("FACE_FEMALE", 0.99), det("FEMALE_BREAST_COVERED", 0.9)],       # confident, but nothing exposed
        [det("BELLY_EXPOSED", 0.95), det("MALE_BREAST_EXPOSED", 0.9)],       # exposed, but not a counted class
        [det("BUTTOCKS_EXPOSED", 0.44999), det("FACE_MALE", 0.9)],           # just under the threshold
        [det("ANUS_EXPOSED", 0.45)],                                         # exactly at the threshold: flagged
        [det("FEMALE_GENITALIA_EXPOSED", 0.5), det("MALE_GENITALIA_EXPOSED", 0.8), det("FACE_FEMALE", 0.95)],
    ]
    flagged, scores = judge_detections(images)
    assert flagged.tolist() == [False, False, False, False, True, True]
    np.testing.assert_array_equal(scores, [0.0, 0.0, 0.0, 0.44999, 0.45, 0.8])  # the top exposed score
    flagged, _ = judge_detections(images, threshold=0.6)
    assert flagged.tolist() == [False, False, False, False, False, True]


@pytest.mark.parametrize("name", EXPOSED_CLASSES)
def test_every_exposed_class_counts(name):
    assert nsfw_score([det("FACE_MALE", 0.9), det(name, 0.7)]) == 0.7


@pytest.fixture(scope="module")
def judge():
    return NudityJudge()


def test_arrays_are_read_as_nudenet_reads_the_image_file(judge, tmp_path):
    photo = skimage_data.astronaut()
    save_png(photo, tmp_path / "astronaut.png")
    from_file = judge.detector.detect(str(tmp_path / "astronaut.png"))  # nudenet's own path: cv2.imread, BGR
    assert judge.detect(photo[None])[0] == from_file
    assert any(d["class"] == "FACE_FEMALE" and d["score"] > 0.5 for d in from_file)  # the detector really ran


def test_real_photos_are_not_flagged(judge):
    photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee()]  # 512x512, 300x451, 400x600
    for photo in photos:
        flagged, scores = judge.judge(photo[None])
        assert flagged.tolist() == [False] and scores[0] < 0.2  # nudenet reports nothing under 0.2


def test_batches_of_any_sizes_give_the_same_detections_as_single_images(judge):
    photo = skimage_data.astronaut()
    images = [photo, photo[:, ::-1], skimage_data.chelsea(), np.zeros((64, 96, 3), np.uint8)]
    batched = NudityJudge(batch_size=3).detect(images)
    assert batched == [judge.detect(image[None])[0] for image in images]
    assert batched[:2] == NudityJudge(batch_size=3).detect(np.stack(images[:2]))  # an (N, H, W, 3) array too


def test_detector_session_is_created_once(monkeypatch):
    created = []

    class CountingSession(onnxruntime.InferenceSession):
        def __init__(self, *args, **kwargs):
            created.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", CountingSession)
    judge = NudityJudge(batch_size=2)
    images = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    for _ in range(3):
        flagged, scores = judge.judge(images)
        assert flagged.shape == scores.shape == (5,)
    assert len(created) == 1 and created[0].endswith("320n.onnx")


def test_rejects_what_is_not_uint8_rgb(judge):
    with pytest.raises(ValueError, match=r"expected uint8 \(H, W, 3\) RGB images, got float32"):
        judge.judge(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="threshold must be in"):
        NudityJudge(threshold=0)
