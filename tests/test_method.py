"""The methods: the equations of the SynFoC step, each against an independent (numpy or loop)
computation; its alpha and consistency options as the paper's ablations (Tables 7-8) define them;
per-half BatchNorm; and every registered baseline building and stepping."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import synfoc.method.synfoc as synfoc_module

from synfoc.augment import AugmentConfig, box_mask, draw_boxes, intermediate_sample
from synfoc.build import build_method
from synfoc.config import TrainConfig
from synfoc.method.ema import ema_decay, ema_update, make_teacher
from synfoc.method.losses import ce_dice_loss, dice_loss, divergence_mse, entropy_on_consensus, part_dice
from synfoc.method.norm import batchnorm_per_part
from synfoc.method.registry import CONSISTENCIES, METHODS
from synfoc.method.synfoc import (SynFoC, Views, consensus_mask, ensemble, labels_of, pseudo_label,
                                  ramp_weight)
from synfoc.models.unet import build_unet


def rng_probs(b=2, c=3, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(b, c, h, w, generator=g), dim=1)


def test_dice_loss_matches_numpy():
    p = rng_probs()
    y = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    w = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.3
    pn, yn, wn = p.numpy().astype(np.float64), y.numpy(), w.numpy()
    for weight in (None, w):
        losses = []
        for k in range(3):
            yk = (yn == k).astype(np.float64)
            # the confidence mask leaves the background term unmasked (method-spec section 9)
            m = np.ones_like(yk) if weight is None or k == 0 else wn.astype(np.float64)
            inter = (pn[:, k] * yk * m).sum()
            den = (pn[:, k] ** 2 * m).sum() + (yk ** 2 * m).sum()
            losses.append(1 - (2 * inter + 1e-10) / (den + 1e-10))
        assert dice_loss(p, y, weight).item() == pytest.approx(np.mean(losses), rel=1e-5)


def test_masked_ce_is_mean_over_all_pixels():
    logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    w = torch.zeros(2, 4, 4, dtype=torch.bool)
    w[0, :2] = True
    logp = torch.log_softmax(logits, 1).numpy()
    ce = -np.take_along_axis(logp, y.numpy()[:, None], 1)[:, 0]
    expected = (ce * w.numpy()).sum() / ce.size  # all pixels in the denominator, not only confident ones
    probs = torch.softmax(logits, 1)
    got = ce_dice_loss(logits, y, w) - dice_loss(probs, y, w)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_part_dice_eq4_formula_and_empty_rule():
    a = torch.zeros(3, 6, 6, dtype=torch.long)
    b = torch.zeros(3, 6, 6, dtype=torch.long)
    a[0, :2, :3] = 1          # 6 px
    b[0, :3, :3] = 1          # 9 px, overlap 6
    a[1, 0, 0] = 2            # class 2 only in a: parts (1,), (1,2)
    # sample 2: both empty -> exactly 1
    d = part_dice(a, b, [(1,), (1, 2)])
    s0 = (2 * 6 + 1) / (6 + 9 + 1.001)
    s1_part1 = 1.0                                  # both empty for class 1
    s1_part12 = (2 * 0 + 1) / (1 + 0 + 1.001)
    assert d[0].item() == pytest.approx(s0, rel=1e-6)
    assert d[1].item() == pytest.approx((s1_part1 + s1_part12) / 2, rel=1e-6)
    assert d[2].item() == 1.0


def test_alpha_per_instance_and_strategies():
    self_c, mutual_c = torch.tensor([0.9, 0.2]), torch.tensor([0.5, 1.0])
    dummy = nn.Identity()
    for strategy, expected in [("smc", [0.45, 0.2]), ("self", [0.9, 0.2]), ("mutual", [0.5, 1.0]),
                               ("constant", [0.5, 0.5]), ("linear", [0.25, 0.25])]:
        m = SynFoC(dummy, dummy, dummy, dummy, [(1,)], alpha=strategy)
        a_ut, a_ms = m.alpha(self_c, mutual_c, 25, 100)
        assert a_ut.shape == (2, 1, 1, 1)
        assert torch.allclose(a_ut.flatten(), torch.tensor(expected))
        assert torch.equal(a_ut, a_ms)
    a_ut, a_ms = SynFoC(dummy, dummy, dummy, dummy, [(1,)], alpha="cps").alpha(self_c, mutual_c, 3, 10)
    assert torch.all(a_ut == 0) and torch.all(a_ms == 1)  # UT learns from MS only and vice versa


def test_ensemble_and_confidence_mask_eq3():
    p_ut, p_ms = rng_probs(seed=1), rng_probs(seed=2)
    alpha = torch.tensor([0.3, 0.8]).view(2, 1, 1, 1)
    p_en = ensemble(p_ut, p_ms, alpha)
    for i, a in enumerate([0.3, 0.8]):
        assert torch.allclose(p_en[i], a * p_ut[i] + (1 - a) * p_ms[i])
    q, w = pseudo_label(p_en, 0.95)
    assert torch.equal(q, p_en.argmax(1))
    assert torch.equal(w, p_en.max(1).values > 0.95)


def test_intermediate_sample_takes_box_from_labeled():
    g = torch.Generator().manual_seed(0)
    boxes = draw_boxes(4, AugmentConfig(), g)
    m = box_mask(boxes, 32, "cpu")
    area = m.float().mean(dim=(1, 2))
    assert torch.all(area > 0.01) and torch.all(area < 0.45)
    x = torch.full((4, 1, 32, 32), 1.0)
    u = torch.full((4, 1, 32, 32), 2.0)
    uc = intermediate_sample(x, u, m)
    assert torch.equal(uc[:, 0] == 1.0, m)          # image pixels inside the box come from X_w
    y = torch.full((4, 32, 32), 1, dtype=torch.long)
    q = torch.full((4, 32, 32), 2, dtype=torch.long)
    qc = intermediate_sample(y, q, m)
    assert torch.equal(qc == 1, m)                   # label pixels inside the box come from Y_w
    # the box is one rectangle per sample
    for i in range(4):
        rows, cols = m[i].any(1), m[i].any(0)
        assert m[i].sum() == rows.sum() * cols.sum()


def test_cdcr_masks_and_terms():
    p_ut, p_ms = rng_probs(seed=3), rng_probs(seed=4)
    m_c = consensus_mask(p_ut, p_ms)
    assert torch.equal(m_c, p_ut.argmax(1) == p_ms.argmax(1))
    ent = -(p_ut * torch.log(p_ut)).numpy() * m_c.numpy()[:, None]
    assert entropy_on_consensus(p_ut, m_c).item() == pytest.approx(ent.mean(), rel=1e-5)
    mse = ((p_ms - p_ut).numpy() ** 2) * (~m_c).numpy()[:, None]
    assert divergence_mse(p_ut, p_ms, ~m_c).item() == pytest.approx(mse.mean(), rel=1e-5)
    assert divergence_mse(p_ut, p_ms, ~m_c).item() >= 0  # minimised positive MSE (spec 4.6)


def test_labels_of_is_argmax_with_first_index_ties():
    p = torch.randint(0, 3, (3, 4, 16, 16)).float()  # many exact ties between classes
    assert torch.equal(labels_of(p), torch.from_numpy(np.argmax(p.numpy(), axis=1)))
    cl = p.contiguous(memory_format=torch.channels_last)
    assert torch.equal(labels_of(cl), p.argmax(dim=1))


def test_lambda_ramp():
    assert ramp_weight(0, 100) == pytest.approx(math.exp(-5))
    assert ramp_weight(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert ramp_weight(100, 100) == 1.0
    assert ramp_weight(200, 100) == 1.0


def test_first_ema_step_copies_student_then_decays():
    student = build_unet(1, 1, 4)
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update(teacher, student, 0)
    for (n, t), s in zip(teacher.named_parameters(), student.parameters()):
        assert torch.equal(t, s), n
    assert ema_decay(0) == 0 and ema_decay(1) == 0.5 and ema_decay(10_000) == 0.99
    before = [t.clone() for t in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update(teacher, student, 1)  # a = 0.5
    for b, t, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t, 0.5 * b + 0.5 * s)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_shares_frozen_parameters():
    student = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    student[0].weight.requires_grad_(False)
    teacher = make_teacher(student)
    assert teacher[0].weight is student[0].weight
    assert teacher[1].weight is not student[1].weight


def plain_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm layer a plain ``nn.BatchNorm2d`` (state kept)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.__class__ = nn.BatchNorm2d
    return model


@pytest.mark.parametrize("norm", ["synfoc", "torch.nn"])
@pytest.mark.parametrize("low", [False, True], ids=["fp32", "bf16-channels-last"])
def test_batchnorm_per_part_equals_separate_forwards(low, norm):
    """One U-Net forward of cat([a, b]) with per-half BatchNorm = the forwards of a and of b:
    outputs, parameter gradients and running statistics (SynFoC's students see X_w and U_c so),
    also under CPU bf16 autocast with channels-last weights, as in training; for the U-Net's own
    BatchNorm class and for plain ``torch.nn.BatchNorm2d`` alike."""
    torch.manual_seed(0)
    separate = build_unet(1, 2, 4).train()
    if norm == "torch.nn":
        separate = plain_batchnorm(separate)
    if low:
        separate = separate.to(memory_format=torch.channels_last)
    joint = copy.deepcopy(separate)
    a, b = torch.randn(2, 1, 32, 32), 3 + 2 * torch.randn(2, 1, 32, 32)
    weights = torch.randn(4, 3, 32, 32)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
        out_separate = torch.cat([separate(a), separate(b)]).float()
    (out_separate * weights).sum().backward()
    with batchnorm_per_part(joint, 2), torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
        out_joint = joint(torch.cat([a, b])).float()
    (out_joint * weights).sum().backward()

    torch.testing.assert_close(out_joint, out_separate, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(separate.named_parameters(), joint.parameters()):
        if low:  # bf16 weight gradients are sums over another batch split (measured: at most 1.2% apart)
            assert (q.grad - p.grad).norm() <= 0.03 * p.grad.norm(), name
        else:  # fp32 sums in another order: compare at the scale of each gradient
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(), msg=name)
    for (name, x), y in zip(separate.named_buffers(), joint.buffers()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)
    assert not any("forward" in vars(m) for m in joint.modules())  # the context restored every layer
    # The same forward without the split mixes the halves' statistics: a different function.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
        assert not torch.allclose(joint(torch.cat([a, b])).float(), out_separate, atol=1e-1)
    with batchnorm_per_part(joint, 2), pytest.raises(ValueError, match="batch of 3 cannot be split into 2"):
        joint(torch.randn(3, 1, 32, 32))


class TinySeg(nn.Module):
    """A one-convolution two-class segmenter for 16x16 inputs."""

    def __init__(self, cin):
        super().__init__()
        self.conv = nn.Conv2d(cin, 2, 3, padding=1)
        self.image_size = 16

    def forward(self, x):
        return self.conv(x)


def tiny_views() -> Views:
    g = torch.Generator().manual_seed(0)
    box = box_mask(draw_boxes(2, AugmentConfig(), g), 16, "cpu")
    x = torch.rand(2, 1, 16, 16)
    y = (x[:, 0] > 0.5).long()
    v = Views(x_u=x, y_u=y, x_f=x, y_f=y, uw_u=torch.rand(2, 1, 16, 16), us_u=torch.rand(2, 1, 16, 16),
              box_u=box, box_f=box, unlabeled_truth=y)
    v.uw_f, v.us_f = v.uw_u, v.us_u
    return v


def test_synfoc_step_gradients_reach_both_students_and_alpha_detached():
    torch.manual_seed(0)
    unet, fm = TinySeg(1), TinySeg(1)
    m = SynFoC(unet, fm, make_teacher(unet), make_teacher(fm), [(1,)])
    v = tiny_views()
    loss, logs = m.step(v, 50, 100)
    loss.backward()
    assert unet.conv.weight.grad.abs().sum() > 0 and fm.conv.weight.grad.abs().sum() > 0
    assert not logs["alpha"].requires_grad
    assert 0 <= logs["alpha"].item() <= 1
    # consistency "none" turns both CDCR terms off
    m.consistency = "none"
    _, logs = m.step(v, 50, 100)
    assert logs["loss_c"].item() == 0 and logs["loss_d"].item() == 0


def test_self_confidence_is_the_student_before_its_update_and_leaves_batchnorm_alone():
    """Eq. 4 compares the U-Net student's prediction on U_w (batch statistics, as in its training
    forward) with its teacher's. The step runs that forward after the students' training forwards;
    the running statistics must end where the training forward on X_w and U_c alone leaves them."""
    torch.manual_seed(0)
    unet = build_unet(1, 1, 4).train()
    teacher = make_teacher(unet)
    with torch.no_grad():  # a teacher that disagrees, so that the self-confidence is not 1
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    before = copy.deepcopy(unet)
    fm = TinySeg(1)
    v = tiny_views()
    _, logs = SynFoC(unet, fm, teacher, make_teacher(fm), [(1,)]).step(v, 50, 100)

    expected = copy.deepcopy(before)
    with batchnorm_per_part(expected, 2):
        expected(torch.cat([v.x_u, intermediate_sample(v.x_u, v.us_u, v.box_u)]))
    for (name, x), y in zip(expected.named_buffers(), unet.buffers()):
        if "running" in name:
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        q_student = copy.deepcopy(before)(v.uw_u).argmax(1)
        q_teacher = copy.deepcopy(teacher)(v.uw_u).argmax(1)
    self_conf = part_dice(q_student, q_teacher, [(1,)]).mean().item()
    assert 0 < self_conf < 0.999
    assert logs["self_confidence"].item() == pytest.approx(self_conf, rel=1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_registered_method_builds_and_trains_its_students(method):
    """Each name of the registry has a class that builds from a config and whose step gives a
    finite loss with a gradient in every student it trains."""
    torch.manual_seed(0)
    students = {kind: TinySeg(1) for kind in METHODS[method].students}
    teachers = {kind: make_teacher(m) for kind, m in students.items()}
    step = build_method(TrainConfig(method=method), students, teachers, [(1,)])
    loss, logs = step.step(tiny_views(), 50, 100)
    loss.backward()
    assert torch.isfinite(loss) and logs["loss"] == loss.detach()
    assert all(m.conv.weight.grad.abs().sum() > 0 for m in students.values())


def test_samed_weights_its_loss_terms_and_suponly_does_not():
    student = TinySeg(1)
    v = tiny_views()
    logits = student(v.x_f)
    losses = {name: build_method(TrainConfig(method=name), {"foundation": student}, {"foundation": None},
                                 [(1,)]).step(v, 0, 1)[0] for name in ("suponly-foundation", "samed")}
    torch.testing.assert_close(losses["suponly-foundation"], ce_dice_loss(logits, v.y_f))
    torch.testing.assert_close(losses["samed"], ce_dice_loss(logits, v.y_f, ce_weight=0.2, dice_weight=0.8))


# ----------------------------------------------------------------------------- alpha and consistency options
# (Tables 7-8): "pattern models" whose predictions we choose, so every expected pseudo-label and
# alpha is computed here independently of the code under test.
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
    per_image = [((q[i] > 0) & confident[i]).sum().item() / max(1, confident[i].sum().item()) for i in range(2)]
    assert logs["confident_foreground@instances"].tolist() == pytest.approx(per_image, rel=1e-6)
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


def test_synfoc_options_reach_the_step_from_the_config():
    students = {"unet": TinySeg(1), "foundation": TinySeg(1)}
    teachers = {k: make_teacher(m) for k, m in students.items()}
    step = build_method(TrainConfig(alpha="cps", consistency="cr", threshold=0.9), students, teachers, [(1,)])
    assert (step.alpha_strategy, step.consistency, step.threshold) == ("cps", "cr", 0.9)
    assert step.unet is students["unet"] and step.teacher_foundation is teachers["foundation"]


def test_foundation_output_smaller_than_the_unet_input():
    """Method-spec section 9: with the foundation model's output (8 px here) smaller than the U-Net's
    input (16 px), mutual confidence is computed at the foundation output size against the U-Net
    teacher's nearest-downsampled labels, and CDCR compares the students at the U-Net size with the
    foundation student's probabilities upsampled by nearest neighbour."""
    teacher_ms, student_ms = masks((0, 8, 0, 5), (1, 6, 2, 7), size=8), masks((2, 6, 2, 6), (4, 8, 0, 8), size=8)
    unet, fm = PatternModel(STUDENT_UT, 3.0), PatternModel(student_ms, 3.0)
    model = SynFoC(unet, fm, PatternModel(TEACHER_UT, 10.0), PatternModel(teacher_ms, 10.0), [(1,)])
    v = blank_views()
    small = torch.zeros(2, 1, 8, 8)
    v.x_f, v.uw_f, v.us_f = small, small, small
    v.y_f, v.box_f = torch.zeros(2, 8, 8, dtype=torch.long), torch.zeros(2, 8, 8, dtype=torch.bool)
    _, logs = model.step(v, T, TOTAL)

    mutual = instance_dice(teacher_ms, TEACHER_UT[:, ::2, ::2])    # nearest 16 -> 8 keeps the even pixels
    assert logs["mutual_confidence"].item() == pytest.approx(sum(mutual) / 2, rel=1e-6)
    assert mutual != instance_dice(teacher_ms.repeat_interleave(2, 1).repeat_interleave(2, 2), TEACHER_UT)

    p_ut = torch.softmax(PatternModel(STUDENT_UT, 3.0)(small), dim=1)
    p_ms8 = torch.softmax(PatternModel(student_ms, 3.0)(small), dim=1)
    p_ms = p_ms8.repeat_interleave(2, 2).repeat_interleave(2, 3)   # nearest 8 -> 16
    agree = (p_ut.argmax(1) == p_ms.argmax(1)).unsqueeze(1).float()
    entropy = lambda p: -(p * torch.log(p))                        # noqa: E731
    expected_c = 0.5 * ((entropy(p_ut) * agree).mean() + (entropy(p_ms8) * agree[:, :, ::2, ::2]).mean())
    expected_d = (((p_ms - p_ut) ** 2) * (1 - agree)).mean()
    assert logs["loss_c"].item() == pytest.approx(expected_c.item(), rel=1e-5)
    assert logs["loss_d"].item() == pytest.approx(expected_d.item(), rel=1e-5) and expected_d > 0


def _numpy_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Foreground Dice of two label maps as SMC smooths it (Eqs. 4-5), 1 where both are empty."""
    inter, total = np.logical_and(a == 1, b == 1).sum(), (a == 1).sum() + (b == 1).sum()
    return 1.0 if total == 0 else (2 * inter + 1) / (total + 1.001)


def test_mean_teacher_logs_its_teachers_pseudo_label_dice_at_the_unet_size():
    """Base (U-Net / foundation) logs its teacher's pseudo-label Dice against the hidden labels as
    SynFoC logs its teachers' (mean and per image); a teacher whose output is smaller than the
    labels is resized bilinearly first. Checked against a Dice written out in numpy."""
    from synfoc.method.baselines import MeanTeacher
    torch.manual_seed(0)
    b, s = 3, 16
    box = torch.zeros(b, s, s, dtype=torch.bool)
    box[:, 2:6, 2:6] = True
    truth = (torch.rand(b, s, s) > 0.6).long()
    truth[2] = 0                                     # an image without lesion
    images = {k: torch.rand(b, 1, s, s) for k in ("x", "uw", "us")}
    label = (torch.rand(b, s, s) > 0.5).long()
    for kind, stride in (("unet", 1), ("foundation", 2)):
        student = nn.Conv2d(1, 2, 3, stride=stride, padding=1)
        teacher = copy.deepcopy(student)
        with torch.no_grad():
            teacher.bias.copy_(torch.tensor([0.0, 0.3]))
        v = Views(x_u=images["x"], y_u=label, uw_u=images["uw"], us_u=images["us"], box_u=box,
                  unlabeled_truth=truth)
        if kind == "foundation":
            v = Views(x_u=v.x_u, y_u=v.y_u, x_f=v.x_u, y_f=v.y_u, uw_f=v.uw_u, us_f=v.us_u, box_f=box,
                      unlabeled_truth=truth)
        _, logs = MeanTeacher(kind, student, teacher, 0.95, parts=[(1,)]).step(v, 1, 10)
        with torch.no_grad():
            p = torch.softmax(teacher(images["uw"]), 1)
        p = F.interpolate(p, size=(s, s), mode="bilinear", align_corners=False) if stride > 1 else p
        labels = p.argmax(1).numpy()
        expected = [_numpy_dice(labels[i], truth[i].numpy()) for i in range(b)]
        assert 0 < min(expected[:2]) and max(expected[:2]) < 1   # neither trivially right nor wrong
        np.testing.assert_allclose(logs[f"pseudo_dice_{kind}@instances"].numpy(), expected, rtol=1e-6)
        assert logs[f"pseudo_dice_{kind}"].item() == pytest.approx(np.mean(expected))
    # without parts (a benchmark building the step by hand) there is nothing to compute it with
    _, logs = MeanTeacher("unet", student, teacher, 0.95).step(
        Views(x_u=images["x"], y_u=label, uw_u=images["uw"], us_u=images["us"], box_u=box, unlabeled_truth=truth),
        1, 10)
    assert "pseudo_dice_unet" not in logs and "confident_foreground_recall" in logs


def test_confident_against_truth_counts_the_confident_pixels_by_the_hidden_labels():
    from synfoc.method.synfoc import confident_against_truth
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 3, (2, 8, 8), generator=g)
    truth = torch.randint(0, 3, (2, 8, 8), generator=g)
    w = torch.rand(2, 8, 8, generator=g) > 0.4
    out = confident_against_truth(q, w, truth)
    qs, ts, ws = q.flatten().tolist(), truth.flatten().tolist(), w.flatten().tolist()
    confident = [i for i, c in enumerate(ws) if c]
    true_fg = [i for i in confident if ts[i] > 0]
    assert out["confident_foreground_truth"].item() == pytest.approx(len(true_fg) / len(confident))
    assert out["confident_foreground_recall"].item() == pytest.approx(
        sum(qs[i] == ts[i] for i in true_fg) / len(true_fg))
    # truth at twice the size is nearest-resized to the pseudo-label's
    big = truth.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    assert confident_against_truth(q, w, big)["confident_foreground_recall"] == out["confident_foreground_recall"]
    # a pseudo-label equal to the truth recalls all of it
    assert confident_against_truth(truth, w, truth)["confident_foreground_recall"].item() == 1
