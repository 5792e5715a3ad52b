"""Every setting of an unlearning run, each spelled out once.

``PruneConfig`` decides which neurons are pruned, ``DataOptions`` how
forget/retain DATA become batches (``SourceOptions`` how one DATA spec is
read), ``EvidenceOptions`` which checks run beside the pruning. The objects
are passed whole through the library; the CLI builds its options from these
fields (flag, help and default live in the field's metadata), and a test
checks the MLproject's defaults against them. ``validate()`` names the flag a
user typed, so the same message serves the CLI and the Python API.

Importing this module is cheap (no torch): the CLI reads it for ``--help``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import ConfigError

FF = "ff"
ATTN = "attn"
KINDS = (FF, ATTN)

SCORINGS = ("abs", "freq", "rms", "std", "sqrt", "mean", "random")
# Names the reference implementation uses for the same importance functions.
SCORING_ALIASES = {"rand": "random"}
SELECTIONS = ("global", "per-layer")
BUDGET_METRICS = ("top1", "top10", "skip50_top1")
# the metrics a gate compares (gate --metric; a policy stores one)
GATE_METRICS = ("top1", "top5", "top10", "skip50_top1")
DEFAULT_EPS = {FF: 1e-3, ATTN: 1e-4}
# --quantized-check: the check's names of GGUF's block formats (evaluation.quantized)
QUANTIZED_FORMATS = {"int8": "Q8_0", "int4": "Q4_0"}


def option(default, help: str, *, flag: str | None = None, type=None, choices=None, is_flag: bool = False):
    """A dataclass field that also describes its CLI option (``flag`` defaults to ``--field-name``)."""
    meta = {"help": help, "flag": flag, "type": type, "choices": choices, "is_flag": is_flag}
    return field(default=default, metadata=meta)


def flag_of(cls, name: str) -> str:
    """The CLI flag of field ``name`` of config class ``cls``."""
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[name]
    return meta.get("flag") or "--" + name.replace("_", "-")


def canonical_scoring(name: str | None) -> str | None:
    """``rand`` -> ``random``; any other name unchanged (checked by ``validate``)."""
    return SCORING_ALIASES.get(name, name) if name is not None else None


def _fraction(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


@dataclass
class PruneConfig:
    """Every choice that determines which neurons get pruned (recorded with the result)."""

    ff_frac: float = option(0.02, "Fraction of all FF neurons pruned per step.", type=float)
    attn_frac: float = option(0.0, "Fraction of all attention neurons pruned per step.", type=float)
    steps: int | None = option(None, "Fixed number of steps (default 1 unless a budget is given).", type=int)
    target_forget_drop: float | None = option(
        None, "Budget mode: stop once the forget drop (relative, --budget-metric) reaches this.", type=float
    )
    max_retain_drop: float | None = option(
        None, "Budget mode: never keep a step that pushes the retain drop past this.", type=float
    )
    max_steps: int = option(50, "Budget mode: give up after this many steps.", type=int)
    budget_metric: str = option("top1", "The metric whose relative drops the budget reads.", choices=BUDGET_METRICS)
    scoring: str = option("abs", "Importance: " + ", ".join(SCORINGS) + " (rand = random).")
    attn_scoring: str | None = option(None, "Importance for attention neurons (default: --scoring).")
    selection: str = option("global", "Rank neurons across all layers or within each layer.", choices=SELECTIONS)
    ff_eps: float = option(DEFAULT_EPS[FF], "eps in I(forget) / (I(retain) + eps) for FF neurons.", type=float)
    attn_eps: float = option(DEFAULT_EPS[ATTN], "eps for attention neurons.", type=float)
    attn_mean_offset: bool = option(
        False, "Fold pruned attention neurons' mean activation into the bias.", is_flag=True
    )
    eval_every: int = option(1, "Evaluate every k steps (the last step always).", type=int)
    seed: int = option(0, "Seed for random scoring, the random control and the relearning check.", type=int)

    def __post_init__(self):
        self.scoring = canonical_scoring(self.scoring)
        self.attn_scoring = canonical_scoring(self.attn_scoring)

    @property
    def budget_mode(self) -> bool:
        return self.target_forget_drop is not None or self.max_retain_drop is not None

    @property
    def n_steps(self) -> int:
        """Steps to run: the fixed count, or the budget mode's ceiling."""
        if self.budget_mode:
            return self.max_steps
        return 1 if self.steps is None else self.steps

    def scoring_for(self, kind: str) -> str:
        return self.scoring if kind == FF else (self.attn_scoring or self.scoring)

    def frac(self, kind: str) -> float:
        return self.ff_frac if kind == FF else self.attn_frac

    def eps(self, kind: str) -> float:
        return self.ff_eps if kind == FF else self.attn_eps

    def active_kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind in KINDS if self.frac(kind) > 0)

    def validate(self, has_evaluate: bool = True) -> "PruneConfig":
        """Reject bad settings with one sentence naming the flag, before any weight is touched."""
        flag = lambda name: flag_of(PruneConfig, name)  # noqa: E731
        for name in ("ff_frac", "attn_frac"):
            value = getattr(self, name)
            if not _fraction(value) or not 0 <= value < 1:
                raise ConfigError(f"{flag(name)} must be in [0, 1), got {value}")
        if self.ff_frac == 0 and self.attn_frac == 0:
            raise ConfigError("--ff-frac and --attn-frac are both 0: nothing would be pruned; set one above 0")
        for name in ("scoring", "attn_scoring"):
            value = getattr(self, name)
            if value is not None and value not in SCORINGS:
                raise ConfigError(f"unknown {flag(name)} '{value}'; choose one of {', '.join(SCORINGS)}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"unknown --selection '{self.selection}'; choose 'global' or 'per-layer'")
        if self.budget_metric not in BUDGET_METRICS:
            raise ConfigError(
                f"unknown --budget-metric '{self.budget_metric}'; choose one of {', '.join(BUDGET_METRICS)}"
            )
        for name in ("ff_eps", "attn_eps"):
            if not _fraction(getattr(self, name)) or not getattr(self, name) > 0:
                raise ConfigError(f"{flag(name)} must be > 0, got {getattr(self, name)}")
        if not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ConfigError(f"--eval-every must be >= 1, got {self.eval_every}")
        if self.budget_mode:
            if self.steps is not None:
                raise ConfigError(
                    "choose either --steps or a budget (--target-forget-drop / --max-retain-drop), not both"
                )
            if self.target_forget_drop is not None and not (
                _fraction(self.target_forget_drop) and 0 < self.target_forget_drop <= 1
            ):
                raise ConfigError(f"--target-forget-drop must be in (0, 1], got {self.target_forget_drop}")
            if self.max_retain_drop is not None and not (
                _fraction(self.max_retain_drop) and 0 <= self.max_retain_drop < 1
            ):
                raise ConfigError(f"--max-retain-drop must be in [0, 1), got {self.max_retain_drop}")
            if not isinstance(self.max_steps, int) or self.max_steps < 1:
                raise ConfigError(f"--max-steps must be >= 1, got {self.max_steps}")
            if not has_evaluate:
                raise ConfigError("budget mode needs an evaluation function to measure forget and retain drops")
        elif self.steps is not None and (
            not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1
        ):
            raise ConfigError(f"--steps must be an integer >= 1, got {self.steps}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SourceOptions:
    """How one DATA spec is read. ``None`` means: not set here (fall back to the shared value)."""

    text_column: str | None = option(None, "Column holding the text (default: detect text/content/code/...).")
    glob: str | None = option(None, "For a directory DATA: which files to read, e.g. '*.py'.")
    paragraphs: bool | None = option(None, "For .txt DATA: one document per blank-line-separated block.", is_flag=True)
    split: str | None = option(None, "Dataset split (hub datasets, DatasetDicts).")
    data_config: str | None = option(None, "Hub dataset configuration, e.g. Python-all.")
    revision: str | None = option(None, "Hub dataset revision.")
    image_column: str | None = option(None, "Image DATA: column holding the images (default: image).")
    label_column: str | None = option(None, "Classifier DATA: column holding the class labels (default: label).")

    def over(self, shared: "SourceOptions") -> "SourceOptions":
        """These options, with unset fields taken from ``shared``."""
        return SourceOptions(
            **{
                f.name: getattr(shared, f.name) if getattr(self, f.name) is None else getattr(self, f.name)
                for f in dataclasses.fields(self)
            }
        )


SIDES = ("forget", "retain")


@dataclass
class DataOptions:
    """How forget/retain DATA become token batches."""

    max_length: int = option(128, "Tokens per sequence; longer documents are cut into chunks.", type=int)
    batch_size: int = option(16, "Sequences per batch.", type=int)
    collect_tokens: int = option(20_000, "Token budget per dataset for statistics (paper: 100000).", type=int)
    eval_tokens: int = option(10_000, "Token budget per dataset for metrics (paper: 100000).", type=int)
    eval_fraction: float = option(0.2, "Share of documents held out for metrics (split by document hash).", type=float)
    chunks_per_document: int | None = option(
        None,
        "Take at most this many chunks (of --max-length tokens) from each document, so a token budget "
        "spans more documents (default: every chunk).",
        type=int,
    )
    split_seed: int = option(
        0,
        "Which collect/eval split of the documents (and order within each part); 0 is "
        "the plain hash split, other seeds salt the hash.",
        type=int,
    )
    token_cache: bool = option(
        True,
        "Keep token ids on disk (user cache dir) so reruns do not tokenize again.",
        flag="--token-cache/--no-token-cache",
    )
    # how DATA is read: for both sides, and per side (--forget-text-column, --retain-split, ...)
    source: SourceOptions = field(default_factory=SourceOptions)
    forget_source: SourceOptions = field(default_factory=SourceOptions)
    retain_source: SourceOptions = field(default_factory=SourceOptions)
    # image classifiers only (token budgets and --max-length do not apply to them)
    collect_images: int = option(2_000, "Image classifiers: images per dataset for statistics (at most).", type=int)
    eval_images: int = option(1_000, "Image classifiers: images per dataset for metrics (at most).", type=int)
    forget_classes: str | None = option(
        None,
        "Classifiers (images, texts): forget these classes (names or ids, comma-separated, e.g. 3,7); the "
        "other classes are retained. --retain may then be left out (it defaults to the --forget DATA).",
    )

    def source_for(self, side: str) -> SourceOptions:
        return getattr(self, f"{side}_source").over(self.source)

    @property
    def min_tokens(self) -> int:
        """Fewer tokens than one full batch cannot give meaningful statistics or metrics."""
        return min(self.batch_size * self.max_length, self.collect_tokens, self.eval_tokens)

    def validate(self) -> "DataOptions":
        for name in ("max_length", "batch_size", "collect_tokens", "eval_tokens", "collect_images", "eval_images"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{flag_of(DataOptions, name)} must be an integer >= 1, got {value}")
        if self.chunks_per_document is not None and (
            not isinstance(self.chunks_per_document, int)
            or isinstance(self.chunks_per_document, bool)
            or self.chunks_per_document < 1
        ):
            raise ConfigError(f"--chunks-per-document must be an integer >= 1, got {self.chunks_per_document}")
        if (
            not isinstance(self.split_seed, int)
            or isinstance(self.split_seed, bool)
            or not 0 <= self.split_seed < 2**62
        ):
            raise ConfigError(f"--split-seed must be an integer >= 0, got {self.split_seed}")
        if self.max_length < 2:
            raise ConfigError("--max-length must be >= 2: next-token metrics need two tokens")
        if not _fraction(self.eval_fraction) or not 0 < self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must be strictly between 0 and 1, got {self.eval_fraction}")
        if self.forget_classes is not None:
            self.forget_class_list()
        return self

    def forget_class_list(self) -> list[str] | None:
        """``--forget-classes`` as a list of names or ids (as typed), or None when not given."""
        if self.forget_classes is None:
            return None
        value = self.forget_classes
        items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
        if not items or any(not item for item in items):
            raise ConfigError(
                f"--forget-classes must list class names or ids separated by commas, e.g. 3,7; got {value!r}"
            )
        if len(set(items)) != len(items):
            raise ConfigError(f"--forget-classes names a class twice: {value!r}")
        return items

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class EvidenceOptions:
    """The checks that make a drop mean something: a random control and an opt-in relearning test."""

    control: bool = option(
        True,
        "Also prune the same number of neurons per kind and layer at random "
        "and report its drops (--no-control skips it).",
        flag="--control/--no-control",
    )
    relearn_steps: int = option(
        0,
        "Relearning check: fine-tune the unlearned model, the parent and the random control this many steps on "
        "forget collect documents (none of them in the eval split), then measure forget top-1 (0: off).",
        type=int,
    )
    relearn_curve: str = option(
        "",
        "Steps of the relearning check at which forget top-1 is measured too, comma-separated, e.g. 0,5,10,20 "
        "(step 0, the models as they are, and the last step are always in it).",
    )
    relearn_lr: float = option(1e-4, "Learning rate of the relearning check (AdamW).", type=float)
    relearn_batch_size: int = option(8, "Sequences per relearning step.", type=int)
    samples: int = option(
        8,
        "Behaviour before and after: what the parent, the unlearned model and the random control answer on this "
        "many eval examples a side, logged as the run's table selprune/samples.json (0: off).",
        type=int,
    )
    sample_tokens: int = option(32, "Tokens generated per sample (causal LMs).", type=int)
    code_tasks: bool = option(
        False,
        "Causal LMs that unlearn Python: also run 40 offline Python function tasks (forget_code_pass_rate, "
        "generated code executed apart; forget_code_pass_rate_3shot with three solved examples shown first) and "
        "40 English cloze prompts (retain_cloze_accuracy) on the parent, the unlearned model and the control.",
        flag="--code-tasks/--no-code-tasks",
    )
    quantized_check: str = option(
        "",
        "Also measure the parent, the unlearned model and the control after a round trip of their Linear weights "
        "through GGUF block formats, comma-separated: int8 (Q8_0), int4 (Q4_0); e.g. int8,int4 (empty: off).",
    )
    allow_unsandboxed_code: bool = option(
        False,
        "With --code-tasks where bubblewrap (the sandbox of generated code) is not available: run the generated "
        "programs without it, in plain subprocesses that can read what this job can (refused otherwise).",
        is_flag=True,
    )

    def validate(self) -> "EvidenceOptions":
        self.quantized_check = ",".join(self.quantized_formats())  # one spelling, as recorded and gated on
        if not isinstance(self.relearn_steps, int) or isinstance(self.relearn_steps, bool) or self.relearn_steps < 0:
            raise ConfigError(f"--relearn-steps must be an integer >= 0, got {self.relearn_steps}")
        self.relearn_curve = ",".join(str(step) for step in self.relearn_points())
        if not _fraction(self.relearn_lr) or not 0 < self.relearn_lr < 1:
            raise ConfigError(f"--relearn-lr must be in (0, 1), got {self.relearn_lr}")
        batch = self.relearn_batch_size
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ConfigError(f"--relearn-batch-size must be an integer >= 1, got {self.relearn_batch_size}")
        for name in ("samples", "sample_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "samples" else 1):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be an integer >= {0 if name == 'samples' else 1}, got {value}"
                )
        return self

    def relearn_points(self) -> tuple[int, ...]:
        """``--relearn-curve`` as sorted step counts, each once, from 0 to ``--relearn-steps`` (empty when off)."""
        text = self.relearn_curve or ""
        if not isinstance(text, str):
            raise ConfigError(f"--relearn-curve must be comma-separated step counts such as 0,5,10,20, got {text!r}")
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if parts and not self.relearn_steps:
            raise ConfigError(
                "--relearn-curve needs --relearn-steps (the last step of the curve), e.g. --relearn-steps 20"
            )
        if not all(part.isascii() and part.isdigit() and len(part) <= 9 for part in parts):
            raise ConfigError(
                f"--relearn-curve must be comma-separated step counts >= 0 such as 0,5,10,20, got {text!r}"
            )
        points = {int(part) for part in parts}
        beyond = [step for step in points if step > self.relearn_steps]
        if beyond:
            raise ConfigError(
                f"--relearn-curve names step {max(beyond)}, beyond --relearn-steps {self.relearn_steps}; "
                "raise --relearn-steps or drop that step"
            )
        return tuple(sorted(points | {0, self.relearn_steps})) if self.relearn_steps else ()

    def quantized_formats(self) -> tuple[str, ...]:
        """``--quantized-check`` as format names, in the order given, each once."""
        text = self.quantized_check or ""
        if not isinstance(text, str):
            raise ConfigError(f"--quantized-check must be a comma-separated list such as int8,int4, got {text!r}")
        names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
        unknown = [name for name in names if name not in QUANTIZED_FORMATS]
        if unknown:
            raise ConfigError(
                f"--quantized-check: unknown format {unknown[0]!r}; choose from {', '.join(QUANTIZED_FORMATS)} "
                "(comma-separated, e.g. int8,int4)"
            )
        return names

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
