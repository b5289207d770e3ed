"""A user's day on the built-in model: nothing fails silently, every message names the problem and its fix, the
Python API answers as diffusers' does. One test (or a few) per promise of docs/reliability.md's user section."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import write_data
from PIL import Image

import mini_safediff as msd
from mini_safediff.io import owned_folder
from mini_safediff.models.weights import WeightsError
from mini_safediff.training.data import SafetyDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import attack  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402


def script(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert process.poll() is None, f"it ended first: {process.communicate()}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def test_two_trainings_on_one_out_the_second_refuses(tmp_path):
    out = tmp_path / "conc"
    first = script("train.py", "--preset", "miniature", "--steps", "10000", "--quiet", "--out", str(out))
    try:
        wait_for(out / "log.jsonl", first)
        with pytest.raises(ValueError, match=rf"{re.escape(str(out))} is in use by process {first.pid} \(train.py\): "
                                             "wait until it ends, or choose another --out"):
            train.main(["--preset", "miniature", "--steps", "2", "--quiet", "--out", str(out)])
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # killed: its lock went with it, and the next run takes the folder over (and resumes its checkpoint if any)
    train.main(["--preset", "miniature", "--steps", "1", "--quiet", "--out", str(out), "--resume"])
    assert not (out / ".lock").exists()


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".lock").write_text("process 999999 (train.py)\n")
    with owned_folder(tmp_path / "out", "test"):
        assert f"process {os.getpid()} (test)" in (tmp_path / "out" / ".lock").read_text()
    assert list((tmp_path / "out").iterdir()) == []
    with owned_folder(tmp_path / "new", "test"):
        pass
    assert not (tmp_path / "new").exists()  # made for the claim, nothing written: gone again


def test_data_without_harmful_rows_names_the_file_and_the_counts(tmp_path):
    data = write_data(tmp_path / "data", [1, 1, 1])
    with pytest.raises(ValueError, match=rf"--method lt trains the model away from harmful rows: "
                                         rf"{re.escape(str(data / 'metadata.jsonl'))} has 3 rows, none of them harmful"):
        train.main(["--data", str(data), "--steps", "1", "--quiet", "--out", str(tmp_path / "out")])


def test_a_judge_that_cannot_run_is_an_error_unless_skipping_is_asked_for(tmp_path, model, monkeypatch, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a prompt\n")
    argv = ["--judge", "q16", "--prompts", str(prompts), "--model", f"tiny={model}", "--n", "1",
            "--sampling-steps", "1", "--quiet", "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"--judge q16: needs the CLIP weights \(--clip\) .* --skip-missing-judges"):
        evaluate.main(argv)
    assert not (tmp_path / "out" / "images").exists()  # refused before any image was made
    from mini_safediff.evaluation import real

    def no_nudenet(threshold):
        raise ImportError('the NudeNet judge needs the `nudenet` package: pip install -e ".[eval]" in the repository')
    monkeypatch.setattr(real, "NudityJudge", no_nudenet)
    with pytest.raises(ValueError, match=r'--judge nudenet: .* pip install -e "\.\[eval\]"'):
        evaluate.main(["--judge", "nudenet", *argv[2:]])
    evaluate.main([*argv, "--skip-missing-judges"])
    assert "--judge q16: needs the CLIP weights" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]["harmful_rate"] is None


def test_long_work_shows_progress_unless_quiet(tmp_path, capsys):
    from mini_safediff import sample

    evaluate.main(["--model", f"base={msd.BUILTIN_MODEL}", "--n", "1", "--n-harmful", "1", "--sampling-steps", "2",
                   "--out", str(tmp_path / "a")])
    assert "sampling (DDIM)" in capsys.readouterr().err
    sample.main(["--prompt", "a seven", "--n", "1", "--sampling-steps", "2", "--out", str(tmp_path / "b")])
    assert "sampling (DDIM)" in capsys.readouterr().err
    sample.main(["--prompt", "a seven", "--n", "1", "--sampling-steps", "2", "--quiet", "--out", str(tmp_path / "c")])
    assert "sampling" not in capsys.readouterr().err


def test_a_training_checkpoint_given_as_a_model_says_what_it_is(tmp_path):
    out = tmp_path / "run"
    train.main(["--preset", "miniature", "--steps", "1", "--quiet", "--out", str(out)])
    with pytest.raises(WeightsError, match=rf"checkpoint.pt: a training checkpoint of train.py / attack.py .*step 1"
                                           rf".*the finished model is {re.escape(str(out / 'model'))}$"):
        msd.load_pipeline(out / "checkpoint.pt")


def test_an_image_folder_without_classes_points_to_harmful_only_data(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(3):
            Image.new("RGB", (16, 16)).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": "a caption"}) + "\n")
    with pytest.raises(ValueError, match=r'no row has a "class" .* attack.py takes it as --harmful-only-data'):
        SafetyDataset(folder, 16)


@pytest.mark.parametrize("argv, message", [
    (["train.py", "--lr", "abc"], "argument --lr: must be a finite number > 0, got abc"),
    (["attack.py", "--save-at", "0,1,abc"], "argument --save-at: must be comma-separated whole numbers >= 0"),
    (["train.py", "--out", ""], "argument --out: must name a folder, got an empty string"),
    (["attack.py", "prompt", "--out", " "], "argument --out: must name a folder"),
    (["evaluate.py", "--out", ""], "argument --out: must name a folder"),
    (["evaluate.py", "--steps", "5"], "--steps: use --sampling-steps here \\(sampler steps; --steps means optimizer"),
    (["-m", "mini_safediff.sample", "--prompt", "x", "--steps", "5"], "--steps: use --sampling-steps here"),
    (["attack.py", "prompt", "--steps", "5"], "--steps: use --sampling-steps here"),
    (["attack.py", "prompt", "--reference", "weights"], "--reference: use --target-model here \\(the unsafe model"),
    (["attack.py", "--judge", "nudenet"], "--judge is an option of the prompt attack: python attack.py prompt"),
])
def test_bad_options_name_the_option_and_the_fix(argv, message):
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and re.search(message, done.stderr), done.stderr
    assert "Traceback" not in done.stderr


def test_a_resume_with_changed_settings_names_the_options_as_typed(tmp_path):
    out = str(tmp_path / "run")
    train.main(["--preset", "miniature", "--steps", "1", "--quiet", "--out", out])
    with pytest.raises(ValueError, match=r"--lambda: 0.003 in the checkpoint, 0.001 now"):
        train.main(["--preset", "miniature", "--steps", "2", "--lambda", "1e-3", "--quiet", "--out", out, "--resume"])


@pytest.mark.parametrize("argv, line", [
    (["-m", "mini_safediff.sample", "--prompt", "x", "--n", "512", "--sampling-steps", "999"],
     "sample: interrupted; no image was written"),
    (["evaluate.py", "--model", "base=weights", "--n", "64", "--sampling-steps", "999"],
     "evaluate.py: interrupted; the same command continues where it stopped"),
])
def test_ctrl_c_stops_with_one_line(tmp_path, argv, line):
    process = script(*argv, "--out", str(tmp_path / "out"))
    time.sleep(10)  # past the imports and the model's loading: into the sampling loop
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1 and line in err and "Traceback" not in err, err


def test_the_built_in_data_goes_under_out_and_nothing_into_the_working_folder(tmp_path):
    train.main(["--preset", "miniature", "--steps", "1", "--quiet", "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "builtin-data" / "digits-7" / "metadata.jsonl").is_file()
    attack.main(["--steps", "1", "--quiet", "--out", str(tmp_path / "attack")])
    assert (tmp_path / "attack" / "builtin-data" / "digits-7" / "metadata.jsonl").is_file()
    assert sorted(path.name for path in Path.cwd().iterdir()) == ["attack", "run"]  # the tests' working folder


def test_help_shows_no_machine_path_and_no_joined_lines(capsys):
    for parser in (train.make_parser([]), attack.make_parser([]), attack.make_parser(["prompt"]),
                   evaluate.make_parser()):
        text = parser.format_help()
        assert str(ROOT) not in text
        assert max(map(len, text.splitlines())) <= 120, [line for line in text.splitlines() if len(line) > 120]


def test_the_readme_python_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("From Python, the built-in model works as a diffusers pipeline does:")[1]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    assert np.asarray(Image.open(tmp_path / "seven.png")).shape == (128, 128, 3)


def test_the_pipeline_answers_as_diffusers_does():
    pipe = msd.load_pipeline(device="cpu", dtype="float32")  # from the tests' working folder, not the repository
    out = pipe(["a seven", "a two"], num_inference_steps=2, guidance_scale=5.0, num_images_per_prompt=2, seed=3,
               progress=False)
    assert len(out.images) == 4 and all(isinstance(image, Image.Image) for image in out.images)
    arrays = pipe.generate(["a seven", "a seven", "a two", "a two"], steps=2, guidance=5.0, seed=3, progress=False)
    assert np.array_equal(np.stack([np.asarray(image) for image in out.images]), arrays)  # the same images
    assert pipe.to("bfloat16").dtype == torch.bfloat16 and pipe.to("cpu", torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype 'float61': choose float32, float16, bfloat16"):
        msd.load_pipeline(dtype="float61")
