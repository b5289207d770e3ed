"""The prompt attack's driver, what `attack.py prompt` runs: UnlearnDiffAtk (unlearndiffatk.py) on every prompt of
every model. The unsafe --target-model first draws each prompt's target image; then each model is attacked on
each prompt and judged, and its results are written to --out/NAME/prompt_attack.json, the attack success rate
(ASR) of every model to --out/asr.md. The judge, the prompts and the broken-model check are the caller's (they come
from the evaluation layer): `flagged(images uint8 (N, H, W, 3)) -> bool (N,)`, prompts with .text, .seed and
.guidance (None: the run's own), and `broken(pipe, images) -> why the model is broken, or None`.
"""
import time
from pathlib import Path

import numpy as np

from ..io import write_json
from ..models.loading import load_pipeline
from .unlearndiffatk import UnlearnDiffAtkConfig, unlearn_diff_attack


def prompt_attack(args, models: list, prompts: list, flagged, broken, dtype) -> list:
    """models: (name, path) pairs; args: `attack.py prompt`'s options. Returns each model's ASR row."""
    config = UnlearnDiffAtkConfig(args.tokens, args.iterations, args.timesteps, args.lr, args.weight_decay)

    def refuse_broken(named: str, pipe, images=()) -> None:
        """The judge finds nothing harmful in a blank image: a broken model would score as safe as can be."""
        reason = broken(pipe, images)
        if reason:
            raise ValueError(f"{named}: {reason}: the model is broken, its images cannot be judged")

    def load(path: str, unet=None):
        return load_pipeline(path, device=args.device, dtype=dtype, unet=unet, prediction_type=args.prediction_type)

    def sample(pipe, text: str, prompt) -> np.ndarray:
        """One image of text, with the prompt's own seed and guidance where its file gives them."""
        return pipe.generate([text], steps=args.sampling_steps, seed=args.seed if prompt.seed is None else prompt.seed,
                             guidance=args.guidance if prompt.guidance is None else prompt.guidance,
                             progress=False)

    def check(name: str, path: str, size: int) -> None:
        """What would stop the attack of a model, found before any image is made (then: freed)."""
        pipe = load(path, args.unet)
        if pipe.is_sdxl:  # unlearn_diff_attack refuses it too, but only once a prompt is not flagged unattacked
            raise ValueError(f"--model {name}: UnlearnDiffAtk is implemented for SD 1 / 2 (one text encoder), not "
                             "SDXL")
        if resolution(pipe) != size:
            raise ValueError(f"--model {name} draws {resolution(pipe)} px images, --target-model {size} px ones: "
                             "the targets must be of the attacked model's resolution")
        refuse_broken(f"--model {name}", pipe)

    reference = load(args.target_model)
    refuse_broken(f"--target-model {args.target_model}", reference)
    for name, path in models:
        check(name, path, resolution(reference))
    targets = [sample(reference, prompt.text, prompt)[0] for prompt in prompts]
    refuse_broken(f"--target-model {args.target_model}", reference, targets)
    targets_flagged = flagged(np.stack(targets)).tolist()
    del reference
    print(f"{len(prompts)} prompts; the reference's targets flagged by the judge: {sum(targets_flagged)}")

    rows = []
    for name, path in models:
        pipe, results, started = load(path, args.unet), [], time.time()
        # Every prompt is judged unattacked first (UnlearnDiffAtk's step 0), so that a model whose images all come
        # out blank is refused before any optimisation (its non-finite losses would break the attack's projection).
        unattacked = [sample(pipe, prompt.text, prompt)[0] for prompt in prompts]
        refuse_broken(f"--model {name}", pipe, unattacked)
        unattacked_flagged = flagged(np.stack(unattacked)).tolist()
        for i, (prompt, target) in enumerate(zip(prompts, targets)):
            began = time.time()

            def is_harmful(text: str, prompt=prompt, unattacked=unattacked_flagged[i]) -> bool:
                return unattacked if text == prompt.text else bool(flagged(sample(pipe, text, prompt))[0])
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


def resolution(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor
