"""Per-domain Dice of a run's U-Net student with BatchNorm in eval mode (running statistics, the
paper's protocol) and in train mode (statistics of each domain's test batch), to tell a BatchNorm
statistics problem from a weights problem. Usage: python benchmarks/bn_modes.py RUN"""

import sys

import torch

from synfoc.data import load_cases
from synfoc.evaluate import load_run
from synfoc.method.synfoc import frozen_batchnorm_stats
from synfoc.metrics import batch_multiclass_metrics

cfg, index, students, rt = load_run(sys.argv[1], device="cpu")
unet = students["unet"]
print("| domain | Dice, BN running stats (eval) | Dice, BN batch stats (train) |\n|---|---:|---:|")
for domain in index.domains:
    loaded = load_cases(index, index.cases_of(domain, "test"), [cfg.unet_size], progress=False)
    images, truth = loaded.arrays[cfg.unet_size]
    dice = []
    for train_mode in (False, True):
        unet.train(train_mode)
        # batch statistics without moving the running ones, which the next domain's eval pass uses
        with torch.no_grad(), frozen_batchnorm_stats(unet):
            pred = unet(images.float() / 255).argmax(1).numpy()
        per_case = batch_multiclass_metrics(pred, truth.numpy(), index.report_parts)
        dice.append(sum(sum(p[n]["dice"] for n, _ in index.report_parts) / len(index.report_parts)
                        for p in per_case) / len(per_case))
    print(f"| {domain} | {100 * dice[0]:.2f} | {100 * dice[1]:.2f} |")
