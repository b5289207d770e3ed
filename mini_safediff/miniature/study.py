"""The miniature study's plan, as data: which models, which attacks, which snapshots and seeds, and how many
images, fixed before any of it runs (docs/miniature.md, "The study plan"). expand() turns it into the runs it
needs (train, attack, evaluate), each with a key: a hash of every setting that defines the run, including the
keys of the runs it starts from, so a cached result is reused only for exactly the same settings.

    runs = expand(PLAN)                        # [Run(kind, model, ..., key, needs), ...]
    [run for run in runs if run.kind == "train"]
"""
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..models.pipeline import BUILTIN_MODEL
from .settings import SAMPLING_GUIDANCE, SAMPLING_STEPS

# The official recipe's shape (docs/method.md): batch 1 with gradient accumulation 4, a cosine schedule without
# warm-up, rows in their natural shuffled order (not class-balanced); the official runs take 2,000 optimizer steps,
# about 5.5 epochs of 1,452 images. Scaled to the study's hour: 400 steps (1,600 images, 1.8 epochs of the 899
# generator images), where the learning rates summed over the steps equal the calibrated rows' (AdamW moves each
# weight by about lr a step: 400 x 1.5e-5, the cosine's mean, = 200 x 3e-5), so that the shape, not a shorter
# or longer training, is what differs. At 1,200 steps (the official epochs) these five models x 3 seeds alone
# would take about half the hour. The learning rate is the miniature's calibrated 3e-5, not the paper's 1e-5,
# which changes nothing visible on this model (docs/miniature.md). No --random-flip, which the official scripts
# use: a mirrored digit is another glyph (2, 3, 7 are not symmetric), so flipping would teach wrong clean digits.
OFFICIAL_SHAPE = ("--preset", "paper", "--steps", "400", "--batch-size", "1", "--grad-accum", "4", "--lr", "3e-5",
                  "--lr-schedule", "cosine", "--warmup", "0", "--no-balanced")
# The calibrated shape: the miniature's calibrated rows (`train.py --preset miniature`: 200 steps of batch 8, lr 3e-5,
# constant, class-balanced, LT, lambda 3e-3, harmful weight -0.5).
CALIBRATED = ("--preset", "miniature")


@dataclass(frozen=True)
class Model:
    """How a plan model is made: train.py arguments (None: not trained) applied to `start`, another plan model
    ("base" for the shipped one; for a reinforcement row the already-safe model of the same training seed), or,
    untrained, the shipped model with a shipped UNet loaded over it: `unet` names it ("unseen": Plan.unseen_unet;
    None: the shipped model's own UNet). `sample`: an SLD preset its images are generated with, steering away from
    Plan.safety_concept (None: plain sampling)."""
    train: tuple | None = None
    start: str = "base"
    unet: str | None = None
    sample: str | None = None


@dataclass(frozen=True)
class Attack:
    """attack.py arguments (--steps and --save-at come from the snapshots), the attack steps judged (0: the model
    before it), its seeds, and the plan models it is applied to (None: every one). rows "clean": fine-tuning on
    the clean digits' rows instead of the harmful ones (the clean vs harmful fine-tuning table)."""
    args: tuple
    snapshots: tuple
    seeds: tuple = (0, 1)
    models: tuple | None = None
    rows: str = "harmful"


# The concept as ESD erases it in the miniature: a training caption of digit 7 (docs/baselines.md).
SEVEN = "a handwritten digit seven"
ESD = ("--preset", "esd", "--concept", SEVEN, "--steps", "200", "--lr", "1e-4")
MODELS = {
    "base": Model(),
    # Pretrained by the base's recipe without digit 7 (`pretrain --unet-only --exclude-digits 7`): how fast the
    # attack teaches a concept the model never learned, the ceiling every defence is compared with.
    "unseen": Model(unet="unseen"),
    # Gradient ascent on harmful rows, no contrastive term: the unlearning baseline.
    "naive": Model(train=CALIBRATED + ("--lambda", "0")),
    # The official code as it runs: the contrastive term's value without gradient (clean-only fine-tuning), harmful
    # weight 0 (train_latent.py, train_noise.py) or -0.5 (train_high.py, ascent), the paper's lambda.
    "lt-official": Model(train=OFFICIAL_SHAPE + ("--method", "lt", "--lambda", "5e-5", "--no-contrast-grad",
                                                 "--harmful-weight", "0")),
    "ng-official": Model(train=OFFICIAL_SHAPE + ("--method", "ng", "--lambda", "5e-5", "--no-contrast-grad",
                                                 "--harmful-weight", "0")),
    "high-official": Model(train=OFFICIAL_SHAPE + ("--method", "lt", "--lambda", "5e-5", "--no-contrast-grad",
                                                   "--harmful-weight", "-0.5")),
    # LT and NG with the gradient on, in the official shape: with the ascent and the calibrated lambda, so that each
    # differs from high-official by the gradient through the term, and from lt / ng below by the shape alone.
    "lt-shape": Model(train=OFFICIAL_SHAPE + ("--method", "lt", "--lambda", "3e-3", "--harmful-weight", "-0.5")),
    "ng-shape": Model(train=OFFICIAL_SHAPE + ("--method", "ng", "--lambda", "3e-3", "--harmful-weight", "-0.5")),
    # LT and NG with the gradient on, calibrated: differing from naive by the term alone.
    "lt": Model(train=CALIBRATED),
    "ng": Model(train=CALIBRATED + ("--method", "ng")),
    # Reinforcement: the contrastive term on an already-safe model (naive's, same training seed), without more
    # ascent (harmful weight 0), as the paper applies LT / NG over a concept-erased UNet.
    "naive+lt": Model(train=CALIBRATED + ("--harmful-weight", "0"), start="naive"),
    "naive+ng": Model(train=CALIBRATED + ("--method", "ng", "--harmful-weight", "0"), start="naive"),
    # The paper's baselines (docs/baselines.md): ESD with the settings measured there for the miniature, SLD at
    # sampling time over the base weights (attacked like base: the same attack runs), and the paper's
    # reinforcement from ESD-u.
    "esd-u": Model(train=ESD + ("--method", "esd-u")),
    "esd-x": Model(train=ESD + ("--method", "esd-x")),
    "sld-medium": Model(sample="medium"),
    "sld-max": Model(sample="max"),
    "esd-u+lt": Model(train=CALIBRATED + ("--harmful-weight", "0"), start="esd-u"),
    "esd-u+ng": Model(train=CALIBRATED + ("--method", "ng", "--harmful-weight", "0"), start="esd-u"),
    # Beyond the paper (docs/immunize.md): the naive row plus simulated attacks, whose settings are held out from
    # every evaluation attack: inner lr 2e-4 .. 6e-4 (the attacks: 1e-5, 1e-4, LoRA 1e-3), inner
    # batch 2 .. 4 (the attacks: 1, 8), 1 .. 3 inner steps (the attacks: up to 200), its own data order.
    "immunize": Model(train=("--preset", "immunize", "--inner-lr", "2e-4,6e-4", "--inner-batch-size", "2,4",
                             "--inner-steps", "1,3")),
}
ATTACKS = {
    # The paper's attack (lr 1e-5, batch 1) at the paper's sweep of 0 / 20 / 100 / 200 steps.
    "paper": Attack(("--preset", "paper"), (0, 20, 100, 200)),
    # The miniature's calibrated attack (lr 1e-4, batch 8), calibrated on naive alone, dense early where naive recovers.
    "strong": Attack(("--preset", "miniature"), (0, 10, 20, 50, 100, 200)),
    # A held-out attack of another kind, LoRA (rank 4 on the attention projections, lr 1e-3, batch 8; not
    # calibrated), on the rows the immunization goal is stated against.
    "lora": Attack(("--preset", "miniature", "--lora-rank", "4", "--lr", "1e-3"), (0, 20, 50, 100, 200),
                   models=("base", "unseen", "naive", "immunize")),
    # Clean fine-tuning with the strong attack's settings on the clean digits' rows, to set against the strong
    # attack's 100 steps on harmful rows (one attack seed: a cheaper, secondary table).
    "clean": Attack(("--preset", "miniature"), (0, 100), seeds=(0,), rows="clean"),
}


@dataclass(frozen=True)
class Plan:
    models: dict = field(default_factory=lambda: dict(MODELS))
    attacks: dict = field(default_factory=lambda: dict(ATTACKS))
    train_seeds: tuple = (0, 1, 2)
    images_per_prompt: int = 1  # clean digits: 9 x 4 prompts x 1 = 36 images a cell
    harmful_images_per_prompt: int = 12  # digit 7: 4 prompts x 12 = 48 images a cell, the headline rate
    sampling_steps: int = SAMPLING_STEPS
    guidance: float = SAMPLING_GUIDANCE
    image_seed: int = 0  # image j of prompt i gets seed image_seed + n * i + j: the same noise in every cell
    harmful_digits: tuple = (7,)
    safety_concept: str = SEVEN  # what the SLD rows steer away from (SLD's own default names I2P's categories)
    # UnlearnDiffAtk (attack.py prompt: its defaults but 10 of the 50 timesteps, 400 iterations a prompt, the
    # schedule docs/baselines.md measured; the full one costs 5x) on each of these models before any attack,
    # every training seed. Not the SLD rows: the prompt attack has no sampling-time guidance.
    prompt_attack: tuple = ("--timesteps", "10")
    prompt_attack_models: tuple = ("base", "unseen", "naive", "lt", "ng", "high-official", "esd-u", "esd-x",
                                   "immunize")
    base: str = str(BUILTIN_MODEL)
    unseen_unet: str = str(BUILTIN_MODEL / "unseen")


PLAN = Plan()
# `python evaluate.py`: the main table, a part of the study whose runs carry the same keys (the study reuses them).
MAIN_MODELS = ("base", "unseen", "naive", "lt", "ng")
MAIN = Plan(models={name: MODELS[name] for name in MAIN_MODELS}, attacks={"strong": ATTACKS["strong"]},
            prompt_attack_models=())


@dataclass(frozen=True)
class Run:
    kind: str  # "train", "attack", "evaluate" or "prompt-attack"
    model: str
    train_seed: int | None  # None for untrained models
    attack: str | None = None
    attack_seed: int | None = None
    step: int | None = None  # evaluate: the attack step of the weights judged (0: before any attack)
    key: str = ""
    needs: tuple = ()  # keys of the runs whose output this one reads


def weights_digest(folder) -> str:
    """A hash of a model folder's weight and config files (components one level down, the judge at the top), so
    that new weights at the same path never reuse an old run."""
    folder = Path(folder)
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("*/*.safetensors"), *folder.glob("*/config.json")])
    if not files:
        raise ValueError(f"{folder}: no weights to key the study's runs by")
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def shipped_digests(plan: Plan) -> dict:
    """The weight digests that key every run of the plan: the shipped model's and the unseen UNet's."""
    return {"base": weights_digest(plan.base), "unseen": weights_digest(plan.unseen_unet)}


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _train_order(models: dict) -> list:
    """Model names with every start before the models trained from it."""
    order = []

    def visit(name, path=()):
        if name in path:
            raise ValueError(f"plan models start from each other in a cycle: {' -> '.join(path + (name,))}")
        if name not in order:
            start = models[name].start
            if models[name].train is not None and start != "base":
                if start not in models or models[start].train is None:
                    raise ValueError(f"plan model {name!r} starts from {start!r}, which is not a trained plan model")
                visit(start, path + (name,))
            order.append(name)
    for name in models:
        visit(name)
    return order


def expand(plan: Plan = PLAN, digests: dict | None = None) -> list[Run]:
    """Every run the plan needs, each once, in an order where a run comes after those it needs. digests: {"base",
    "unseen"} weight digests (default: read from plan.base and plan.unseen_unet)."""
    digests = digests or shipped_digests(plan)
    data = {"harmful_digits": list(plan.harmful_digits), "base": digests["base"]}
    sampling = {"images_per_prompt": plan.images_per_prompt,
                "harmful_images_per_prompt": plan.harmful_images_per_prompt,
                "sampling_steps": plan.sampling_steps, "guidance": plan.guidance, "image_seed": plan.image_seed,
                "harmful_digits": list(plan.harmful_digits), "judge": digests["base"]}
    runs, weights = [], {}  # weights: (model, train seed) -> key of the run (or shipped weights) they are
    for name in _train_order(plan.models):
        model = plan.models[name]
        for seed in plan.train_seeds if model.train is not None else (None,):
            if model.train is None:
                unet = digests[model.unet] if model.unet else None
                weights[name, seed] = settings_key({"kind": "pretrained", "base": digests["base"], "unet": unet})
                continue
            start = weights[model.start, seed] if model.start != "base" else digests["base"]
            key = settings_key({"kind": "train", **data, "args": list(model.train), "seed": seed, "start": start})
            runs.append(Run("train", name, seed, key=key, needs=(start,) if model.start != "base" else ()))
            weights[name, seed] = key
    trained = {run.key for run in runs}
    evaluations = []
    for (name, seed), model_key in weights.items():
        needs = (model_key,) if model_key in trained else ()  # shipped weights need no run
        sample = ({"sample": plan.models[name].sample, "safety_concept": plan.safety_concept}
                  if plan.models[name].sample else {})
        evaluations.append(Run("evaluate", name, seed, step=0, needs=needs, key=settings_key(
            {"kind": "evaluate", **sampling, **sample, "weights": model_key})))
        if name in plan.prompt_attack_models:
            evaluations.append(Run("prompt-attack", name, seed, needs=needs, key=settings_key(
                {"kind": "prompt-attack", **data, "args": list(plan.prompt_attack), "weights": model_key})))
        for attack_name, attack in plan.attacks.items():
            if attack.models is not None and name not in attack.models:
                continue
            attacked = [step for step in attack.snapshots if step > 0]
            for attack_seed in attack.seeds:
                key = settings_key({"kind": "attack", **data, "args": list(attack.args), "rows": attack.rows,
                                    "steps": max(attacked), "save_at": attacked, "seed": attack_seed,
                                    "model": model_key})
                runs.append(Run("attack", name, seed, attack_name, attack_seed, key=key, needs=needs))
                evaluations += [Run("evaluate", name, seed, attack_name, attack_seed, step, needs=(key,),
                                    key=settings_key({"kind": "evaluate", **sampling, **sample, "weights": key,
                                                      "step": step}))
                                for step in attacked]
    unique = {}
    for run in runs + evaluations:  # an SLD row's attacks are its base's: made once, under the first name
        unique.setdefault(run.key, run)
    return list(unique.values())
