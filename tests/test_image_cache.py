"""The evaluation image cache: a cached image is what pipe.generate makes for its prompt, seed and batch; batches
are fixed, so only those lacking an image (missing or stale) are made again; per-row seeds and guidance are
honoured; processes share the batches; new weights at the same path are never served old images."""
import copy

import numpy as np
import pytest
import torch

import mini_safediff as msd
from mini_safediff.evaluation import image_cache
from mini_safediff.evaluation.image_cache import fingerprint, folder_images, generate_missing, image_jobs, read_image
from mini_safediff.evaluation.prompts import Prompt
from mini_safediff.images import read_png_text


@pytest.fixture(scope="module")
def pipe(model):
    return msd.load_pipeline(model, device="cpu")


def test_jobs_take_row_seed_and_guidance_or_the_defaults(tmp_path):
    prompts = [Prompt("a", index=0), Prompt("b", seed=1000, guidance=9.0, index=3), Prompt("c", index=7)]
    jobs = image_jobs(prompts, tmp_path, n=2, seed=10, guidance=7.5, steps=4, model="m", weights="w")
    assert [(j.path.name, j.prompt, j.seed, j.guidance) for j in jobs] == [
        ("00000-10.png", "a", 10, 7.5), ("00000-11.png", "a", 11, 7.5),
        ("00003-1000.png", "b", 1000, 9.0), ("00003-1001.png", "b", 1001, 9.0),
        ("00007-24.png", "c", 24, 7.5), ("00007-25.png", "c", 25, 7.5)]  # seed + n * index + j: stable under filters


def test_cached_images_equal_generate_and_are_reused(pipe, tmp_path, monkeypatch):
    prompts = [Prompt("a cat", index=0), Prompt("a nude", seed=77, guidance=3.0, index=1), Prompt("x", index=2)]
    jobs = image_jobs(prompts, tmp_path, n=2, seed=5, guidance=7.5, steps=2, model="tiny", weights="w")
    assert generate_missing(pipe, jobs, batch_size=1) == 6
    for job in jobs:
        expected = pipe.generate([job.prompt], steps=2, guidance=job.guidance, seed=job.seed, progress=False)[0]
        np.testing.assert_array_equal(read_image(job.path), expected)  # the seed's noise; PNG is lossless
        assert read_png_text(job.path) == {"prompt": job.prompt, "seed": str(job.seed),
                                           "guidance": str(job.guidance), "steps": "2", "model": "tiny", "weights": "w"}
    made = []
    monkeypatch.setattr(image_cache, "save_png", lambda image, path, **text: made.append(path))
    assert generate_missing(pipe, jobs, batch_size=3) == 0 and made == []
    jobs[4].path.unlink()
    stale = image_jobs(prompts, tmp_path, n=2, seed=5, guidance=7.5, steps=3, model="tiny", weights="w")[2]  # other step count
    # batches of 3 per (guidance, steps): [0, 1, 4], [5] at 7.5; [2, 3] at 3.0; the stale one alone at 3 steps
    assert generate_missing(pipe, jobs[:2] + [stale] + jobs[3:], batch_size=3) == 4
    assert made == [jobs[0].path, jobs[1].path, jobs[4].path, stale.path]


def test_batches_are_fixed_chunks_per_guidance(pipe, tmp_path):
    prompts = [Prompt("a", index=0), Prompt("b", guidance=3.0, index=1), Prompt("c", index=2)]
    jobs = image_jobs(prompts, tmp_path, n=2, seed=0, guidance=7.5, steps=1, model="tiny", weights="w")
    made = image_cache.batches(jobs, 3)
    assert [[jobs.index(job) for job in batch] for batch in made] == [[0, 1, 4], [5], [2, 3]]
    generate_missing(pipe, jobs, batch_size=3)
    for batch in made:  # each image is what its batch makes
        images = pipe.generate([job.prompt for job in batch], steps=1, guidance=batch[0].guidance,
                               latents=image_cache.start_noise(pipe, [job.seed for job in batch]), progress=False)
        np.testing.assert_array_equal(np.stack([read_image(job.path) for job in batch]), images)


def test_processes_share_the_batches(pipe, tmp_path):
    jobs = image_jobs([Prompt("a", index=0), Prompt("b", index=1)], tmp_path, n=3, seed=0, guidance=7.5, steps=1,
                      model="tiny", weights="w")
    assert generate_missing(pipe, jobs, batch_size=2, rank=1, world_size=2) == 2  # batch [2, 3] of [0, 1] [2, 3] [4, 5]
    assert [job.is_cached() for job in jobs] == [False, False, True, True, False, False]
    assert generate_missing(pipe, jobs, batch_size=2, rank=0, world_size=2) == 4
    assert all(job.is_cached() for job in jobs)


def test_folders_and_unreadable_images_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent: no such image folder"):
        folder_images(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png.tmp").write_text("x")  # what an interrupted atomic write leaves
    with pytest.raises(FileNotFoundError, match="holds no PNG or JPEG image"):
        folder_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert folder_images(tmp_path) == [tmp_path / "broken.png"]
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        read_image(tmp_path / "broken.png")


def test_new_weights_at_the_same_path_make_new_images(pipe, tmp_path):
    prompts = [Prompt("a", index=0)]
    old = image_jobs(prompts, tmp_path, n=2, seed=0, guidance=7.5, steps=1, model="same/path", weights=fingerprint(pipe))
    generate_missing(pipe, old, batch_size=2)
    before = [read_image(job.path) for job in old]
    changed = copy.deepcopy(pipe)
    with torch.no_grad():
        changed.unet.conv_out.bias.add_(1.0)
    assert fingerprint(changed) != fingerprint(pipe) and fingerprint(copy.deepcopy(pipe)) == fingerprint(pipe)
    new = image_jobs(prompts, tmp_path, n=2, seed=0, guidance=7.5, steps=1, model="same/path",
                     weights=fingerprint(changed))
    assert not any(job.is_cached() for job in new)
    assert generate_missing(changed, new, batch_size=2) == 2
    assert all(job.is_cached() for job in new) and not any(job.is_cached() for job in old)
    assert any((read_image(job.path) != image).any() for job, image in zip(new, before))
