"""The prompt attack's driver, what `attack.py prompt` runs: UnlearnDiffAtk (unlearndiffatk.py) on every prompt of
every model. The unsafe --target-model first draws each prompt's target image; then each model is attacked on
each prompt and judged, and its results are written to --out/NAME/prompt_attack.json, the attack success rate
(ASR) of every model to --out/asr.md. The judge and the prompts are the caller's (they come from the evaluation
layer): `flagged(images uint8 (N, H, W, 3)) -> bool (N,)`, and prompts with .text, .seed and .guidance (None: the
run's own).
"""
import functools
import time
from pathlib import Path

import numpy as np

from ..io import write_json
from ..models.loading import load_pipeline
from .unlearndiffatk import UnlearnDiffAtkConfig, unlearn_diff_attack


def prompt_attack(args, models: list, prompts: list, flagged, dtype) -> list:
    """models: (name, path) pairs; args: `attack.py prompt`'s options. Returns each model's ASR row."""
    config = UnlearnDiffAtkConfig(args.tokens, args.iterations, args.timesteps, args.lr, args.weight_decay)

    def sample(pipe, text: str, prompt) -> np.ndarray:
        """One image of text, with the prompt's own seed and guidance where its file gives them."""
        return pipe.generate([text], steps=args.sampling_steps, seed=args.seed if prompt.seed is None else prompt.seed,
                             guidance=args.guidance if prompt.guidance is None else prompt.guidance,
                             progress=False)

    def judge_one(pipe, prompt, text: str) -> bool:
        return bool(flagged(sample(pipe, text, prompt))[0])

    reference = load_pipeline(args.target_model, device=args.device, dtype=dtype, prediction_type=args.prediction_type)
    targets = [sample(reference, prompt.text, prompt)[0] for prompt in prompts]
    targets_flagged = flagged(np.stack(targets)).tolist()
    del reference
    print(f"{len(prompts)} prompts; the reference's targets flagged by the judge: {sum(targets_flagged)}")

    rows = []
    for name, path in models:
        pipe = load_pipeline(path, device=args.device, dtype=dtype, unet=args.unet,
                             prediction_type=args.prediction_type)
        results, started = [], time.time()
        for i, (prompt, target) in enumerate(zip(prompts, targets)):
            began = time.time()
            is_harmful = functools.partial(judge_one, pipe, prompt)
            result = unlearn_diff_attack(pipe, prompt.text, target, is_harmful, config, seed=args.seed + i,
                                         progress=not args.quiet)
            results.append({"prompt": prompt.text, "adversarial_prompt": result.adversarial_prompt,
                            "success": result.success, "step": result.step, "target_flagged": targets_flagged[i],
                            "seconds": round(time.time() - began, 1), "losses": result.losses})
            print(f"{name} {i + 1}/{len(prompts)}: " + (f"success at step {result.step}" if result.success else
                                                        "no success") + f": {result.adversarial_prompt!r}", flush=True)
        successes = [r for r in results if r["success"]]
        row = {"model": name, "path": path, "asr": len(successes) / len(results), "successes": len(successes),
               "unattacked": sum(r["step"] == 0 for r in successes), "prompts": len(results),
               "seconds": round(time.time() - started, 1)}
        write_json(Path(args.out) / name / "prompt_attack.json", {
            **row, "unet": args.unet, "target_model": args.target_model, "judge": args.judge,
            "settings": {key: value for key, value in vars(args).items() if key not in ("model", "out", "quiet")},
            "results": results})
        rows.append(row)
    table = asr_table(rows, config)
    Path(args.out, "asr.md").write_text(table)
    print(table)
    return rows


def asr_table(rows: list, config: UnlearnDiffAtkConfig) -> str:
    lines = [(f"UnlearnDiffAtk: k = {config.tokens} prepended tokens, {config.iterations} iterations x "
              f"{config.timesteps} timesteps, Adam lr {config.lr}. ASR: share of prompts whose image the judge "
              "flagged, before (step 0) or during the attack."), "",
             "| model | ASR | successes | of them unattacked (step 0) | prompts | seconds |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['asr']:.3f} | {r['successes']} | {r['unattacked']} | {r['prompts']} | "
              f"{r['seconds']} |" for r in rows]
    return "\n".join(lines) + "\n"
