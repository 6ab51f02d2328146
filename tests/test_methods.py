"""Every method, alpha strategy and consistency option trains end to end; alpha and CDCR options
behave as the paper's ablations (Tables 7-8, method-spec section 6) define them.

The end-to-end runs are 2 iterations on a tiny synthetic set (models at 32 pixels); the behaviour
checks drive :class:`SynFoC` directly with "pattern models" whose predictions we choose, so every
expected pseudo-label and alpha is computed here independently of the code under test.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import synfoc.method.synfoc as synfoc_module
from synfoc.config import TrainConfig
from synfoc.method.synfoc import SynFoC, Views

STUDENTS = {"synfoc": {"unet", "foundation"}, "base-unet": {"unet"}, "base-foundation": {"foundation"},
            "suponly-unet": {"unet"}, "suponly-foundation": {"foundation"}, "samed": {"foundation"},
            "fixmatch": {"unet"}}
ALPHAS = ("smc", "self", "mutual", "constant", "linear", "cps")
CONSISTENCIES = ("cdcr", "cr", "none")
RUNS = ([(m, "smc", "cdcr") for m in STUDENTS]
        + [("synfoc", a, "cdcr") for a in ALPHAS if a != "smc"]
        + [("synfoc", "smc", c) for c in CONSISTENCIES if c != "cdcr"])


def tiny_config(method: str, alpha: str, consistency: str) -> TrainConfig:
    # LiteMedSAM works from 32 pixels up (a multiple of 4); 32 keeps each run to a few seconds.
    return TrainConfig(dataset="synthetic", synthetic_train=6, synthetic_test=2, labeled_domain="siteA",
                       labeled_num=2, batch_labeled=2, batch_unlabeled=2, method=method, alpha=alpha,
                       consistency=consistency, foundation="litemedsam", image_size=32, unet_size=32,
                       unet_width=4, iters=2, log_every=1, checkpoint_every=1, device="cpu", precision="fp32")


@pytest.mark.parametrize("method,alpha,consistency", RUNS, ids=["-".join(r) for r in RUNS])
def test_method_trains_two_iterations_and_writes_summary(method, alpha, consistency, tmp_path):
    from synfoc.train import train
    torch.set_num_threads(1)
    summary = train(tiny_config(method, alpha, consistency), tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert set(on_disk["students"]) == STUDENTS[method]
    assert on_disk["method"] == method and on_disk["iterations"] == 2
    for res in on_disk["students"].values():
        assert set(res["per_domain"]) == {"siteA", "siteB", "siteC"}   # every domain's test set
        assert 0 <= res["mean"]["dice"] <= 1
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    if method != "synfoc":
        return
    # The options reach the training step (log of iteration t = step - 1, T = 2).
    alphas = [h["alpha"] for h in history]
    if alpha == "constant":
        assert alphas == [0.5, 0.5]
    elif alpha == "linear":
        assert alphas == [0.0, 0.5]
    elif alpha == "cps":
        assert alphas == [0.0, 0.0]
    if consistency == "none":
        assert all(h["loss_c"] == 0 and h["loss_d"] == 0 for h in history)
    elif consistency == "cr":
        assert all(h["loss_c"] == 0 and h["loss_d"] > 0 for h in history)
    else:
        assert all(h["loss_c"] > 0 and h["loss_d"] > 0 for h in history)


# ----------------------------------------------------------------------------- pattern models
class PatternModel(nn.Module):
    """Logits ``scale * (2 onehot(pattern) - 1)`` whatever the input (pattern repeated over the
    batch): a segmentation model whose prediction the test chooses. ``gain`` makes it trainable."""

    def __init__(self, pattern: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("pattern", pattern.long())
        self.gain = nn.Parameter(torch.tensor(1.0))
        self.scale = scale
        self.image_size = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reps = x.shape[0] // self.pattern.shape[0]
        onehot = F.one_hot(self.pattern.repeat(reps, 1, 1), 2).permute(0, 3, 1, 2).float()
        return self.gain * self.scale * (2 * onehot - 1)


def blank_views(batch: int = 2, size: int = 16) -> Views:
    """Views with an empty intermediate-sample box, so Q_c is the ensemble pseudo-label everywhere."""
    x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(batch, size, size, dtype=torch.long)
    box = torch.zeros(batch, size, size, dtype=torch.bool)
    return Views(x_u=x, y_u=y, x_f=x, y_f=y, uw_u=x, us_u=x, uw_f=x, us_f=x, box_u=box, box_f=box)


def masks(*rects: tuple[int, int, int, int], size: int = 16) -> torch.Tensor:
    """One label map per (row0, row1, col0, col1) rectangle of class 1 (an empty one: (0,0,0,0))."""
    out = torch.zeros(len(rects), size, size, dtype=torch.long)
    for i, (r0, r1, c0, c1) in enumerate(rects):
        out[i, r0:r1, c0:c1] = 1
    return out


def instance_dice(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Eqs. 4-5 for one foreground class: (2|A∩B| + 1) / (|A| + |B| + 1.001), 1 when both empty."""
    out = []
    for ai, bi in zip(a.bool(), b.bool()):
        inter, size = (ai & bi).sum().item(), ai.sum().item() + bi.sum().item()
        out.append(1.0 if size == 0 else (2 * inter + 1) / (size + 1.001))
    return out


@pytest.fixture
def unsupervised_targets(monkeypatch):
    """Record the (logits, target, weight) of every masked L_u term of a SynFoC step."""
    calls = []
    real = synfoc_module.ce_dice_loss

    def spy(logits, target, weight=None, **kw):
        if weight is not None:
            calls.append((logits.detach().clone(), target.clone(), weight.clone()))
        return real(logits, target, weight, **kw)

    monkeypatch.setattr(synfoc_module, "ce_dice_loss", spy)
    return calls


def target_of(calls, student: nn.Module, batch: int):
    """(Q_c, W_c) of the L_u term whose logits are this student's prediction."""
    expected = student(torch.zeros(batch, 1, 1, 1)).detach()
    hits = [(t, w) for logits, t, w in calls if torch.equal(logits, expected)]
    assert len(hits) == 1
    return hits[0]


# UT teacher B, UT student A, MS teacher C: self = Dice(A, B) and mutual = Dice(C, B) differ per
# instance, and their product differs from both.
TEACHER_UT = masks((0, 16, 0, 8), (0, 8, 0, 8))
STUDENT_UT = masks((0, 16, 0, 4), (0, 8, 0, 16))
TEACHER_MS = masks((0, 16, 0, 12), (0, 0, 0, 0))
STUDENT_MS = masks((4, 12, 4, 12), (8, 16, 0, 16))
SELF = instance_dice(STUDENT_UT, TEACHER_UT)
MUTUAL = instance_dice(TEACHER_MS, TEACHER_UT)
T, TOTAL = 1, 4


def make_synfoc(alpha: str, consistency: str = "cdcr") -> tuple[SynFoC, nn.Module, nn.Module]:
    unet, fm = PatternModel(STUDENT_UT, 3.0), PatternModel(STUDENT_MS, 3.0)
    model = SynFoC(unet, fm, PatternModel(TEACHER_UT, 10.0), PatternModel(TEACHER_MS, 10.0), [(1,)],
                   alpha=alpha, consistency=consistency)
    return model, unet, fm


@pytest.mark.parametrize("strategy", ["smc", "self", "mutual", "constant", "linear"])
def test_alpha_strategy_sets_the_ensemble_weight(strategy, unsupervised_targets):
    expected_alpha = {"smc": [s * m for s, m in zip(SELF, MUTUAL)], "self": SELF, "mutual": MUTUAL,
                      "constant": [0.5, 0.5], "linear": [T / TOTAL] * 2}[strategy]
    assert len({round(sum(v) / 2, 6) for v in ([s * m for s, m in zip(SELF, MUTUAL)], SELF, MUTUAL)}) == 3
    model, unet, _ = make_synfoc(strategy, "none")
    _, logs = model.step(blank_views(), T, TOTAL)
    assert logs["self_confidence"].item() == pytest.approx(sum(SELF) / 2, rel=1e-6)
    assert logs["mutual_confidence"].item() == pytest.approx(sum(MUTUAL) / 2, rel=1e-6)
    assert logs["alpha"].item() == pytest.approx(sum(expected_alpha) / 2, rel=1e-6)
    # Eq. 3 with this alpha, per instance: the U-Net's target and confidence mask.
    p_ut = torch.softmax(PatternModel(TEACHER_UT, 10.0)(torch.zeros(2, 1, 1, 1)), dim=1)
    p_ms = torch.softmax(PatternModel(TEACHER_MS, 10.0)(torch.zeros(2, 1, 1, 1)), dim=1)
    a = torch.tensor(expected_alpha).view(2, 1, 1, 1)
    p_en = a * p_ut + (1 - a) * p_ms
    confident = p_en.max(dim=1).values > 0.95
    target, weight = target_of(unsupervised_targets, unet, 2)
    assert torch.equal(weight, confident)
    assert torch.equal(target[confident], p_en.argmax(dim=1)[confident])
    # the per-instance distribution, and what fraction of confident pixels is foreground
    assert logs["alpha@instances"].tolist() == pytest.approx(expected_alpha, rel=1e-6)
    q = p_en.argmax(dim=1)
    assert logs["confident_foreground"].item() == pytest.approx(
        ((q > 0) & confident).sum().item() / max(1, confident.sum().item()), rel=1e-6)
    # TEACHER_MS's second instance is empty but TEACHER_UT's is not: no instance has both empty
    assert logs["teachers_both_empty"].item() == 0


def test_both_teachers_empty_gives_alpha_one_and_is_logged():
    """Dice(empty, empty) = 1 (the reference's rule): SMC's alpha is 1 where both teachers see no
    foreground, and the log says how often that happened."""
    empty = masks((0, 0, 0, 0), (0, 0, 0, 0))
    unet = PatternModel(empty, 3.0)
    model = SynFoC(unet, PatternModel(STUDENT_MS, 3.0), PatternModel(empty, 10.0),
                   PatternModel(masks((0, 0, 0, 0), (0, 8, 0, 8)), 10.0), [(1,)], alpha="smc", consistency="none")
    _, logs = model.step(blank_views(), T, TOTAL)
    assert logs["alpha@instances"].tolist() == pytest.approx([1.0, instance_dice(empty[1:], masks((0, 8, 0, 8)))[0]])
    assert logs["teachers_both_empty"].item() == 0.5


def test_cps_each_model_learns_only_from_the_others_pseudo_label(unsupervised_targets):
    # U-Net teacher says "lesion" everywhere, MS teacher "background" everywhere; both confident.
    ones, zeros = torch.ones(2, 16, 16, dtype=torch.long), torch.zeros(2, 16, 16, dtype=torch.long)
    unet, fm = PatternModel(STUDENT_UT, 3.0), PatternModel(STUDENT_MS, 3.0)
    model = SynFoC(unet, fm, PatternModel(ones, 10.0), PatternModel(zeros, 10.0), [(1,)], alpha="cps")
    _, logs = model.step(blank_views(), T, TOTAL)
    assert logs["alpha"].item() == 0
    target_ut, weight_ut = target_of(unsupervised_targets, unet, 2)
    target_ms, weight_ms = target_of(unsupervised_targets, fm, 2)
    assert torch.all(target_ut == 0), "the U-Net must learn from MedSAM's pseudo-label"
    assert torch.all(target_ms == 1), "MedSAM must learn from the U-Net's pseudo-label"
    assert torch.all(weight_ut) and torch.all(weight_ms)


def _student_probs() -> tuple[torch.Tensor, torch.Tensor]:
    probs = [torch.softmax(PatternModel(p, 3.0)(torch.zeros(2, 1, 1, 1)), dim=1) for p in (STUDENT_UT, STUDENT_MS)]
    return probs[0], probs[1]


@pytest.mark.parametrize("consistency", CONSISTENCIES)
def test_consistency_terms(consistency):
    model, _, _ = make_synfoc("smc", consistency)
    _, logs = model.step(blank_views(), T, TOTAL)
    p_ut, p_ms = _student_probs()
    if consistency == "none":
        assert logs["loss_c"].item() == 0 and logs["loss_d"].item() == 0
        return
    if consistency == "cr":   # plain MSE between the students everywhere, no entropy term
        assert logs["loss_c"].item() == 0
        assert logs["loss_d"].item() == pytest.approx(((p_ut - p_ms) ** 2).mean().item(), rel=1e-5)
        return
    agree = (STUDENT_UT == STUDENT_MS).unsqueeze(1).float()       # Eq. 8 from the chosen patterns
    assert 0 < agree.mean() < 1
    entropy = lambda p: -(p * torch.log(p))                        # noqa: E731
    expected_c = 0.5 * ((entropy(p_ut) * agree).mean() + (entropy(p_ms) * agree).mean())
    expected_d = (((p_ms - p_ut) ** 2) * (1 - agree)).mean()
    assert logs["loss_c"].item() == pytest.approx(expected_c.item(), rel=1e-5) and expected_c > 0
    assert logs["loss_d"].item() == pytest.approx(expected_d.item(), rel=1e-5) and expected_d > 0
