"""SynFoC: a foundation model and a U-Net teaching each other for mixed-domain semi-supervised segmentation."""

__version__ = "0.1.0"
