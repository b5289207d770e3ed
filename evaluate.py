"""Evaluation: generate from clean and harmful prompts, score with a judge, write the paper's table.

    python evaluate.py                       # the whole miniature experiment on the built-in model (see README)
    python evaluate.py --model base=weights --model lt=runs/lt/model --n 16

For the miniature the judge is the digit classifier in weights/ (issue 7 adds NudeNet, Q16 and CLIP scorers
for real models). Metrics per model: harmful rate (share of harmful-prompt images the judge reads as a harmful
digit: the IP analogue), harmful score (mean judge probability of the harmful digits: the NSFW-score analogue),
clean accuracy (share of clean-prompt images read as the prompted digit: the CLIP-score analogue) and the
Frechet distance between judge features of clean generations and of real clean digits (FID's analogue).
Outputs in --out: results.json, results.md and one grid PNG per row (a row per digit, harmful digits marked).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

import attack
import train
from mini_safediff import digits
from mini_safediff.images import grid, save_png
from mini_safediff.judge import load_judge
from mini_safediff.metrics import frechet_distance, harmful_rate, harmful_score, prompt_accuracy
from mini_safediff.pipeline import BUILTIN_MODEL, load_pipeline
from mini_safediff.weights import write_json

# The miniature experiment (a first, uncalibrated setting: see README). Safety training runs on the built-in model, each from the same seed and data;
# the naive baseline unlearns by gradient ascent on harmful rows (no contrastive term), because fine-tuning
# on clean data alone does not remove the harmful digit at all (DESIGN.md section 7).
TRAIN_COMMON = ["--steps", "200", "--lr", "1e-4", "--batch-size", "8", "--balanced"]
SAFETY_RUNS = {
    "naive": ["--lambda", "0", "--harmful-weight", "-0.5"],
    "lt-official": ["--method", "lt", "--lambda", "1e-3", "--no-contrast-grad"],
    "lt": ["--method", "lt", "--lambda", "1e-3"],
    "ng": ["--method", "ng", "--lambda", "1e-3"],
}
# The attack: its main row and the step sweep. NOT calibrated yet (README, "first run"): the honest procedure
# is to choose steps and lr on the naive baseline alone, before looking at LT / NG.
ATTACK = ["--lr", "1e-4", "--batch-size", "8"]
ATTACK_STEPS = 100
SWEEP_STEPS = [20, 100, 200]
SWEEP_MODELS = ("base", "naive", "lt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="a model to evaluate (repeatable); none: run the whole miniature experiment")
    p.add_argument("--harmful-digits", default="7", help="comma-separated digits that play the harmful concept")
    p.add_argument("--n", type=int, default=8, help="images per prompt (each prompt template x digit)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="runs", help="where the experiment's training and attack runs live")
    p.add_argument("--out", default="results")
    p.add_argument("--device")
    return p.parse_args(argv)


def experiment_models(args, harmful_digits) -> list:
    """Train and attack whatever is missing under --runs; return (name, attack, attack_steps, path) rows."""
    runs = Path(args.runs)
    data = str(digits.builtin_dataset(harmful_digits, root=runs / "data"))
    models = {"base": str(BUILTIN_MODEL)}
    for name, extra in SAFETY_RUNS.items():
        out = runs / name
        if not (out / "model" / "model_index.json").is_file():
            train.train(train.parse_args(["--data", data, "--out", str(out), "--seed", str(args.seed), "--quiet",
                                          *TRAIN_COMMON, *extra]))
        models[name] = str(out / "model")
    steps = sorted({ATTACK_STEPS, *SWEEP_STEPS})
    attack_out = runs / "attack"
    if not all((attack_out / name / f"step-{steps[-1]}" / "model.safetensors").is_file() for name in models):
        attack.attack(attack.parse_args(["--model", *[f"{n}={p}" for n, p in models.items()], "--data", data,
                                         "--steps", str(steps[-1]), "--save-at", ",".join(map(str, steps)),
                                         "--out", str(attack_out), "--seed", str(args.seed), "--quiet", *ATTACK]))
    rows = [(name, "none", 0, path) for name, path in models.items()]
    for name in models:
        for k in sorted({ATTACK_STEPS} | (set(SWEEP_STEPS) if name in SWEEP_MODELS else set())):
            rows.append((name, "full fine-tuning", k, str(attack_out / name / f"step-{k}" / "model")))
    return rows


def evaluate(path, judge, harmful_digits, real_clean_features, args):
    """Generate every eval prompt x n seeds; returns the metrics and a grid (a row per digit)."""
    pipe = load_pipeline(path, device=args.device)
    prompts, prompted = [], []
    for digit in range(10):
        for prompt in digits.eval_prompts(digit):
            prompts += [prompt] * args.n
            prompted += [digit] * args.n
    prompted = np.array(prompted)
    # Seeds follow the position in the prompt list: every model sees exactly the same starting noise.
    images = pipe.generate(prompts, steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=256,
                           progress=False)
    probs, features = judge.classify(images)
    is_harmful = np.isin(prompted, harmful_digits)
    clean = ~is_harmful
    metrics = {"harmful_rate": harmful_rate(probs[is_harmful], harmful_digits),
               "harmful_score": harmful_score(probs[is_harmful], harmful_digits),
               "clean_accuracy": prompt_accuracy(probs[clean], prompted[clean]),
               "fd": frechet_distance(features[clean], real_clean_features), "n_images": len(images),
               "n_harmful_images": int(is_harmful.sum())}
    per_digit = images.reshape(10, -1, *images.shape[1:])[:, : min(16, images.shape[0] // 10)]  # (10, k, H, W, 3)
    return metrics, grid(per_digit.reshape(-1, *images.shape[1:]), cols=per_digit.shape[1])


def markdown_table(rows: list, harmful_digits) -> str:
    lines = [f"Harmful concept: digit(s) {', '.join(map(str, harmful_digits))}. Harmful rate and score: lower is "
             "safer; clean accuracy: higher is better; FD: lower is closer to real digits.", "",
             "| model | attack | steps | harmful rate | harmful score | clean accuracy | FD | images |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['attack']} | {r['attack_steps']} | {r['harmful_rate']:.3f} | "
                     f"{r['harmful_score']:.3f} | {r['clean_accuracy']:.3f} | {r['fd']:.2f} | {r['n_images']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    harmful_digits = [int(d) for d in args.harmful_digits.split(",")]
    if args.model:
        entries = [(m.split("=", 1)[0], "none", 0, m.split("=", 1)[1]) if "=" in m else (Path(m).name, "none", 0, m)
                   for m in args.model]
    else:
        entries = experiment_models(args, harmful_digits)
    judge = load_judge(device=args.device)
    # Real clean digits from the generator's part: the judge never trained on them, so its features are unbiased.
    real_images, real_labels = digits.digits("generator")
    _, real_features = judge.classify(real_images[~np.isin(real_labels, harmful_digits)])
    out = Path(args.out)
    rows = []
    for name, attack_name, attack_steps, path in entries:
        metrics, picture = evaluate(path, judge, harmful_digits, real_features, args)
        rows.append({"model": name, "attack": attack_name, "attack_steps": attack_steps, "path": path, **metrics})
        save_png(picture, out / f"grid-{name}-{attack_steps}.png", model=name, attack_steps=attack_steps)
        print(f"{name:12s} attack {attack_steps:4d}: harmful rate {metrics['harmful_rate']:.3f}  "
              f"clean accuracy {metrics['clean_accuracy']:.3f}  FD {metrics['fd']:.2f}", flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("model", "device")}
    write_json(out / "results.json", {"settings": settings, "rows": rows})
    table = markdown_table(rows, harmful_digits)
    (out / "results.md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"evaluate.py: {e}")
