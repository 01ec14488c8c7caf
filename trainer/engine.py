"""One training step, one simulated click round, one validation pass (launcher-agnostic).

The click loop of DeepEdit (spec §3): per sample, with probability `click_prob` the iteration is a
click iteration (initial seeds from the label, then 1..max_click_rounds no-grad forwards, each adding
corrective clicks from the errors), otherwise automatic (all-zero click channels). The decision is
made per sample (spec §7.5: the bundle zeroed only batch item 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss

from .clicks import (
    Clicks,
    apply_click_budget,
    corrective_clicks,
    empty_clicks,
    initial_seeds,
    merge_clicks,
)
from .config import TrainConfig
from .metrics import spleen_dice
from .network import autocast, cpu_has_bf16, network_input, spleen_mask  # noqa: F401  (re-exported: their old home)
from .transforms import label_mask


def make_loss() -> DiceCELoss:
    """DiceCE on softmax outputs, background included, weights 1/1 (spec §3).

    Takes the two-channel target of `loss_target`: for 0/1 labels that is the bundle's one-hot
    target (same loss); for soft labels, soft Dice and cross-entropy against class probabilities.
    """
    return DiceCELoss(to_onehot_y=False, softmax=True, include_background=True, lambda_dice=1.0, lambda_ce=1.0)


def loss_target(label: torch.Tensor) -> torch.Tensor:
    """(B, 1, X, Y, Z) spleen label, 0/1 or fractions -> (B, 2, X, Y, Z) float: background, spleen."""
    spleen = label.float()
    return torch.cat([1.0 - spleen, spleen], dim=1)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (no-grad click forwards must not go through DDP's reducer)."""
    return getattr(model, "module", model)


@torch.no_grad()
def predict_mask(model: torch.nn.Module, x: torch.Tensor, amp: bool) -> torch.Tensor:
    """Eval-mode forward -> (B, X, Y, Z) bool spleen mask (argmax over background/spleen)."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    with autocast(x.device, amp):
        logits = net(x)
    if was_training:
        net.train()
    return spleen_mask(logits)


#: Refinement windows trained with corrective clicks only (no seeds from the label), and their rounds.
WINDOW_CORRECTIVE_SHARE = 0.5
WINDOW_MAX_ROUNDS = 2


def simulate_clicks(
    model: torch.nn.Module,
    image: torch.Tensor,
    label: np.ndarray,
    body: np.ndarray,
    rngs: list[np.random.Generator],
    cfg: TrainConfig,
    click_prob: float,
    always: list[bool] | None = None,
) -> list[Clicks]:
    """The clicks each sample of the batch trains (or is scored) with.

    Args:
        model: the network (DDP-wrapped or not).
        image: (B, 1, X, Y, Z) windowed CT on the training device.
        label: (B, X, Y, Z) bool spleen masks (numpy).
        body: (B, X, Y, Z) bool body masks (numpy).
        rngs: one generator per sample.
        cfg: job settings (rounds, budget, sigma, amp).
        click_prob: probability of a click iteration (else automatic: no clicks).
        always: per sample, a click iteration whatever `click_prob` (refinement windows: inference
            runs a window only around clicks). Of these, WINDOW_CORRECTIVE_SHARE start from no clicks
            and get 1..WINDOW_MAX_ROUNDS rounds of corrective clicks only, as a user's clicks are: a
            window whose clicks always included seeds on the spleen learned that a lone background
            click means "no spleen here" (tiny profile: the first click cut mean Dice 0.65 -> 0.54).
    """
    batch = image.shape[0]
    clicks = [empty_clicks() for _ in range(batch)]
    rounds = [0] * batch
    for b, rng in enumerate(rngs):
        window = always is not None and always[b]
        if rng.random() < click_prob or window:
            corrective = window and rng.random() < WINDOW_CORRECTIVE_SHARE
            clicks[b] = empty_clicks() if corrective else initial_seeds(label[b], body[b], rng)
            rounds[b] = int(rng.integers(1, (WINDOW_MAX_ROUNDS if corrective else cfg.max_click_rounds) + 1))
    for r in range(max(rounds, default=0)):
        active = [b for b in range(batch) if rounds[b] > r]
        x = network_input(image[active], [clicks[b] for b in active], cfg.sigma)
        pred = predict_mask(model, x, cfg.amp).cpu().numpy()
        for row, b in enumerate(active):
            new = corrective_clicks(pred[row], label[b], rngs[b], cfg.profile_spec.second_click_voxels)
            clicks[b] = apply_click_budget(merge_clicks(clicks[b], new), rngs[b], cfg.max_click_budget)
    return clicks


def grads_finite(model: torch.nn.Module) -> bool:
    """Whether every gradient is finite (one fused norm; DDP has already all-reduced them, so all
    ranks agree)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


@dataclass(kw_only=True, slots=True)
class StepResult:
    loss: float
    dice: float
    clicked: int
    skipped: bool = False


def _agreed_alone(ok: bool) -> bool:
    return ok


def train_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: torch.nn.Module,
    rngs: list[np.random.Generator],
    cfg: TrainConfig,
    device: torch.device,
    agree: Callable[[bool], bool] = _agreed_alone,
) -> StepResult:
    """Simulate clicks, then one optimisation step on the clicked (or automatic) input.

    Every rank runs `backward()` whatever its loss: DDP all-reduces gradient buckets during backward,
    and a rank that left it out would pair its next step's buckets with this step's buckets of the
    others (gradients of different steps averaged, then a hang or a crash at the next collective of
    another size). Whether to apply the step is decided after the all-reduce, by `agree` (all ranks
    vote; one non-finite loss or gradient anywhere skips the step everywhere), as GradScaler does for
    an inf gradient. A loss can be inf while its gradients are finite (cross-entropy of a saturated
    softmax), so the gradients alone would not make the ranks agree.

    Args:
        agree: `ok -> all ranks ok` (`Runtime.all_true`); one process: the identity.
    """
    image = batch["image"].to(device, torch.float32, non_blocking=True)
    target = loss_target(batch["label"].to(device, non_blocking=True))
    label_np = label_mask(batch["label"][:, 0]).numpy()
    body_np = batch["body"][:, 0].numpy().astype(bool)
    windows = batch.get("window")
    always = None if windows is None else [bool(w) for w in windows.reshape(-1).tolist()]
    clicks = simulate_clicks(model, image, label_np, body_np, rngs, cfg, cfg.click_prob_train, always)
    x = network_input(image, clicks, cfg.sigma)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, cfg.amp):
        logits = model(x)
        loss = loss_fn(logits.float(), target)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # true gradients for the check (a no-op when the scaler is off)
    loss_value = float(loss.detach())
    if not agree(math.isfinite(loss_value) and grads_finite(model)):
        optimizer.zero_grad(set_to_none=True)
        scaler.update()  # an enabled scaler lowers its scale after an inf gradient, as after its own skip
        return StepResult(loss=loss_value, dice=0.0, clicked=0, skipped=True)
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        dice = spleen_dice(spleen_mask(logits).cpu(), torch.from_numpy(label_np)).mean()
    clicked = sum(1 for c in clicks if any(c.values()))
    return StepResult(loss=loss_value, dice=float(dice), clicked=clicked)


@torch.no_grad()
def validate_item(
    model: torch.nn.Module,
    item: dict[str, torch.Tensor],
    rng: np.random.Generator,
    cfg: TrainConfig,
    device: torch.device,
) -> float:
    """Spleen Dice of one validation case at network resolution, scored with simulated clicks.

    `rng` should be derived from the case alone, so validation clicks (and the Dice) are the same
    every epoch (spec §7.5: the bundle re-drew them).
    """
    image = item["image"].to(device, torch.float32)
    label_np = label_mask(item["label"][:, 0]).numpy()
    body_np = item["body"][:, 0].numpy().astype(bool)
    clicks = simulate_clicks(model, image, label_np, body_np, [rng], cfg, cfg.click_prob_val)
    pred = predict_mask(model, network_input(image, clicks, cfg.sigma), cfg.amp)
    return float(spleen_dice(pred.cpu(), torch.from_numpy(label_np)).mean())
