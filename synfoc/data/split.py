"""The MiDSS labeled/unlabeled split (method-spec section 1) and writing it into a run folder."""

from __future__ import annotations

from pathlib import Path

from synfoc.data.base import Case, DataError, DatasetIndex


def _by_name(cases: list[Case]) -> list[Case]:
    return sorted(cases, key=lambda c: c.name)


def split_labeled(index: DatasetIndex, labeled_domain: str, num: int | None = None,
                  ratio: float | None = None) -> tuple[list[Case], list[Case]]:
    """Labeled = the first N training cases of ``labeled_domain`` in sorted name order;
    unlabeled = the rest of that domain plus every other domain's training split.

    Args:
        index: the dataset.
        labeled_domain: the one domain that gives labels.
        num: N, the number of labeled cases.
        ratio: instead of ``num``, N = int(ratio * total) where total is the number of training
            cases of ALL domains (BUSI 1/8 of 518 -> 64, 1/4 -> 129, as in the paper).

    Raises:
        DataError: unknown domain, neither or both of num/ratio, N < 1, or N larger than the
            labeled domain's training split.
    """
    if labeled_domain not in index.domains:
        raise DataError(f"unknown domain '{labeled_domain}'; this dataset has: {', '.join(index.domains)}")
    if (num is None) == (ratio is None):
        raise DataError("give exactly one of a number of labeled cases or a labeled ratio")
    domain_train = _by_name(index.cases_of(labeled_domain, "train"))
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise DataError(f"labeled ratio must be in (0, 1], not {ratio}")
        total = len(index.cases_of(split="train"))
        num = int(ratio * total)
        if num < 1:
            raise DataError(f"labeled ratio {ratio} of {total} training cases gives {num} labeled cases; need at least 1")
    assert num is not None
    if num < 1:
        raise DataError(f"number of labeled cases must be at least 1, not {num}")
    if num > len(domain_train):
        raise DataError(f"{num} labeled cases asked for, but domain '{labeled_domain}' has only "
                        f"{len(domain_train)} training cases")
    labeled = domain_train[:num]
    unlabeled = list(domain_train[num:])
    for domain in index.domains:
        if domain != labeled_domain:
            unlabeled.extend(_by_name(index.cases_of(domain, "train")))
    return labeled, unlabeled


def write_split(run_dir: str | Path, labeled: list[Case], unlabeled: list[Case]) -> tuple[Path, Path]:
    """Write ``labeled.txt`` and ``unlabeled.txt`` (one ``domain/name`` per line) into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = (run_dir / "labeled.txt", run_dir / "unlabeled.txt")
    for path, cases in zip(paths, (labeled, unlabeled)):
        path.write_text("".join(f"{c.domain}/{c.name}\n" for c in cases))
    return paths
