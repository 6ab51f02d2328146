"""The labeled/unlabeled split (MiDSS by default, method-spec section 1; also SSMIS and UDA) and
writing it into a run folder."""

from __future__ import annotations

from pathlib import Path

from synfoc.data.base import Case, DataError, DatasetIndex


def _by_name(cases: list[Case]) -> list[Case]:
    return sorted(cases, key=lambda c: c.name)


def _units(cases: list[Case]) -> list[list[Case]]:
    """The cases in sorted name order, bundled by ``group`` (a patient) where a format set one;
    a case without a group is a unit of its own. Units are ordered by their first case's name."""
    units: dict[str, list[Case]] = {}
    for case in _by_name(cases):
        key = f"group:{case.group}" if case.group is not None else f"case:{case.name}"
        units.setdefault(key, []).append(case)
    return list(units.values())


def check_domains(index: DatasetIndex, domains, option: str) -> list[str]:
    """``domains`` (None: every domain of ``index``) checked against the dataset; the message
    names ``option`` (e.g. ``--test-domains``)."""
    if domains is None:
        return list(index.domains)
    unknown = [d for d in domains if d not in index.domains]
    if unknown:
        raise DataError(f"{option}: unknown domain(s) {', '.join(unknown)}; this dataset has: "
                        f"{', '.join(index.domains)}")
    if not domains:
        raise DataError(f"{option}: give at least one domain")
    return list(domains)


def split_labeled(index: DatasetIndex, labeled_domain: str, num: int | None = None,
                  ratio: float | None = None, unlabeled_domains: list[str] | None = None
                  ) -> tuple[list[Case], list[Case]]:
    """Labeled = the first N training units of ``labeled_domain`` in sorted name order;
    unlabeled = the training cases of ``unlabeled_domains``, except the labeled ones.

    A unit is a case, or all slices of one patient where the format knows patients
    (``Case.group``, e.g. ACDC): N then counts patients and a patient's slices are never split
    between labeled and unlabeled.

    Args:
        index: the dataset.
        labeled_domain: the one domain that gives labels.
        num: N, the number of labeled units.
        ratio: instead of ``num``: with ``unlabeled_domains`` None, N = int(ratio * total) where
            total counts the training units of ALL domains (the paper's mixed-domain rule: BUSI
            1/8 of 518 -> 64, 1/4 -> 129); with ``unlabeled_domains`` given, total counts the
            labeled domain only (UDA: ratio 1.0 labels the whole source domain).
        unlabeled_domains: the domains whose training cases are used without labels. None (the
            paper's mixed-domain setting): the rest of the labeled domain and every other domain.
            A labeled domain not listed here gives only its N labeled units.

    Raises:
        DataError: unknown domain, neither or both of num/ratio, N < 1, N larger than the
            labeled domain's training split, or no unlabeled case left.
    """
    if labeled_domain not in index.domains:
        raise DataError(f"unknown domain '{labeled_domain}'; this dataset has: {', '.join(index.domains)}")
    if (num is None) == (ratio is None):
        raise DataError("give exactly one of a number of labeled cases or a labeled ratio")
    unlabeled_from = check_domains(index, unlabeled_domains, "--unlabeled-domains") \
        if unlabeled_domains is not None else list(index.domains)
    domain_units = _units(index.cases_of(labeled_domain, "train"))
    what = "patients" if any(c.group is not None for u in domain_units for c in u) else "training cases"
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise DataError(f"labeled ratio must be in (0, 1], not {ratio}")
        counted = [labeled_domain] if unlabeled_domains is not None else index.domains
        total = sum(len(_units(index.cases_of(d, "train"))) for d in counted)
        num = int(ratio * total)
        if num < 1:
            raise DataError(f"labeled ratio {ratio} of {total} {what} gives {num} labeled; need at least 1")
    assert num is not None
    if num < 1:
        raise DataError(f"number of labeled cases must be at least 1, not {num}")
    if num > len(domain_units):
        raise DataError(f"{num} labeled {what} asked for, but domain '{labeled_domain}' has only "
                        f"{len(domain_units)} {what}")
    labeled = [c for unit in domain_units[:num] for c in unit]
    unlabeled: list[Case] = []
    for domain in index.domains:
        if domain not in unlabeled_from:
            continue
        if domain == labeled_domain:
            unlabeled.extend(c for unit in domain_units[num:] for c in unit)
        else:
            unlabeled.extend(_by_name(index.cases_of(domain, "train")))
    if not unlabeled:   # every method samples unlabeled batches
        raise DataError(f"no unlabeled training cases are left: {len(labeled)} labeled from '{labeled_domain}', "
                        f"unlabeled from {', '.join(unlabeled_from)}; label fewer or add --unlabeled-domains")
    return labeled, unlabeled


SPLIT_FILES = ("labeled.txt", "unlabeled.txt")


def split_key(case: Case) -> str:
    """How a case is named in the split files: ``domain/name``."""
    return f"{case.domain}/{case.name}"


def write_split(run_dir: str | Path, labeled: list[Case], unlabeled: list[Case]) -> tuple[Path, Path]:
    """Write ``labeled.txt`` and ``unlabeled.txt`` (one ``domain/name`` per line) into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = tuple(run_dir / f for f in SPLIT_FILES)
    for path, cases in zip(paths, (labeled, unlabeled)):
        path.write_text("".join(split_key(c) + "\n" for c in cases))
    return paths


def read_split(run_dir: str | Path) -> tuple[list[str] | None, list[str] | None]:
    """The ``domain/name`` lines of a run's ``labeled.txt`` and ``unlabeled.txt`` (what
    :func:`write_split` wrote), in file order; None for a file the run does not have."""
    run_dir = Path(run_dir)
    return tuple([line for line in (run_dir / f).read_text().splitlines() if line]
                 if (run_dir / f).is_file() else None for f in SPLIT_FILES)
