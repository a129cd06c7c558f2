"""The paper's claims judged in one table, from the analyses' JSON outputs in ``figures/``.

    python -m ssl_patch_analysis.claims --figures figures --out figures --cards pretrained/*.card.json

reads the JSON files that ``make figures`` writes (``convergence_*``, ``heatmap_*``, ``retrieval_*``,
``evaluate_*``) and, for b and e, the model cards given (:func:`read_cards`: the full protocol, marked "(full)"),
measures each claim of the paper (arXiv 2206.08954: its abstract and figure captions)
on every model found there, beside the same number for the random-init control (the outputs of the
same command with ``--random-init``, named ``<model>-random-init``), writes ``claims.md`` (a Markdown
table for the README) and ``claims.json`` to ``--out``, and prints the table. Nothing is measured
again here: remake the figures and the table follows them.

Claims and their numbers (each oriented so that the claim predicts a value above its bound: 0, and
``-MATCH_MARGIN`` points for e)

a. "with a multi-scale pretrained model ... the whole image embedding is approximately the average of
   local patch embeddings" (abstract; Fig. 3a). ``convergence_*.json``, per patch size (a fixed-scale
   model: its pretraining patch size only): *gain* = cos(mean of all grid patches, whole image) -
   cos(1 patch, whole image); *above chance* = cos(mean of all patches, whole image) - the same to
   another image's whole-image embedding. Judged on multi-scale models only (the claim is about
   them); fixed-scale models are shown, not judged.
b. "patch representation aggregation can improve various SOTA baseline methods" (abstract; Fig. 2,
   3b). ``evaluate_*.json``: top-1 of the mean of n patches (the largest n evaluated) minus the
   central view, k-NN (the first k) and linear probe, in points.
c. "the embedding space tends to preserve more locality compared to the projection space" (Fig. 4).
   ``heatmap_*.json``: per-image locality of h minus that of z (``paired_h_minus_z``), mean over
   images; the fraction of images where h is more local is shown beside it.
d. "the embedding space tends to preserve the local part information, whereas the projection space
   may collapse different parts of the same category" (Fig. 5). ``retrieval_*.json``, the k nearest
   neighbours of random query patches: *semantic* = same-class-other-image fraction in z minus in
   h; *local* = same-image fraction in h minus in z.
e. "learning a representation for fixed-scale patches and aggregating ... achieves similar or even
   better results than the baseline methods" (abstract; Fig. 2). ``evaluate_*.json``: each
   fixed-scale model's n-patch mean minus each multi-scale model's central view, k-NN and linear, in
   points; "similar" is read as above ``-MATCH_MARGIN`` = -2 points (solo-learn's ResNet-18 VICReg
   and SimCLR, which the field counts as comparable, differ by 1.4 points on CIFAR-10).

95% confidence intervals (half-widths). Differences of two numbers measured on the same items are
paired where the JSON files keep per-item values (convergence and heatmap: per image; evaluate: each
test image's right/wrong; retrieval: each query's neighbour counts); elsewhere (files written before
they kept them) a stated conservative bound is used.

- mean over images (convergence, heatmap): Student-t, t(0.975, n-1) * std / sqrt(n), with the
  sample std (ddof 1) over the n images (the ``ci95`` the convergence JSON records).
- difference of two such means of the same images (a: two points of a curve, or a point and its
  chance level), both keeping each image's value (``per_image``): paired, the same Student-t over
  the per-image differences.
- fraction p averaged over Q queries (retrieval), each query's fraction in [0, 1]:
  1.96 * sqrt(p(1-p)/Q). p(1-p) bounds the variance of any variable in [0, 1] with mean p
  (Bhatia-Davis), so this is at least the normal-approximation interval of the mean.
- difference of two such fractions of the same queries in z and h (d), both layers keeping each
  query's counts (``per_query``) on the same ``query_rows``: paired, Student-t over the per-query
  differences of fractions, t(0.975, Q-1) * std / sqrt(Q).
- accuracy p on N test images: binomial, normal approximation, 1.96 * sqrt(p(1-p)/N) (the k-NN bank
  and the probe's training set held fixed).
- difference of two accuracies on the same N test images (b; e when both evaluations name the same
  test images by ``test_ids_sha256``), both files keeping each image's right/wrong (``correct``):
  paired, Student-t over the per-image differences d in {-1, 0, 1}, t(0.975, N-1) * std(d) / sqrt(N).
- any other difference of two such numbers: sqrt(w1^2 + w2^2) of their half-widths, the unpaired
  interval. Both numbers are measured on the same images, queries or test images; unless they are
  negatively correlated over those items (two measurements of the same item are expected to
  correlate positively), the unpaired interval is at least as wide as the paired one, i.e.
  conservative (convergence, retrieval and evaluate JSONs written before per-item values were kept
  hold none for a paired interval).

Verdict rule (the outputs repeat it)

A measurement is *shown* when its CI lies entirely above the claimed bound, *opposite* when it lies
entirely below, *inconclusive* otherwise. It *beats its control* when it exceeds the random-init
control's value by more than the two half-widths together (the CIs do not overlap); for e, when
both accuracies compared exceed the random-init's accuracy under the same protocol by more than their
two half-widths (the level matched is learned, not a property of the architecture).

- reproduced: every judged measurement is shown and beats its control;
- not reproduced: no judged measurement is shown (each inconclusive or opposite): these data do not
  show the effect, which includes measurements too imprecise to show it;
- mixed: otherwise (some shown, some not; or all shown but a control not beaten or not measured);
- not measured: no input for the claim (the notes name the command that makes it).

A control is the random-init output of the same model, data and settings; failing that, one of
another model with the same architecture (the random weights depend only on the architecture and
the seed) and the same settings, named in the table. Evaluate outputs record no architecture, and
their patches follow the checkpoint's pretraining scale, so they take only their own control.
Settings are compared where both files record them: a setting an older output does not record (it
had one value then, e.g. the probe before ``--probe`` existed) is taken to agree.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from . import cli
from .checkpoints import read_checkpoint
from .cli import RENAMED_FLAGS
from .evaluate import read_correct
from .report import save_json
from .store import file_sha256
from .weights import SHIPPED_ALIASES

Z95 = 1.959963984540054  # scipy.stats.norm.ppf(0.975), "1.96"
MATCH_MARGIN = 2.0  # points: "similar" accuracy in claim e
RANDOM_INIT = "-random-init"
ANALYSES = ("convergence", "heatmap", "retrieval", "evaluate")
_FILE_PREFIXES = ("evaluate_boost", "convergence", "heatmap", "retrieval", "evaluate")  # longest match first
_UNRECORDED = object()  # a setting an output's JSON does not hold
_ARCHITECTURE_KEYS = ("arch", "stem", "cifar_padding", "width", "embedding_dim", "projector_dims",
                      "pre_feature_dims", "projection_normalized")

SHOWN, OPPOSITE, INCONCLUSIVE = "shown", "opposite", "inconclusive"
REPRODUCED, NOT_REPRODUCED, MIXED, NOT_MEASURED = "reproduced", "not reproduced", "mixed", "not measured"

UNPAIRED = ("Unpaired differences are conservative unless the two numbers are negatively correlated over the "
            "items both are measured on (same images, queries or test images: expected to correlate positively); "
            "they are used where the JSON files keep no per-item values for a paired interval (files written "
            "before they kept them).")
RULE = (f"A measurement is shown when its 95% CI lies entirely above the claimed bound (0; -{MATCH_MARGIN:g} points "
        "for e), "
        "opposite when entirely below, inconclusive otherwise; it beats its control when it exceeds the "
        "random-init control's value by more than the two CI half-widths together (for e: both accuracies "
        "compared exceed the random-init's under the same protocol by more than their two half-widths). "
        "Reproduced: every judged measurement shown and beating its control. Not reproduced: no judged "
        "measurement shown (these data do not show the effect; this includes too imprecise measurements). "
        "Mixed: otherwise, including a control not measured.")
CI_METHODS = {
    "student-t": "a mean over n images: Student-t, t(0.975, n-1) * std / sqrt(n)",
    "difference of student-t": "each mean over the same n images: Student-t, t(0.975, n-1) * std / sqrt(n); "
                               "the difference: sqrt(w1^2 + w2^2), unpaired",
    "difference of fractions": "each fraction p over the same Q queries: 1.96 * sqrt(p(1-p)/Q), an upper bound for "
                               "per-query fractions in [0, 1]; the difference: sqrt(w1^2 + w2^2), unpaired",
    "difference of accuracies": "each top-1 accuracy p on the same N test images: binomial, 1.96 * sqrt(p(1-p)/N); "
                                "the difference: sqrt(w1^2 + w2^2), unpaired",
    "paired difference of means": "two means over the same n images, each image's value kept: Student-t over the "
                                  "per-image differences, t(0.975, n-1) * std / sqrt(n)",
    "paired difference of fractions": "two fractions over the same Q queries, each query's counts kept: Student-t "
                                      "over the per-query differences of fractions, t(0.975, Q-1) * std / sqrt(Q)",
    "paired difference of accuracies": "two top-1 accuracies on the same N test images, each image's right/wrong "
                                       "kept: Student-t over the per-image differences d in {-1, 0, 1}, "
                                       "t(0.975, N-1) * std(d) / sqrt(N)",
}


# ---------------------------------------------------------------------------------------- intervals
@dataclass(frozen=True)
class Interval:
    """A value and the half-width of its 95% confidence interval."""

    value: float
    half_width: float

    @property
    def low(self) -> float:
        return self.value - self.half_width

    @property
    def high(self) -> float:
        return self.value + self.half_width

    def minus(self, other: Interval) -> Interval:
        """The difference, with the unpaired half-width sqrt(w1^2 + w2^2)."""
        return Interval(self.value - other.value, math.hypot(self.half_width, other.half_width))

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci95_low": self.low, "ci95_high": self.high, "half_width": self.half_width}


def student_t_half_width(std: float, n: int) -> float:
    """Half-width of the Student-t 95% CI of a mean of ``n`` values with sample std ``std``."""
    return float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan


def proportion_half_width(p: float, n: int) -> float:
    """1.96 * sqrt(p(1-p)/n): a binomial proportion, or (an upper bound for) a mean of values in [0, 1]."""
    return Z95 * math.sqrt(max(p * (1 - p), 0.0) / n)


def accuracy(percent: float, n: int) -> Interval:
    """A top-1 accuracy in percent on ``n`` test images, with its binomial half-width in points."""
    return Interval(percent, 100 * proportion_half_width(percent / 100, n))


def paired_mean(differences: np.ndarray, scale: float = 1.0) -> Interval:
    """The mean of per-item differences (two numbers measured on the same items) times ``scale``, with the
    Student-t half-width of that mean: the paired interval of every claim."""
    d = np.asarray(differences, dtype=np.float64)
    return Interval(scale * float(d.mean()), scale * student_t_half_width(float(d.std(ddof=1)), len(d)))


def paired_difference(right: np.ndarray, other: np.ndarray) -> Interval:
    """Accuracy of ``right`` minus that of ``other`` (per-image bools on the same test images), in points, with the
    Student-t half-width of the mean per-image difference."""
    return paired_mean(right.astype(np.float64) - other.astype(np.float64), scale=100)


# ---------------------------------------------------------------------------------------- measurements
@dataclass
class Measurement:
    """One number behind a claim, on one model (or pair of models), with its control."""

    model: str
    measure: str
    estimate: Interval
    ci_method: str
    source: str
    unit: str = ""  # "" (a similarity, fraction or score) or "points" (top-1 accuracy)
    bound: float = 0.0
    judged: bool = True
    not_judged_because: str | None = None
    control: Interval | None = None
    control_source: str | None = None
    control_note: str | None = None  # e.g. a control of another model with the same architecture
    control_missing: str | None = None  # the command that makes it
    control_beaten: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.estimate.low > self.bound:
            return SHOWN
        if self.estimate.high < self.bound:
            return OPPOSITE
        return INCONCLUSIVE

    def set_control(self, control: Interval, source: str, note: str | None = None) -> None:
        """The random-init's value of the same measure; beaten when the two CIs do not overlap."""
        self.control, self.control_source, self.control_note = control, source, note
        self.control_beaten = self.estimate.value - control.value > self.estimate.half_width + control.half_width

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "measure": self.measure, **self.estimate.to_dict(), "unit": self.unit,
                "ci_method": CI_METHODS[self.ci_method], "bound": self.bound, "status": self.status,
                "judged": self.judged, "not_judged_because": self.not_judged_because,
                "control": self.control.to_dict() if self.control else None, "control_source": self.control_source,
                "control_note": self.control_note,
                "control_missing": self.control_missing, "control_beaten": self.control_beaten,
                "source": self.source, "details": self.details}


@dataclass
class Claim:
    """A claim of the paper, the measurements that test it, and the verdict of :func:`judge`."""

    key: str
    statement: str
    paper: str
    measured_as: str
    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verdict: str = NOT_MEASURED
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"claim": self.key, "statement": self.statement, "paper": self.paper, "measured_as": self.measured_as,
                "verdict": self.verdict, "reason": self.reason,
                "measurements": [m.to_dict() for m in self.measurements], "notes": self.notes}


def judge(measurements: Sequence[Measurement]) -> tuple[str, str]:
    """The verdict of the module docstring's rule and its reason in words."""
    judged = [m for m in measurements if m.judged]
    if not judged:
        return NOT_MEASURED, "no judged measurement: its inputs are missing"
    shown = [m for m in judged if m.status == SHOWN]
    opposite = sum(m.status == OPPOSITE for m in judged)
    if not shown:
        return NOT_REPRODUCED, (f"no measurement shown: {len(judged) - opposite} of {len(judged)} inconclusive"
                                + (f", {opposite} opposite" if opposite else ""))
    unmeasured = sum(m.control is None for m in judged)
    not_beaten = sum(m.control is not None and not m.control_beaten for m in judged)
    if len(shown) == len(judged) and not unmeasured and not not_beaten:
        return REPRODUCED, f"all {len(judged)} shown and beating the random-init control"
    reasons = [f"{len(shown)} of {len(judged)} shown"]
    if opposite:
        reasons.append(f"{opposite} opposite")
    if not_beaten:
        reasons.append(f"{not_beaten} not beating the random-init control")
    if unmeasured:
        reasons.append(f"control not measured for {unmeasured}")
    return MIXED, "; ".join(reasons)


# ---------------------------------------------------------------------------------------- reading outputs
@dataclass(frozen=True)
class Output:
    """One analysis JSON file, ``<analysis>_<model>_<data>.json``, or the model cards of one checkpoint read as an
    evaluate output (``card``: :func:`read_cards`; ``path`` then names the card files)."""

    analysis: str
    model: str
    data: str
    path: Path
    doc: dict[str, Any]
    card: bool = False

    @property
    def random_init(self) -> bool:
        return self.model.endswith(RANDOM_INIT)


def read_outputs(figures: Path) -> tuple[dict[str, list[Output]], list[str]]:
    """The analyses' JSON files in ``figures`` by analysis (``evaluate`` from ``evaluate_*``, else
    ``evaluate_boost_*``), and a note for each file that could not be read."""
    found: dict[str, dict[tuple[str, str], Output]] = {name: {} for name in (*ANALYSES, "evaluate_boost")}
    notes = []
    for path in sorted(Path(figures).glob("*.json")):
        prefix = next((p for p in _FILE_PREFIXES if path.stem.startswith(p + "_")), None)
        if prefix is None:
            continue
        model, _, data = path.stem[len(prefix) + 1:].rpartition("_")
        if not model or not data:
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            notes.append(f"{path}: cannot be read ({error}); remake it with `make figures`")
            continue
        if not isinstance(doc, dict):  # e.g. a list: no analysis writes one
            notes.append(f"{path}: holds a JSON {type(doc).__name__}, not an analysis's output; remake it with "
                         "`make figures`")
            continue
        if prefix in ("convergence", "evaluate", "evaluate_boost") and doc.get("layer", "h") != "h":
            notes.append(f"{path}: of layer {doc.get('layer')}, not h (the claims' layer); left out: remake it "
                         "without --layers")
            continue
        layers = doc.get("heatmaps", {}).get("layers") if prefix == "heatmap" else None
        if isinstance(layers, list) and set(layers) != {"z", "h"}:  # was judged, its layers read into the model name
            notes.append(f"{path}: of layers {','.join(map(str, layers))}, not z,h (the claims compare h with z); "
                         "left out: remake it without --layers")
            continue
        found[prefix][(model, data)] = Output(prefix, model, data, path, doc)
    for key, boost in found.pop("evaluate_boost").items():
        found["evaluate"].setdefault(key, boost)
    return {name: list(outputs.values()) for name, outputs in found.items()}, notes


FULL = "full"  # how a model card's output is labelled: the full protocol, all training and test images


def _card_protocol(title: str) -> str:
    """A model card's protocol title as evaluate names the protocol: "central", "16 patches" -> "16"."""
    text = title.strip().lower()
    number = text.split(" ")[0]
    if text == "central":
        return text
    if number.isdigit() and text in (f"{number} patch", f"{number} patches"):
        return number
    raise ValueError(f"unknown protocol {title!r}")


def _card_k(knn: str | None) -> str:
    """The k of a card's k-NN ("weighted, cosine, k=20, T=0.07"; cards before it was recorded: 20)."""
    found = re.search(r"\bk=(\d+)", knn or "k=20")
    if found is None:
        raise ValueError(f"its k-NN {knn!r} names no k")
    return found.group(1)


def _check_card_row(row: dict[str, Any]) -> None:
    """A card row's protocols and accuracies are readable (else ValueError/KeyError/TypeError)."""
    _card_k(row.get("knn"))
    for kind in ("trained", "random_init"):
        for title, scores in (row.get(kind) or {}).items():
            _card_protocol(title)
            if not all(math.isfinite(float(scores[name])) for name in ("knn", "linear")):
                raise ValueError(f"{kind} {title}: an accuracy is not a number")


_CARD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError)


def _card_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a model card file, each checked readable (else one of ``_CARD_ERRORS``)."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    rows = rows if isinstance(rows, list) else [rows]
    if not rows:
        raise ValueError("it holds no rows")
    for row in rows:
        _check_card_row(row)
        str(row["checkpoint"]), str(row["checkpoint_sha256"]), int(row["train_images"]), int(row["test_images"])
    return rows


def _checkpoint_scale(checkpoint: Path) -> dict[str, Any] | None:
    """The patch scale a checkpoint records it was trained at, as evaluate records a ``patch_scale``."""
    train = read_checkpoint(checkpoint).get("train") or {}
    if train.get("patch_size"):
        return {"patch_size": int(train["patch_size"]), "scale": None}
    if train.get("min_scale") is not None and train.get("max_scale") is not None:
        return {"patch_size": None, "scale": [float(train["min_scale"]), float(train["max_scale"])]}
    return None


def _card_checkpoint(card: Path, recorded: Path) -> Path:
    """The checkpoint a card names: as recorded (from here), or, recorded relative to where the card was made (the
    repository's root, e.g. ``pretrained/x.pt``), under the first folder above the card that holds it."""
    if recorded.is_absolute() or recorded.is_file():
        return recorded
    return next((folder / recorded for folder in card.resolve().parents if (folder / recorded).is_file()), recorded)


def read_cards(paths: Sequence[Path | str]) -> tuple[list[Output], list[str]]:
    """Model cards (``pretrained/model_card.py --json``: CIFAR-10, every training image as the k-NN bank and the
    probe's training set, every test image) as evaluate outputs, and a note for each card left out.

    The rows of one checkpoint measured the same way (test images, extraction, seed, probe, k-NN) become one output
    of the trained model and one of its random-init control, whatever files they are in (e.g. the central view and
    the 16 patches measured apart), named after the shipped model (``emp-ssl (full, bf16)``). The patch scale is the
    one the checkpoint records; a card whose checkpoint is not there, or is not the file it measured (its sha256),
    is left out with a note: its numbers are of another model.
    """
    groups: dict[tuple, dict[str, Any]] = {}
    notes, digests = [], {}
    for path in map(Path, paths):
        kept = []  # a file is taken whole or not at all
        try:
            for row in _card_rows(path):
                checkpoint = _card_checkpoint(path, Path(row["checkpoint"]))
                if not checkpoint.is_file():
                    notes.append(f"{path}: its checkpoint {checkpoint} is not here; left out")
                    continue
                digest = digests.setdefault(checkpoint, file_sha256(checkpoint))
                if digest != row["checkpoint_sha256"]:
                    notes.append(f"{path}: measured another file than {checkpoint} is now (sha256 "
                                 f"{row['checkpoint_sha256'][:12]}..., the file {digest[:12]}...); left out: "
                                 "remake the card with pretrained/model_card.py")
                    continue
                key = (digest, row.get("extraction"), row.get("seed"), row.get("test_ids_sha256"),
                       int(row["train_images"]), int(row["test_images"]), row.get("probe"), row.get("knn"))
                kept.append((key, row, checkpoint))
        except _CARD_ERRORS as error:
            notes.append(f"{path}: not a model card that can be read ({type(error).__name__}: {error}); remake it "
                         "with pretrained/model_card.py --json")
            continue
        for key, row, checkpoint in kept:
            group = groups.setdefault(key, {"rows": [], "paths": [], "checkpoint": checkpoint})
            group["rows"].append(row)
            if path not in group["paths"]:
                group["paths"].append(path)
    outputs = []
    shipped = {stem: name for name, stem in SHIPPED_ALIASES.items()}
    for (_, extraction, seed, test_ids, train_images, test_images, probe, knn), group in groups.items():
        checkpoint = group["checkpoint"]
        precision = "" if extraction is None else ", bf16" if "bf16" in extraction else f", {extraction}"
        name = f"{shipped.get(checkpoint.stem, checkpoint.stem)} ({FULL}{precision})"
        k = _card_k(knn)
        doc: dict[str, Any] = {
            "train_data": "CIFAR-10 train", "test_data": "CIFAR-10 test", "train_size": train_images,
            "test_size": test_images, "test_ids_sha256": test_ids, "layer": "h", "knn_settings": {"ks": [int(k)]},
            "probe": probe, "patch_scale": _checkpoint_scale(checkpoint),
            **({"seed": seed} if seed is not None else {}), **({"extraction": extraction} if extraction else {})}
        source = Path(" + ".join(p.name for p in group["paths"]))
        for kind, suffix in (("trained", ""), ("random_init", RANDOM_INIT)):
            protocols = {}
            for row in group["rows"]:
                correct = (row.get("correct") or {}).get(kind) or {}
                for title, scores in (row.get(kind) or {}).items():
                    entry = {"protocol": _card_protocol(title), "knn": {k: scores["knn"]}, "linear": scores["linear"]}
                    kept = correct.get(title) or {}
                    if kept.get("knn") and kept.get("linear"):
                        entry["correct"] = {"knn": {k: kept["knn"]}, "linear": kept["linear"]}
                    protocols[entry["protocol"]] = entry
            if protocols:
                outputs.append(Output("evaluate", name + suffix, "cifar10", source,
                                      {**doc, "protocols": list(protocols.values())}, card=True))
    return outputs, notes


def _architecture(doc: dict[str, Any]) -> tuple | None:
    info = doc.get("model_info")
    if info is None and isinstance(doc.get("layers"), dict):  # retrieval keeps it with each layer's index
        info = next(iter(doc["layers"].values()), {}).get("index", {}).get("model")
    if not isinstance(info, dict) or "arch" not in info:
        return None
    return tuple(json.dumps(info.get(key)) for key in _ARCHITECTURE_KEYS)


def control_command(output: Output) -> str:
    """The command that makes ``output``'s random-init control: its own command with ``--random-init``
    (flags of earlier versions renamed as the command-line vocabulary says)."""
    analysis = "evaluate" if output.analysis == "evaluate_boost" else output.analysis
    recorded = output.doc.get("command")
    if isinstance(recorded, str):
        words = shlex.split(recorded)
    elif isinstance(recorded, list):
        words = [str(w) for w in recorded]
    else:
        words = ["python", "-m", f"ssl_patch_analysis.{analysis}", "--model", output.model, "--data", output.data]
        if analysis == "retrieval":
            d = output.doc
            words += ["--patch-size", str(d["patch_size"]), "--stride", str(d["stride"]), "--num-images",
                      str(d["num_images"]), "--neighbours", str(d["k"]), "--num-queries", str(d["num_queries"])]
    renamed = RENAMED_FLAGS.get(analysis, {})
    words = [renamed[w].split()[0] if w in renamed else w for w in words]
    return shlex.join(words + ([] if "--random-init" in words else ["--random-init"]))


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif value is not _UNRECORDED:
            flat[prefix + key] = json.dumps(value)
    return flat


def same_settings(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two outputs' settings agree on every setting both record: a setting an older output does not
    record (it had one value then, e.g. the probe before ``--probe`` existed) is taken to agree."""
    a, b = _flat(a), _flat(b)
    return all(a[key] == b[key] for key in a.keys() & b.keys())


def _recorded(doc: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {key: doc.get(key, _UNRECORDED) for key in keys}


def find_control(candidates: Sequence[Output], shipped: Output,
                 settings: Callable[[dict[str, Any]], dict[str, Any]]) -> tuple[Output | None, str | None]:
    """The random-init output that controls ``shipped`` (see the module docstring), or ``None`` and a
    note saying which command makes it."""
    own = [c for c in candidates if c.random_init and c.data == shipped.data and c.model == shipped.model + RANDOM_INIT]
    architecture = _architecture(shipped.doc)
    alike = [c for c in candidates if c.random_init and c.data == shipped.data and c not in own
             and architecture is not None and _architecture(c.doc) == architecture]
    wanted = settings(shipped.doc)
    for candidate in own + alike:
        if same_settings(settings(candidate.doc), wanted):
            return candidate, None
    command = control_command(shipped)
    if own:
        return None, (f"{own[0].path.name} was measured with other settings than {shipped.path.name}: "
                      f"make the control with `{command}`")
    return None, f"no random-init control for {shipped.path.name}: make it with `{command}`"


def _control_note(control: Output, shipped: Output) -> str | None:
    if control.model == shipped.model + RANDOM_INIT:
        return None
    return f"of {control.model}, the same architecture"


def _missing_analysis_note(analysis: str) -> str:
    return (f"no {analysis}_<model>_<data>.json in the figures folder: `make figures` writes them "
            f"(e.g. `python -m ssl_patch_analysis.{analysis} --model vicreg`)")


def _shipped_outputs(claim: Claim, outputs: Sequence[Output], analysis: str) -> list[Output]:
    """The outputs of trained models (not the random-init controls); a note on ``claim`` when there are none."""
    shipped = [o for o in outputs if not o.random_init]
    if not shipped:
        claim.notes.append(_missing_analysis_note(analysis))
    return shipped


# ---------------------------------------------------------------------------------------- claim a
def _convergence_settings(doc: dict[str, Any]) -> dict[str, Any]:
    return _recorded(doc, ("data", "layer", "num_images", "draws", "seed", "resize_to", "whole_image_size", "tokens"))


def _curve_key(curve: dict[str, Any]) -> tuple:
    return curve.get("patch_size"), curve.get("stride"), curve.get("fed_size")


def _per_image(curve: dict[str, Any], p: dict[str, Any], kind: str, source: str) -> np.ndarray | None:
    """A point's per-image values of ``kind`` (similarity or chance), or None when the file does not keep them;
    values that do not give the recorded mean are refused in one line."""
    values = p[kind].get("per_image")
    if not values:
        return None
    values = np.asarray(values, dtype=np.float64)
    if not np.isclose(values.mean(), p[kind]["mean"], rtol=0, atol=1e-9):
        what = f"{curve.get('patch_size')} px, N={p['n']}" + ("" if kind == "similarity" else f" ({kind})")
        raise ValueError(f"{source}: the per-image values of {what} do not give its mean ({p[kind]['mean']}); "
                         "the file is damaged: remake it with `make figures`")
    return values


def _convergence_numbers(curve: dict[str, Any], source: str = "") -> tuple[Interval, Interval, dict[str, Any], str]:
    """(gain from 1 to all patches, margin above chance with all patches, the points used, the CI method): paired
    over images when the points keep each image's value, else the unpaired combination of their half-widths."""
    points = sorted(curve["points"], key=lambda p: p["num_averaged"])
    first, last = points[0], points[-1]
    details = {"n_first": first["n"], "n_last": last["n"], "num_averaged_last": last["num_averaged"],
               "similarity_first": first["similarity"]["mean"], "similarity_last": last["similarity"]["mean"],
               "chance_first": first["chance"]["mean"], "chance_last": last["chance"]["mean"]}
    values = [_per_image(curve, p, kind, source)
              for p, kind in ((first, "similarity"), (last, "similarity"), (last, "chance"))]
    if all(v is not None for v in values) and len({len(v) for v in values}) == 1:
        v_first, v_last, v_chance = values
        return paired_mean(v_last - v_first), paired_mean(v_last - v_chance), details, "paired difference of means"

    def point(p: dict[str, Any], kind: str) -> Interval:
        return Interval(p[kind]["mean"], p[kind]["ci95"])

    gain = point(last, "similarity").minus(point(first, "similarity"))
    above_chance = point(last, "similarity").minus(point(last, "chance"))
    return gain, above_chance, details, "difference of student-t"


def convergence_claim(outputs: Sequence[Output]) -> Claim:
    claim = Claim("a", "the mean of patch embeddings converges to the whole-image embedding as N grows",
                  "abstract; Fig. 3a",
                  "cosine to the whole image, layer h: mean of all patches minus 1 patch (gain), and all patches "
                  "minus the chance level of another image (above chance), per patch size (convergence_*.json)")
    shipped = _shipped_outputs(claim, outputs, "convergence")
    for out in shipped:
        pretraining = out.doc.get("pretraining_patch_size")
        curves = [c for c in out.doc["curves"] if pretraining is None or c["patch_size"] == pretraining]
        if not curves:
            claim.notes.append(f"{out.path.name}: no curve at the pretraining patch size {pretraining} px")
        control, note = find_control(outputs, out, _convergence_settings)
        if note:
            claim.notes.append(note)
        control_curves = {_curve_key(c): c for c in control.doc["curves"]} if control else {}
        for curve in curves:
            gain, above, details, method = _convergence_numbers(curve, out.path.name)
            ps = curve["patch_size"]
            layer = out.doc.get("layer", "h")
            names = (f"{ps} px: gain N={details['n_first']}→{details['n_last']}",
                     f"{ps} px: above chance at N={details['n_last']}")
            control_curve = control_curves.get(_curve_key(curve))
            control_numbers = (_convergence_numbers(control_curve, control.path.name)[:2] if control_curve
                               else (None, None))
            for name, estimate, control_estimate in zip(names, (gain, above), control_numbers, strict=True):
                m = Measurement(out.model, name, estimate, method, out.path.name,
                                judged=pretraining is None, details={**details, "layer": layer})
                if pretraining is not None:
                    m.not_judged_because = (f"fixed-scale model ({pretraining} px patches): the claim is about "
                                            "multi-scale models")
                if control_estimate is not None:
                    m.set_control(control_estimate, control.path.name, _control_note(control, out))
                elif control is not None:
                    m.control_missing = f"{control.path.name} has no {ps} px curve"
                else:
                    m.control_missing = note
                claim.measurements.append(m)
    return claim


# ---------------------------------------------------------------------------------------- claims b and e
def _comparison_settings(doc: dict[str, Any]) -> dict[str, Any]:
    """What two models' evaluations must share to be compared: the same images, classifiers and features."""
    settings = _recorded(doc, ("test_data", "train_data", "train_size", "test_size", "seed", "layer", "resize_to",
                               "probe", "augmentation", "extraction"))
    settings["probe_schedule"] = {k: v for k, v in (doc.get("probe_schedule") or {}).items() if k != "text"}
    settings["ks"] = (doc.get("knn_settings") or {}).get("ks", _UNRECORDED)
    return settings


def _evaluate_settings(doc: dict[str, Any]) -> dict[str, Any]:
    """What a control must share with the evaluation it controls: also the patches' scale."""
    return {**_comparison_settings(doc), "patch_scale": doc.get("patch_scale")}


def evaluation_accuracies(doc: dict[str, Any]) -> tuple[dict[str, dict[str, float]], str | None, str]:
    """``({protocol: {classifier: top-1 %}}, the largest n-patch protocol, the k-NN classifier's name)`` from an
    evaluate JSON (its protocols, or an evaluate_boost JSON's rows); classifiers: ``kNN k=<first k>``, ``linear``."""
    k = (doc.get("knn_settings") or {}).get("ks", [20])[0]
    knn = f"kNN k={k}"
    table: dict[str, dict[str, float]] = {}
    for row in doc.get("protocols", []):
        scores = row.get("knn", {})
        table[str(row["protocol"])] = {knn: scores.get(str(k), scores.get(k)), "linear": row.get("linear")}
    boost = doc.get("boost")
    if not table and boost:
        for row in boost["rows"]:
            if row["classifier"] in (knn, "linear"):
                table.setdefault("central", {})[row["classifier"]] = row["central"]
                table.setdefault(str(boost["patch_protocol"]), {})[row["classifier"]] = row["patches"]
    many = [p for p in table if p.isdigit() and int(p) > 1]
    return table, (max(many, key=int) if many else None), knn


def _correct(doc: dict[str, Any], protocol: str, classifier: str, source: str) -> np.ndarray | None:
    """Each test image's right/wrong under ``protocol`` and ``classifier`` (``kNN k=<k>`` or ``linear``) from an
    evaluate JSON, or None when the file does not keep them; a file whose values do not give its accuracy is
    refused in one line."""
    row = next((r for r in doc.get("protocols", []) if str(r["protocol"]) == protocol), None)
    correct = (row or {}).get("correct")
    if not correct:
        return None
    if classifier == "linear":
        text, recorded = correct.get("linear"), row.get("linear")
    else:
        k = classifier.rpartition("=")[2]
        text, recorded = (correct.get("knn") or {}).get(k), (row.get("knn") or {}).get(k)
    if text is None or recorded is None:
        return None
    try:
        values = read_correct(text)
    except ValueError as error:
        raise ValueError(f"{source}: {error}; remake it with `make figures`") from None
    # the recorded accuracy is a float32 mean: it names the count of right images to well within half an image
    if len(values) != doc.get("test_size") or int(values.sum()) != round(recorded * len(values) / 100):
        raise ValueError(f"{source}: the per-image values of {protocol} / {classifier} do not give its accuracy "
                         f"({recorded}); the file is damaged: remake it with `make figures`")
    return values


def accuracy_difference(a: Output, protocol_a: str, b: Output, protocol_b: str, classifier: str
                        ) -> tuple[Interval, str]:
    """Top-1 of ``a`` under ``protocol_a`` minus ``b`` under ``protocol_b`` and the name of its CI method: paired
    when both files keep each test image's right/wrong on the same test images, else unpaired (conservative)."""
    table_a, _, _ = evaluation_accuracies(a.doc)
    table_b, _, _ = evaluation_accuracies(b.doc)
    same_images = a.path == b.path or (a.doc.get("test_ids_sha256") is not None
                                       and a.doc.get("test_ids_sha256") == b.doc.get("test_ids_sha256"))
    if same_images:
        right_a = _correct(a.doc, protocol_a, classifier, a.path.name)
        right_b = _correct(b.doc, protocol_b, classifier, b.path.name)
        if right_a is not None and right_b is not None:
            return paired_difference(right_a, right_b), "paired difference of accuracies"
    estimate = accuracy(table_a[protocol_a][classifier], a.doc["test_size"]).minus(
        accuracy(table_b[protocol_b][classifier], b.doc["test_size"]))
    return estimate, "difference of accuracies"


def _is_fixed_scale(doc: dict[str, Any]) -> bool:
    return bool((doc.get("patch_scale") or {}).get("patch_size"))


def _is_multi_scale(doc: dict[str, Any]) -> bool:
    return bool((doc.get("patch_scale") or {}).get("scale"))


def _cards_source(outputs: Sequence[Output]) -> str:
    return (f"; ({FULL}): the model cards, every one of the {_card_test_sizes(outputs)} test images and all training "
            "images as the k-NN bank and the probe's training set" if any(o.card for o in outputs) else "")


def _card_test_sizes(outputs: Sequence[Output]) -> str:
    sizes = sorted({int(o.doc["test_size"]) for o in outputs if o.card})
    return " / ".join(f"{n:,}" for n in sizes)


def aggregation_claim(outputs: Sequence[Output]) -> Claim:
    claim = Claim("b", "n-patch aggregation beats the central view and boosts multi-scale baselines",
                  "abstract; Fig. 2, 3b",
                  "top-1 (points) of the mean of n patches at the pretraining scale minus the central view, k-NN "
                  "and linear probe (evaluate_*.json" + _cards_source(outputs) + ")")
    shipped = _shipped_outputs(claim, outputs, "evaluate")
    cards_without_both = []
    for out in shipped:
        table, many, knn = evaluation_accuracies(out.doc)
        if many is None or "central" not in table:
            if out.card:
                cards_without_both.append(out.model)
            else:
                claim.notes.append(f"{out.path.name}: needs the protocols central and n > 1 (--protocols central,1,16)")
            continue
        control, note = find_control(outputs, out, _evaluate_settings)
        if note:
            claim.notes.append(note)
        n = out.doc["test_size"]
        for classifier in (knn, "linear"):
            estimate, method = accuracy_difference(out, many, out, "central", classifier)
            m = Measurement(out.model, f"{classifier}: {many} patches − central", estimate, method,
                            out.path.name, unit="points",
                            details={"central": table["central"][classifier], "patches": table[many][classifier],
                                     "protocol": many, "test_size": n,
                                     "multi_scale": _is_multi_scale(out.doc)})
            if control is not None:
                _, cmany, _ = evaluation_accuracies(control.doc)
                random, _ = accuracy_difference(control, cmany, control, "central", classifier)
                m.set_control(random, control.path.name)
            else:
                m.control_missing = note
            claim.measurements.append(m)
    if cards_without_both:
        claim.notes.append("model cards without both the central view and n patches measured the same way: "
                           + ", ".join(cards_without_both))
    return claim


def matching_claim(outputs: Sequence[Output]) -> Claim:
    claim = Claim("e", "fixed-scale patch models match multi-scale baselines", "abstract; Fig. 2",
                  f"top-1 (points) of a fixed-scale model's n-patch mean minus a multi-scale model's central view, "
                  f"k-NN and linear; matching = above −{MATCH_MARGIN:g} points (evaluate_*.json"
                  + _cards_source(outputs) + ")")
    shipped = [o for o in outputs if not o.random_init]
    fixed = [o for o in shipped if _is_fixed_scale(o.doc)]
    multi = [o for o in shipped if _is_multi_scale(o.doc)]
    if not fixed or not multi:
        claim.notes.append("needs the evaluation of a fixed-scale and of a multi-scale model: "
                           + _missing_analysis_note("evaluate"))
    for patchy in fixed:
        for baseline in multi:
            if patchy.card != baseline.card:  # model cards (the full protocol) with model cards only
                continue
            if patchy.data != baseline.data or not same_settings(_comparison_settings(patchy.doc),
                                                                    _comparison_settings(baseline.doc)):
                claim.notes.append(f"{patchy.path.name} and {baseline.path.name} were evaluated with other settings: "
                                   "not compared")
                continue
            table, many, knn = evaluation_accuracies(patchy.doc)
            base_table, _, _ = evaluation_accuracies(baseline.doc)
            if many is None or "central" not in base_table:
                claim.notes.append(f"{patchy.path.name} needs an n-patch protocol and {baseline.path.name} the "
                                   "central one")
                continue
            controls = [find_control(outputs, o, _evaluate_settings) for o in (patchy, baseline)]
            notes = [note for _, note in controls if note]
            claim.notes.extend(note for note in notes if note not in claim.notes)
            n = patchy.doc["test_size"]
            for classifier in (knn, "linear"):
                ours, theirs = accuracy(table[many][classifier], n), accuracy(base_table["central"][classifier], n)
                estimate, method = accuracy_difference(patchy, many, baseline, "central", classifier)
                m = Measurement(f"{patchy.model} vs {baseline.model}",
                                f"{classifier}: {patchy.model} {many} patches − {baseline.model} central",
                                estimate, method,
                                f"{patchy.path.name}, {baseline.path.name}", unit="points", bound=-MATCH_MARGIN,
                                details={"fixed_scale": ours.value, "multi_scale_central": theirs.value,
                                         "test_size": n})
                (patchy_control, _), (baseline_control, _) = controls
                if patchy_control is None or baseline_control is None:
                    m.control_missing = "; ".join(notes)
                else:
                    ctable, cmany, _ = evaluation_accuracies(patchy_control.doc)
                    btable, _, _ = evaluation_accuracies(baseline_control.doc)
                    random_ours = accuracy(ctable[cmany][classifier], patchy_control.doc["test_size"])
                    random_theirs = accuracy(btable["central"][classifier], baseline_control.doc["test_size"])
                    random_difference, _ = accuracy_difference(patchy_control, cmany, baseline_control, "central",
                                                               classifier)
                    m.set_control(random_difference,
                                  f"{patchy_control.path.name}, {baseline_control.path.name}",
                                  f"random init {random_ours.value:.1f} vs {random_theirs.value:.1f}, trained "
                                  f"{ours.value:.1f} vs {theirs.value:.1f}")
                    m.control_beaten = all(trained.value - random.value > trained.half_width + random.half_width
                                           for trained, random in ((ours, random_ours), (theirs, random_theirs)))
                    m.details.update({"random_init_fixed_scale": random_ours.value,
                                      "random_init_multi_scale_central": random_theirs.value})
                claim.measurements.append(m)
    return claim


# ---------------------------------------------------------------------------------------- claim c
def _heatmap_settings(doc: dict[str, Any]) -> dict[str, Any]:
    return {**_recorded(doc, ("data",)),
            "heatmaps": _recorded(doc.get("heatmaps", {}), ("grid_shape", "patch_size", "stride", "resize_to")),
            "locality": _recorded(doc.get("locality", {}), ("image_ids",))}


def _paired_locality(doc: dict[str, Any]) -> tuple[Interval, dict[str, Any]] | None:
    paired = (doc.get("locality") or {}).get("paired_h_minus_z")
    if not paired:
        return None
    n = paired["num_images"]
    return (Interval(paired["mean"], student_t_half_width(paired["std"], n)),
            {"fraction_h_more_local": paired["fraction_h_more_local"], "num_images": n, "std": paired["std"]})


def locality_claim(outputs: Sequence[Output]) -> Claim:
    claim = Claim("c", "the embedding h is more local than the projection z", "Fig. 4",
                  "locality (−Spearman rho of similarity vs distance within an image) of h minus z, paired per image, "
                  "mean over images; in brackets the fraction of images where h is more local (heatmap_*.json)")
    shipped = _shipped_outputs(claim, outputs, "heatmap")
    for out in shipped:
        paired = _paired_locality(out.doc)
        if paired is None:
            claim.notes.append(f"{out.path.name}: no paired h/z locality (run the heatmap with --layers z,h)")
            continue
        control, note = find_control(outputs, out, _heatmap_settings)
        m = Measurement(out.model, f"{out.data}: locality h − z", paired[0], "student-t", out.path.name,
                        details=paired[1])
        control_paired = _paired_locality(control.doc) if control else None
        if control_paired is not None:
            m.set_control(control_paired[0], control.path.name, _control_note(control, out))
            m.details["control_fraction_h_more_local"] = control_paired[1]["fraction_h_more_local"]
        else:
            m.control_missing = note or f"{control.path.name}: no paired h/z locality"
            claim.notes.append(m.control_missing)
        claim.measurements.append(m)
    return claim


# ---------------------------------------------------------------------------------------- claim d
def _retrieval_settings(doc: dict[str, Any]) -> dict[str, Any]:
    return _recorded(doc, ("data", "patch_size", "stride", "num_images", "k", "num_queries"))


def _query_fractions(stats_: dict[str, Any], key: str, layer: str, source: str) -> np.ndarray | None:
    """Each query's fraction ``key`` from a layer's ``per_query`` counts, or None when the file does not keep them;
    counts that do not give the recorded fraction are refused in one line."""
    per_query = stats_.get("per_query") or {}
    if key not in per_query or "found" not in per_query:
        return None
    counts, found = np.asarray(per_query[key], dtype=np.float64), np.asarray(per_query["found"], dtype=np.float64)
    if (len(counts) != stats_["num_queries"] or len(found) != len(counts)
            or not np.isclose(np.mean(counts / np.maximum(found, 1)), stats_[key], rtol=0, atol=1e-9)):
        raise ValueError(f"{source}: the per-query counts of {layer} / {key} do not give its fraction "
                         f"({stats_[key]}); the file is damaged: remake it with `make figures`")
    return counts / np.maximum(found, 1)


def _retrieval_numbers(doc: dict[str, Any], source: str = "") -> tuple[tuple[Interval, Interval], str] | None:
    """Semantic (z − h) and local (h − z) with the name of their CI method: paired over queries when both layers
    keep each query's counts on the same query rows, else the unpaired bound."""
    layers = doc.get("layers", {})
    if "z" not in layers or "h" not in layers:
        return None
    z, h = layers["z"]["statistics"], layers["h"]["statistics"]
    keys = ("same_class_other_image", "same_image")
    fractions = None
    if z.get("query_rows") is not None and z.get("query_rows") == h.get("query_rows"):
        fractions = {(layer, key): _query_fractions(stats_, key, layer, source)
                     for layer, stats_ in (("z", z), ("h", h)) for key in keys}
    if fractions is not None and all(f is not None for f in fractions.values()):
        semantic = paired_mean(fractions["z", keys[0]] - fractions["h", keys[0]])
        local = paired_mean(fractions["h", keys[1]] - fractions["z", keys[1]])
        return (semantic, local), "paired difference of fractions"
    q = z["num_queries"]

    def fraction(stats_: dict[str, Any], key: str) -> Interval:
        return Interval(stats_[key], proportion_half_width(stats_[key], q))

    semantic = fraction(z, keys[0]).minus(fraction(h, keys[0]))
    local = fraction(h, keys[1]).minus(fraction(z, keys[1]))
    return (semantic, local), "difference of fractions"


def retrieval_claim(outputs: Sequence[Output]) -> Claim:
    claim = Claim("d", "nearest neighbours in z are more semantic, in h more local", "Fig. 5",
                  "fractions of the k nearest patches of random query patches: same class, other image in z minus h "
                  "(semantic); same image in h minus z (local) (retrieval_*.json)")
    shipped = _shipped_outputs(claim, outputs, "retrieval")
    for out in shipped:
        found = _retrieval_numbers(out.doc, out.path.name)
        if found is None:
            claim.notes.append(f"{out.path.name}: needs both layers z and h")
            continue
        numbers, method = found
        control, note = find_control(outputs, out, _retrieval_settings)
        if note:
            claim.notes.append(note)
        control_found = _retrieval_numbers(control.doc, control.path.name) if control else None
        control_numbers = control_found[0] if control_found else None
        k, q = out.doc.get("k"), out.doc.get("num_queries")
        z, h = out.doc["layers"]["z"]["statistics"], out.doc["layers"]["h"]["statistics"]
        names = ("semantic: same class, other image, z − h", "local: same image, h − z")
        details = ({"z": z["same_class_other_image"], "h": h["same_class_other_image"],
                    "chance": z["chance_same_class_other_image"], "k": k, "num_queries": q},
                   {"z": z["same_image"], "h": h["same_image"], "chance": z["chance_same_image"], "k": k,
                    "num_queries": q})
        for i, (name, estimate) in enumerate(zip(names, numbers, strict=True)):
            m = Measurement(out.model, name, estimate, method, out.path.name, details=details[i])
            if control_numbers is not None:
                m.set_control(control_numbers[i], control.path.name, _control_note(control, out))
            else:
                m.control_missing = note or f"{control.path.name}: needs both layers z and h"
            claim.measurements.append(m)
    return claim


# ---------------------------------------------------------------------------------------- the table
def claims_from_figures(figures: Path | str = "figures",
                        cards: Sequence[Path | str] = ()) -> tuple[list[Claim], list[str]]:
    """Every claim, measured from the JSON files in ``figures`` (and for b and e also from the model ``cards``:
    :func:`read_cards`) and judged; and the notes on unreadable files."""
    outputs, notes = read_outputs(Path(figures))
    card_outputs, card_notes = read_cards(cards)
    outputs["evaluate"] += card_outputs
    notes += card_notes
    builders = ((convergence_claim, "convergence"), (aggregation_claim, "evaluate"), (locality_claim, "heatmap"),
                (retrieval_claim, "retrieval"), (matching_claim, "evaluate"))
    claims = []
    for build, analysis in builders:
        try:
            claim = build(outputs[analysis])
        except (KeyError, TypeError, ValueError, IndexError) as error:
            claim = build([])
            claim.notes = [f"the {analysis}_*.json files lack what this reads ({type(error).__name__}: {error}): "
                           "remake them with `make figures`"]
        claim.verdict, claim.reason = judge(claim.measurements)
        claims.append(claim)
    return claims, notes


def _number(value: float, unit: str) -> str:
    return f"{value:+.1f}" if unit == "points" else f"{value:+.3f}"


def format_interval(estimate: Interval, unit: str = "") -> str:
    """``+0.066 [+0.059, +0.073]`` (accuracies in points: one decimal)."""
    return f"{_number(estimate.value, unit)} [{_number(estimate.low, unit)}, {_number(estimate.high, unit)}]"


def _measured_cell(m: Measurement) -> str:
    text = f"{m.model} {m.measure}: {format_interval(m.estimate, m.unit)} {m.status}"
    if "fraction_h_more_local" in m.details:
        text += f" (h more local on {m.details['fraction_h_more_local']:.0%})"
    return text + ("" if m.judged else " (not judged: fixed-scale)")


def _control_cell(m: Measurement) -> str:
    if m.control is None:
        return "control not measured"
    text = format_interval(m.control, m.unit)
    if "control_fraction_h_more_local" in m.details:
        text += f" ({m.details['control_fraction_h_more_local']:.0%})"
    if m.control_note:
        text += f" ({m.control_note})"
    return text + ("; beaten" if m.control_beaten else "; not beaten")


def markdown_table(claims: Sequence[Claim]) -> str:
    """One row per claim; one line per measurement within a cell."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    header = ("| | claim (paper) | measured as | shipped models: value [95% CI] | random-init control [95% CI] "
              "| verdict |")
    lines = [header, "|---|---|---|---|---|---|"]
    for c in claims:
        measured = "<br>".join(cell(_measured_cell(m)) for m in c.measurements) or "not measured"
        controls = "<br>".join(cell(_control_cell(m)) for m in c.measurements) or "–"
        lines.append(f"| {c.key} | {cell(c.statement)} ({c.paper}) | {cell(c.measured_as)} | {measured} | {controls} "
                     f"| **{c.verdict}**: {cell(c.reason)} |")
    return "\n".join(lines)


def markdown_report(claims: Sequence[Claim], notes: Sequence[str]) -> str:
    """The table, then the rule, the CI methods and every note (missing inputs and controls)."""
    all_notes = list(notes) + [f"claim {c.key}: {n}" for c in claims for n in c.notes]
    parts = [markdown_table(claims), "", f"Verdict rule: {RULE}", "",
             "95% CIs: " + "; ".join(f"{name}: {text}" for name, text in CI_METHODS.items()) + ". " + UNPAIRED]
    if all_notes:
        parts += ["", "Missing inputs:", *(f"- {n}" for n in all_notes)]
    return "\n".join(parts) + "\n"


def claims_json(claims: Sequence[Claim], notes: Sequence[str], figures: Path | str,
                cards: Sequence[Path | str] = (), *, command: str) -> dict[str, Any]:
    return {"command": command, "figures": str(figures), "rule": RULE,
            "confidence_intervals": {**CI_METHODS, "unpaired": UNPAIRED},
            "match_margin_points": MATCH_MARGIN, "claims": [c.to_dict() for c in claims], "notes": list(notes),
            "cards": [str(c) for c in cards]}


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m ssl_patch_analysis.claims",
                                description="The paper's claims judged in one table from the analyses' JSON outputs "
                                            "(figures/claims.md and claims.json).")
    parser.add_argument("--figures", type=Path, default=cli.DEFAULT_OUT,
                        help="folder holding the analyses' JSON files (default: figures/)")
    parser.add_argument("--out", type=cli.folder, default=str(cli.DEFAULT_OUT),
                        help="folder claims.md and claims.json are written to (default: figures/)")
    parser.add_argument("--cards", type=Path, nargs="*", default=[], metavar="CARD",
                        help="model cards (pretrained/model_card.py --json) to judge b and e on too: the full "
                             "protocol, every training and test image (e.g. pretrained/*.card.json)")
    return parser


@cli.command
def main(argv: Sequence[str] | None = None) -> list[Claim]:
    args = build_parser().parse_args(argv)
    if not args.figures.is_dir():
        raise cli.UserError(f"--figures {args.figures} is not a folder (pass the folder `make figures` writes to)")
    missing = [str(path) for path in args.cards if not path.is_file()]
    if missing:
        raise cli.UserError(f"--cards: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a file (pass "
                            "model cards written by pretrained/model_card.py --json)")
    for path in args.cards:  # a file that is no card at all is the user's mistake, not a note under the table
        try:
            _card_rows(path)
        except _CARD_ERRORS as error:
            raise cli.UserError(f"--cards {path} is not a model card that can be read ({type(error).__name__}: "
                                f"{cli.one_line(error)}): pass cards written by pretrained/model_card.py "
                                "--json") from None
    claims, notes = claims_from_figures(args.figures, args.cards)
    report = markdown_report(claims, notes)
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = args.out / "claims.md"
    tmp = markdown.with_name(f".{markdown.name}.tmp")
    tmp.write_text(report, encoding="utf-8")
    tmp.replace(markdown)
    command = cli.running_command()
    written = save_json(claims_json(claims, notes, args.figures, args.cards, command=command),
                        args.out / "claims.json")
    print(report)
    print(f"wrote {markdown}, {written}")
    return claims


if __name__ == "__main__":
    main()
