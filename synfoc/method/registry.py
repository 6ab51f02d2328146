"""The names of the methods, alpha strategies and consistency terms: the one list the command line,
the configuration checks, the sweep tables and the training loop read.

Kept free of torch and of the implementations, so that building the command-line parser stays
fast; a method's class is imported only when a run builds it (:func:`synfoc.build.build_method`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    """A trainable method: its name in the paper's tables, the students it trains, and its class
    (``module:Class``, with a ``build(cfg, students, teachers, parts)`` class method)."""

    title: str
    students: tuple[str, ...]
    implementation: str


METHODS: dict[str, MethodSpec] = {
    "synfoc": MethodSpec("SynFoC", ("unet", "foundation"), "synfoc.method.synfoc:SynFoC"),
    "base-unet": MethodSpec("Base", ("unet",), "synfoc.method.baselines:MeanTeacher"),
    "base-foundation": MethodSpec("Base", ("foundation",), "synfoc.method.baselines:MeanTeacher"),
    "suponly-unet": MethodSpec("SupOnly", ("unet",), "synfoc.method.baselines:SupOnly"),
    "suponly-foundation": MethodSpec("SupOnly", ("foundation",), "synfoc.method.baselines:SupOnly"),
    "samed": MethodSpec("SAMed", ("foundation",), "synfoc.method.baselines:SAMed"),
    "fixmatch": MethodSpec("FixMatch", ("unet",), "synfoc.method.baselines:FixMatch"),
}

# SynFoC's ensemble weight alpha (Eq. 6 and the ablations of Table 8), with their names in the tables.
ALPHA_STRATEGIES: dict[str, str] = {"smc": "SMC", "self": "self-only", "mutual": "mutual-only",
                                    "constant": "constant 0.5", "linear": "linear", "cps": "CPS"}
# SynFoC's consistency regulariser (Eqs. 8-10 and the ablations of Table 7).
CONSISTENCIES: dict[str, str] = {"cdcr": "CDCR", "cr": "CR", "none": "no CDCR"}


def method_spec(method: str) -> MethodSpec:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return METHODS[method]


def models_of(method: str) -> tuple[str, ...]:
    """Which students a method trains: ("unet", "foundation"), ("unet",) or ("foundation",)."""
    return method_spec(method).students


def baselines_of(student: str) -> tuple[str, ...]:
    """The single-model methods that train a student of this kind (SynFoC's comparisons)."""
    return tuple(name for name, spec in METHODS.items() if spec.students == (student,))

