"""The dataset a configuration names: the embedded synthetic set, or a folder in one of the formats."""

from __future__ import annotations

from synfoc.data.base import DatasetIndex


def open_index(cfg) -> DatasetIndex:
    """The dataset of ``cfg`` (``dataset``, ``format`` and the ``synthetic_*`` sizes of a
    :class:`synfoc.config.TrainConfig`)."""
    if cfg.dataset == "synthetic":
        from synfoc.data.synthetic import SyntheticDataset
        return SyntheticDataset(seed=0, train_per_domain=cfg.synthetic_train, test_per_domain=cfg.synthetic_test,
                                num_classes=cfg.synthetic_classes)
    from synfoc.data.formats import open_dataset
    return open_dataset(cfg.dataset, cfg.format)
