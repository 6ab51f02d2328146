"""Datasets: the paper's four sets in their published layouts, users' own folders, checks,
the labeled/unlabeled split and in-memory caching at model input sizes.

    index = open_dataset("data/ProstateSlice")          # format recognised from the layout
    problems = check_dataset(index)                     # decodes every file
    labeled, unlabeled = split_labeled(index, "BIDMC", num=20)
"""

from synfoc.data.base import Case, DataError, DatasetIndex, Problem, Sample
from synfoc.data.cache import LoadedCases, load_cases, resize_image, resize_label
from synfoc.data.check import check_dataset, data_check_main, drop_bad
from synfoc.data.formats import FORMATS, detect_format, open_dataset
from synfoc.data.split import check_domains, read_split, split_labeled, write_split

__all__ = [
    "Case", "DataError", "DatasetIndex", "Problem", "Sample",
    "FORMATS", "detect_format", "open_dataset",
    "check_dataset", "data_check_main", "drop_bad",
    "check_domains", "read_split", "split_labeled", "write_split",
    "LoadedCases", "load_cases", "resize_image", "resize_label",
]
