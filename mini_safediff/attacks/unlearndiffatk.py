"""UnlearnDiffAtk (Zhang et al., ECCV 2024, "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are
Still Easy To Generate Unsafe Images ... For Now"): a prompt attack on a model with a concept erased. No outside
classifier steers the optimisation: the attacked model's own denoiser scores a prompt, by how well it denoises
a harmful target image under that prompt.

For a harmful prompt p and its target image (drawn from p by the unsafe base model, the attack's reference):
  z0     = the VAE's mean latent of the target, scaled as the UNet sees latents
  w      = k rows of weights over the vocabulary, each a point of the probability simplex (start: uniform)
  for t in T timesteps spread evenly over the schedule (T = 50 of 1000: 10, 30, ..., 990), in that order:
      I times:  s    = one token per row drawn from w
                c    = text encoder of [start, E[s], p's tokens, end, padding]        (E: token embeddings)
                loss = MSE(model(x_t, t, c), eps or v target), x_t = q(x_t | z0) with fresh noise
                w   <- Adam on d loss / d one-hot(s) clipped to [-1, 1] (the straight-through estimate
                       of the draw), then w projected back onto the simplex
      prompt = the most likely token of each row, decoded to text, then p; generate with it, judge it, and
               stop at the first success
Before any optimisation p itself is judged (step 0): a model that still draws the concept needs no attack.

Defaults, from the authors' code (OPTML-Group/Diffusion-MU-Attack: the `text_grad` attacker and its
configs/nudity/text_grad_esd_nudity_classifier.json): k = 5 tokens prepended ("prefix_k"), I = 40 iterations
per timestep (a judgement every 40 iterations), T = 50 timesteps (at most 2,000 iterations), Adam with lr 0.01
and weight decay 0.1, the MSE loss.

One deliberate difference: tokens are drawn only from words whose text tokenises back to that same single
token (most of the vocabulary). The authors draw from the whole vocabulary and judge the decoded text
re-tokenised, which can differ from what was optimised (a word piece glues onto its neighbour, a special token
vanishes); here the prompt judged is the prompt optimised.
"""
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..training.steps import diffusion_loss


@dataclass(frozen=True)
class UnlearnDiffAtkConfig:
    tokens: int = 5  # k, prepended to the prompt
    iterations: int = 40  # per timestep; the prompt is judged after each timestep's iterations
    timesteps: int = 50  # T
    lr: float = 0.01
    weight_decay: float = 0.1


@dataclass
class AttackResult:
    prompt: str
    adversarial_prompt: str  # the last prompt judged: p itself when it succeeded before any optimisation
    success: bool
    step: int | None  # optimisation iterations done when the judge first flagged an image (0: p itself)
    losses: list = field(default_factory=list)  # the denoising loss of every iteration


def attack_timesteps(num_train_timesteps: int, count: int) -> list[int]:
    """The middle of each of `count` equal intervals of the schedule (50 of 1000: 10, 30, ..., 990)."""
    stride = num_train_timesteps // count
    return list(range(stride // 2, num_train_timesteps, stride))[:count]


def project_to_simplex(weights: torch.Tensor) -> torch.Tensor:
    """Each row's nearest point (Euclidean) with entries >= 0 summing to 1: max(w - theta, 0), theta found by
    sorting (Duchi et al. 2008). The authors find the same theta by bisection."""
    ordered = weights.sort(dim=-1, descending=True).values
    excess = ordered.cumsum(-1) - 1
    rank = torch.arange(1, weights.shape[-1] + 1, device=weights.device, dtype=weights.dtype)
    kept = (ordered - excess / rank > 0).sum(-1, keepdim=True)  # how many entries stay positive
    theta = excess.gather(-1, kept - 1) / kept
    return (weights - theta).clamp(min=0)


@functools.cache  # a second each: once per tokenizer, not once per prompt
def word_tokens(tokenizer) -> torch.Tensor:
    """The ids of whole-word tokens whose decoded text tokenises back to exactly that token: any of them,
    written between spaces, reads back as the same id."""
    vocab = tokenizer.backend.get_vocab()
    ids = sorted(i for token, i in vocab.items() if token.endswith("</w>"))
    texts = [tokenizer.decode([i]) for i in ids]
    encoded = tokenizer(texts)  # (N, 77): start, the tokens, end, padding
    alone = (encoded[:, 1] == torch.tensor(ids)) & (encoded[:, 2] == vocab[tokenizer.eos_token])
    return torch.tensor(ids)[alone & torch.tensor([bool(text) for text in texts])]


def adversarial_ids(tokenizer, prefix_ids, prompt: str) -> torch.Tensor:
    """(1, 77): what the tokenizer gives for the prefix's text, a space and the prompt, when the prefix is made of
    word_tokens: start, the prefix, the prompt's tokens (cut where they would not fit), end, padding."""
    ids = tokenizer(prompt)[0].tolist()
    end = tokenizer.backend.token_to_id(tokenizer.eos_token)
    words = ids[1:ids.index(end)]
    kept = ([ids[0], *list(prefix_ids), *words])[:tokenizer.model_max_length - 1] + [end]
    return torch.tensor([kept + [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(kept))])


class DrawnOneHot(torch.autograd.Function):
    """Forward: one token per row of weights drawn from it, as one-hot rows. Backward: the one-hot's gradient,
    clipped to [-1, 1], handed to the weights as if the draw were the identity (the authors' estimate)."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        drawn = torch.multinomial(weights, 1, generator=generator).squeeze(-1)
        return F.one_hot(drawn, weights.shape[-1]).to(weights.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.clamp(-1, 1), None


@torch.no_grad()
def target_latents(pipe, image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> the VAE posterior's mean (1, C, h, w), scaled: the authors encode the target so."""
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    posterior = pipe.vae.encode(pixels.to(pipe.device, next(pipe.vae.parameters()).dtype))
    return (posterior.mean * pipe.vae.config.scaling_factor).to(pipe.dtype)


def unlearn_diff_attack(pipe, prompt: str, target: np.ndarray, is_harmful: Callable[[str], bool],
                        config: UnlearnDiffAtkConfig = UnlearnDiffAtkConfig(), seed: int = 0,
                        progress: bool = False) -> AttackResult:
    """Attack `pipe` (SD 1 / 2) on one prompt. target: the reference's image for it, uint8 (H, W, 3) at pipe's
    resolution; is_harmful(text): generate with text and judge. `seed` draws the tokens and the noise. The
    model's weights get no gradient and are left as they were."""
    if pipe.is_sdxl:
        raise ValueError("UnlearnDiffAtk is implemented for SD 1 / 2 (one text encoder), not SDXL")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if target.shape[:2] != (size, size):
        raise ValueError(f"UnlearnDiffAtk: the target image is {target.shape[1]}x{target.shape[0]}, the attacked "
                         f"model draws {size}x{size}: make the targets with a reference of the same resolution")
    if is_harmful(prompt):
        return AttackResult(prompt, prompt, True, 0)
    device = pipe.device
    vocabulary = word_tokens(pipe.tokenizer).to(device)
    token_embedding = pipe.text_encoder.text_model.embeddings.token_embedding
    table = token_embedding.weight[vocabulary].detach().float()  # (V, D): the words the prefix is drawn from
    weights = torch.full((config.tokens, len(vocabulary)), 1 / len(vocabulary), device=device,
                         requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=config.lr, weight_decay=config.weight_decay)
    # The prompt's token embeddings with any k words in front: those k rows are replaced at every iteration.
    around = token_embedding(adversarial_ids(pipe.tokenizer, vocabulary[:config.tokens].tolist(), prompt)
                             .to(device)).detach()
    z0 = target_latents(pipe, target)
    generator = torch.Generator(device).manual_seed(seed)
    losses = []
    timesteps = attack_timesteps(pipe.schedule.config.num_train_timesteps, config.timesteps)
    bar = tqdm(total=len(timesteps) * config.iterations, disable=not progress, desc="UnlearnDiffAtk")
    for t in timesteps:
        t = torch.tensor([t], device=device)
        for _ in range(config.iterations):
            prefix = DrawnOneHot.apply(weights, generator) @ table  # (k, D)
            embeds = torch.cat([around[:, :1], prefix[None].to(around.dtype), around[:, 1 + config.tokens:]], 1)
            noise = torch.randn(z0.shape, generator=generator, device=device, dtype=z0.dtype)
            pred = pipe.unet(pipe.schedule.add_noise(z0, noise, t), t, pipe.text_encoder(inputs_embeds=embeds))
            loss = diffusion_loss(pred, z0, noise, t, pipe.schedule)
            # Only the weights' gradient: the model's own parameters are frozen whatever their requires_grad.
            weights.grad, = torch.autograd.grad(loss, [weights])
            optimizer.step()
            with torch.no_grad():
                weights.copy_(project_to_simplex(weights))
            losses.append(loss.item())
            bar.update(1)
        chosen = vocabulary[weights.argmax(-1)].tolist()
        text = f"{pipe.tokenizer.decode(chosen)} {prompt}"
        if is_harmful(text):
            bar.close()
            return AttackResult(prompt, text, True, len(losses), losses)
    bar.close()
    return AttackResult(prompt, text, False, None, losses)
