"""What the models train on: a few cases' weak view, strong view and intermediate sample.

``synfoc data preview PATH --out FILE.png`` draws them before any training, from the same code that
makes the training batches (:func:`synfoc.views.make_views`), at both model input sizes. The
intermediate sample U_c takes the labeled weak view inside the box M (yellow) and the strong view
outside it; its label takes the labeled case's label inside the box and, outside it, the pseudo-label
— before training there is no teacher, so the unlabeled case's hidden label stands in for it, and
``synfoc report`` shows the final students' prediction instead.
"""

from __future__ import annotations

import numpy as np


def _uint8(image) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, C) uint8."""
    return (image.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())


def preview_png(cfg, index, cases: int = 4, students: dict | None = None, seed: int | None = None) -> bytes:
    """PNG of ``cases`` labeled/unlabeled pairs: per model input size the labeled weak view X_w, the
    unlabeled weak view U_w, its strong view U_s and the intermediate sample U_c (Eq. 1).

    Args:
        cfg: the training settings (split, sizes, augmentation ranges, seed).
        index: the dataset.
        students: trained students ({"foundation": ..., "unet": ...}); the first of foundation, unet
            gives the pseudo-label outside the box. None: the unlabeled case's hidden label.
    """
    import dataclasses

    import torch
    from matplotlib.patches import Rectangle

    from synfoc.augment import AugmentConfig, intermediate_sample
    from synfoc.build import with_image_size
    from synfoc.data import split_labeled
    from synfoc.evaluate import predict_labels
    from synfoc.figures import COLOUR_NAMES, overlay_contours, pyplot, save_figure
    from synfoc.method.synfoc import resize_labels
    from synfoc.runtime import Runtime
    from synfoc.views import load_arrays, make_views

    if cases < 1:
        raise ValueError(f"--cases must be at least 1, got {cases}")
    cfg = dataclasses.replace(cfg, batch_labeled=cases, batch_unlabeled=cases)
    domain = cfg.labeled_domain or index.domains[0]
    labeled_cases, unlabeled_cases = split_labeled(index, domain, cfg.labeled_num, cfg.labeled_ratio,
                                                   cfg.unlabeled_domains)
    if not unlabeled_cases:
        raise ValueError("the split has no unlabeled case to preview")
    sizes = {"unet": cfg.unet_size, "foundation": with_image_size(cfg).image_size}
    labeled = load_arrays(index, labeled_cases, list(sizes.values()), progress=False)
    unlabeled = load_arrays(index, unlabeled_cases, list(sizes.values()), progress=False)
    rt = Runtime(torch.device("cpu"), None)
    aug = AugmentConfig(brightness=tuple(cfg.brightness), contrast=tuple(cfg.contrast))
    v = make_views(cfg, aug, labeled, unlabeled, 0, sizes, rt, cfg.seed if seed is None else seed)

    guide = next((k for k in ("foundation", "unet") if students and k in students), None)
    outside = "hidden label" if guide is None else f"final {guide} student"
    parts = list(index.report_parts)
    plt = pyplot()
    columns = [("X_w", "labeled, weak + label"), ("U_w", "unlabeled, weak"),
               ("U_s", "unlabeled, strong"), ("U_c", f"box: X_w; outside: {outside}")]
    n = v.x_u.shape[0]
    fig, axes = plt.subplots(n, 2 * len(columns), figsize=(2.1 * 2 * len(columns), 2.2 * n + 0.4), squeeze=False)
    for s_i, (key, size) in enumerate((("u", sizes["unet"]), ("f", sizes["foundation"]))):
        x, y = getattr(v, f"x_{key}"), getattr(v, f"y_{key}")
        uw, us, box = getattr(v, f"uw_{key}"), getattr(v, f"us_{key}"), getattr(v, f"box_{key}")
        if guide is None:
            q = resize_labels(v.unlabeled_truth, size)
        else:
            q = predict_labels(students[guide], (uw * 255).round().byte(), size, rt.device, rt.autocast)
        u_c = intermediate_sample(x, us, box)
        q_c = intermediate_sample(y, q.long(), box)
        for i in range(n):
            tiles = [overlay_contours(_uint8(x[i]), y[i].numpy(), parts), _uint8(uw[i]), _uint8(us[i]),
                     overlay_contours(_uint8(u_c[i]), q_c[i].numpy(), parts)]
            for c_i, tile in enumerate(tiles):
                ax = axes[i, s_i * len(columns) + c_i]
                ax.imshow(tile if tile.shape[-1] == 3 else tile[..., 0], cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if c_i == 3:  # the box M, from its mask at this size
                    rows, cols = np.nonzero(box[i].numpy())
                    if rows.size:
                        ax.add_patch(Rectangle((cols.min() - 0.5, rows.min() - 0.5), cols.max() - cols.min() + 1,
                                               rows.max() - rows.min() + 1, fill=False, edgecolor="yellow", lw=1))
                if i == 0:
                    name, what = columns[c_i]
                    ax.set_title(f"{name} at {size}\n{what}", fontsize=7)
    legend = ", ".join(f"{COLOUR_NAMES[k % len(COLOUR_NAMES)]} {name}" for k, (name, _) in enumerate(parts))
    fig.suptitle(f"labeled domain {domain}; left: U-Net input {sizes['unet']}, right: foundation input "
                 f"{sizes['foundation']}; contours: {legend}; yellow box: M", fontsize=8)
    fig.tight_layout()
    return save_figure(fig)


def preview_main(args) -> int:
    """``synfoc data preview PATH --out FILE.png``."""
    from pathlib import Path

    from synfoc.config import resolve
    from synfoc.data.source import open_index
    from synfoc.options import overrides

    given = {**overrides(args), "dataset": args.path}
    if not Path(args.path).exists() and args.path != "synthetic":
        raise ValueError(f"dataset path does not exist: {args.path}")
    preset = args.preset or ("demo" if args.path == "synthetic" and not args.config else None)
    cfg = resolve(preset, args.config, given)
    if cfg.labeled_num is None and cfg.labeled_ratio is None:
        raise ValueError("data preview: give --labeled-num N or --labeled-ratio R (or a --preset that sets one)")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out}")
    png = preview_png(cfg, open_index(cfg), cases=args.cases)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    print(f"wrote {out}")
    return 0
