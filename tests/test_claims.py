"""The claims table: the verdict rule on hand-made analysis outputs, its CIs checked by scipy, the committed figures."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from ssl_patch_analysis import claims
from ssl_patch_analysis.claims import (
    MIXED,
    NOT_MEASURED,
    NOT_REPRODUCED,
    OPPOSITE,
    REPRODUCED,
    SHOWN,
    Interval,
    Measurement,
    claims_from_figures,
    judge,
)

FIGURES = Path(__file__).resolve().parents[1] / "figures"
ARCH = {"arch": "resnet18", "stem": "cifar", "cifar_padding": 1, "width": 1.0, "embedding_dim": 512,
        "projector_dims": [512, 1024, 512], "pre_feature_dims": None, "projection_normalized": False}


# ------------------------------------------------------------------------------- hand-made analysis outputs
def convergence_doc(gain: float, above: float, *, pretraining=None, ci=0.005, command=True) -> dict:
    """One 16 px curve: similarity 0.8 at N = 1, 0.8 + gain at N = all, chance 0.8 + gain - above."""
    def point(n, count, similarity, chance):
        return {"n": n, "num_averaged": count, "similarity": {"mean": similarity, "std": 0.05, "ci95": ci},
                "chance": {"mean": chance, "std": 0.1, "ci95": ci}}

    doc = {"model_info": ARCH, "data": "CIFAR-10 test", "layer": "h", "num_images": 128, "draws": 20, "seed": 0,
           "resize_to": None, "whole_image_size": 32, "pretraining_patch_size": pretraining,
           "curves": [{"patch_size": 16, "stride": 4, "fed_size": 32,
                       "points": [point("1", 1, 0.8, 0.5), point("4", 4, 0.8 + gain / 2, 0.5),
                                  point("all", 25, 0.8 + gain, 0.8 + gain - above)]}]}
    if command:
        doc["command"] = ["python", "-m", "ssl_patch_analysis.convergence", "--model", "vicreg"]
    return doc


def heatmap_doc(differences) -> dict:
    differences = np.asarray(differences, dtype=float)
    return {"command": "python -m ssl_patch_analysis.heatmap --model vicreg --data cifar10", "model_info": ARCH,
            "data": "CIFAR-10 test",
            "heatmaps": {"grid_shape": [13, 13], "patch_size": 8, "stride": 2, "resize_to": 32},
            "locality": {"image_ids": list(range(len(differences))),
                         "paired_h_minus_z": {"mean": float(differences.mean()), "std": float(differences.std(ddof=1)),
                                              "fraction_h_more_local": float((differences > 0).mean()),
                                              "num_images": len(differences)}}}


def retrieval_doc(z_class: float, h_class: float, z_image: float, h_image: float, queries: int = 200) -> dict:
    def layer(same_class, same_image):
        return {"index": {"model": ARCH},
                "statistics": {"k": 8, "num_queries": queries, "same_image": same_image,
                               "same_class_other_image": same_class, "other_class": 1 - same_image - same_class,
                               "chance_same_image": 0.001, "chance_same_class_other_image": 0.1}}

    return {"model": "m", "data": "CIFAR-10 test", "patch_size": 16, "stride": 8, "num_images": 1000, "k": 8,
            "num_queries": queries, "layers": {"z": layer(z_class, z_image), "h": layer(h_class, h_image)}}


def evaluate_doc(central: float, patches: float, *, fixed: bool, test_size: int = 1000, model="vicreg") -> dict:
    """central and 16-patch accuracies (%); k-NN and linear the same."""
    def row(protocol, acc):
        return {"protocol": protocol, "knn": {"20": acc, "200": acc}, "linear": acc}

    return {"model": model, "train_data": "CIFAR-10 train", "test_data": "CIFAR-10 test", "train_size": 2000,
            "test_size": test_size, "seed": 0, "layer": "h", "resize_to": 32,
            "patch_scale": {"patch_size": 16, "scale": None} if fixed else {"patch_size": None, "scale": [0.08, 1.0]},
            "knn_settings": {"ks": [20, 200], "temperature": 0.07}, "probe_schedule": {"epochs": 100, "text": "x"},
            "protocols": [row("central", central), row("1", central - 5), row("16", patches)],
            "command": f"python -m ssl_patch_analysis.evaluate --model {model} --protocols central,1,16 --boost "
                       "--store-dir /tmp/s"}


def write(folder: Path, name: str, doc: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(doc))


def figures_with(folder: Path, *, effect: float, control: float | None, both_models: bool = True) -> Path:
    """Outputs of vicreg (and bagssl) whose every claimed effect is ``effect`` (scaled per analysis), and
    random-init controls at ``control`` (none when None)."""
    models = [("vicreg", False), ("bagssl", True)] if both_models else [("vicreg", False)]
    for model, fixed in models:
        pretraining = 16 if fixed else None
        write(folder, f"convergence_{model}_cifar10", convergence_doc(effect / 10, effect, pretraining=pretraining))
        write(folder, f"heatmap_{model}_cifar10", heatmap_doc(np.linspace(-0.01, 0.01, 64) + effect / 10))
        write(folder, f"retrieval_{model}_cifar10", retrieval_doc(0.2 + effect, 0.2, 0.1, 0.1 + effect))
        write(folder, f"evaluate_{model}_cifar10", evaluate_doc(50.0, 50.0 + 20 * effect, fixed=fixed, model=model))
    if control is not None:
        write(folder, "convergence_vicreg-random-init_cifar10", convergence_doc(control / 10, control))
        write(folder, "heatmap_vicreg-random-init_cifar10", heatmap_doc(np.linspace(-0.01, 0.01, 64) + control / 10))
        write(folder, "retrieval_vicreg-random-init_cifar10", retrieval_doc(0.2 + control, 0.2, 0.1, 0.1 + control))
        for model, fixed in models:
            write(folder, f"evaluate_{model}-random-init_cifar10",
                  evaluate_doc(20.0, 20.0 + 20 * control, fixed=fixed, model=f"{model}-random-init"))
    return folder


def verdicts(folder: Path) -> dict[str, str]:
    return {c.key: c.verdict for c in claims_from_figures(folder)[0]}


# ------------------------------------------------------------------------------- the verdict rule
def test_every_claim_reproduced_when_effects_are_clear_and_beat_the_control(tmp_path):
    assert verdicts(figures_with(tmp_path, effect=0.5, control=0.0)) == dict.fromkeys("abcde", REPRODUCED)


def test_a_convergence_or_evaluate_file_of_another_layer_is_left_out_with_a_note(tmp_path):
    # was: a convergence JSON of z written under h's name (before names carried the layer) was judged as h's
    figures = figures_with(tmp_path, effect=0.5, control=0.0)
    for name in ("convergence_vicreg_cifar10", "evaluate_vicreg_cifar10"):
        doc = json.loads((figures / f"{name}.json").read_text())
        write(figures, name, {**doc, "layer": "z"})
    found, notes = claims_from_figures(figures)
    for name in ("convergence_vicreg_cifar10", "evaluate_vicreg_cifar10"):
        assert any(f"{name}.json: of layer z, not h" in note for note in notes), notes
    by_key = {c.key: c for c in found}
    assert not [m for m in by_key["a"].measurements if m.model == "vicreg"]
    assert not [m for m in by_key["b"].measurements if m.model == "vicreg"]


def test_a_heatmap_of_other_layers_than_z_and_h_is_left_out_with_a_note(tmp_path):
    # was: heatmap_z_h_pre_feature_vicreg_cifar10.json judged as the model "z_h_pre_feature_vicreg" (claim c)
    figures = figures_with(tmp_path, effect=0.5, control=0.0)
    doc = json.loads((figures / "heatmap_vicreg_cifar10.json").read_text())
    doc["heatmaps"]["layers"] = ["z", "h", "pre_feature"]
    write(figures, "heatmap_z_h_pre_feature_vicreg_cifar10", doc)
    doc["heatmaps"]["layers"] = ["h", "z"]  # z,h in another order: the claims' layers
    write(figures, "heatmap_vicreg_cifar10", doc)
    found, notes = claims_from_figures(figures)
    assert any("heatmap_z_h_pre_feature_vicreg_cifar10.json: of layers z,h,pre_feature, not z,h" in note
               for note in notes), notes
    (c,) = [claim for claim in found if claim.key == "c"]
    assert {m.model for m in c.measurements} == {"vicreg", "bagssl"}, [m.model for m in c.measurements]


def test_not_reproduced_when_no_effect_is_shown(tmp_path):
    found = verdicts(figures_with(tmp_path, effect=0.0, control=0.0))
    # e: equal accuracies are inside the +-2 point margin, but 1000 test images cannot show it (CI +-4.4 points)
    assert found == dict.fromkeys("abcde", NOT_REPRODUCED)


def test_mixed_when_the_control_is_as_large(tmp_path):
    found = verdicts(figures_with(tmp_path, effect=0.5, control=0.5))
    assert found == {"a": MIXED, "b": MIXED, "c": MIXED, "d": MIXED, "e": REPRODUCED}  # e: trained beat 20% random


def test_mixed_when_only_one_model_shows_it(tmp_path):
    figures_with(tmp_path, effect=0.5, control=0.0)
    write(tmp_path, "heatmap_bagssl_cifar10", heatmap_doc(np.linspace(-0.01, 0.01, 64)))
    claim = {c.key: c for c in claims_from_figures(tmp_path)[0]}["c"]
    assert claim.verdict == MIXED
    assert [m.status for m in claim.measurements] == ["inconclusive", SHOWN]  # bagssl, vicreg
    assert claim.reason.startswith("1 of 2 shown")


def test_missing_controls_say_control_not_measured_and_name_the_command(tmp_path):
    figures_with(tmp_path, effect=0.5, control=None)
    found, _ = claims_from_figures(tmp_path)
    assert {c.key: c.verdict for c in found} == dict.fromkeys("abcde", MIXED)
    table = claims.markdown_table(found)
    assert "control not measured" in table
    evaluate_note = next(n for n in found[1].notes if "evaluate_vicreg_cifar10.json" in n)
    # the command recorded in the JSON, its renamed flag (--store-dir) in today's name, with --random-init
    assert ("`python -m ssl_patch_analysis.evaluate --model vicreg --protocols central,1,16 --boost --cache-dir /tmp/s "
            "--random-init`") in evaluate_note
    retrieval_note = next(n for n in found[3].notes if "retrieval_vicreg" in n)
    assert "--neighbours 8 --num-queries 200 --random-init" in retrieval_note


def test_a_control_of_another_model_with_the_same_architecture_is_used_and_named(tmp_path):
    figures_with(tmp_path, effect=0.5, control=0.0)
    claim = claims_from_figures(tmp_path)[0][2]
    bagssl = next(m for m in claim.measurements if m.model == "bagssl")
    assert bagssl.control_source == "heatmap_vicreg-random-init_cifar10.json"
    assert bagssl.control_note == "of vicreg-random-init, the same architecture"
    other = dict(ARCH, embedding_dim=2048)
    doc = heatmap_doc(np.linspace(-0.01, 0.01, 64))
    write(tmp_path, "heatmap_bagssl_cifar10", {**doc, "model_info": other})
    claim = claims_from_figures(tmp_path)[0][2]
    assert next(m for m in claim.measurements if m.model == "bagssl").control is None


def test_a_control_with_other_settings_is_not_used(tmp_path):
    figures_with(tmp_path, effect=0.5, control=0.0)
    doc = json.loads((tmp_path / "evaluate_vicreg-random-init_cifar10.json").read_text())
    write(tmp_path, "evaluate_vicreg-random-init_cifar10", {**doc, "test_size": 500})
    claim = claims_from_figures(tmp_path)[0][1]
    assert all(m.control is None for m in claim.measurements if m.model == "vicreg")
    assert any("measured with other settings" in n for n in claim.notes)


def test_settings_an_older_output_does_not_record_are_taken_to_agree(tmp_path):
    figures_with(tmp_path, effect=0.5, control=0.0)
    doc = json.loads((tmp_path / "evaluate_vicreg-random-init_cifar10.json").read_text())
    newer = {**doc, "probe": "adam", "probe_schedule": {**doc["probe_schedule"], "optimizer": "adam"}}
    write(tmp_path, "evaluate_vicreg-random-init_cifar10", newer)
    claim = claims_from_figures(tmp_path)[0][1]
    assert all(m.control is not None for m in claim.measurements if m.model == "vicreg")
    write(tmp_path, "evaluate_vicreg-random-init_cifar10", {**newer, "probe_schedule": {"epochs": 10}})
    claim = claims_from_figures(tmp_path)[0][1]
    assert all(m.control is None for m in claim.measurements if m.model == "vicreg")


def test_fixed_scale_convergence_is_shown_but_not_judged(tmp_path):
    figures_with(tmp_path, effect=0.5, control=0.0)
    write(tmp_path, "convergence_bagssl_cifar10", convergence_doc(-0.1, -0.1, pretraining=16))
    claim = claims_from_figures(tmp_path)[0][0]
    bagssl = [m for m in claim.measurements if m.model == "bagssl"]
    assert [m.status for m in bagssl] == [OPPOSITE, OPPOSITE] and not any(m.judged for m in bagssl)
    assert claim.verdict == REPRODUCED


def test_judge_statuses_and_reasons():
    def measurement(value, half_width=1.0, control=None, bound=0.0):
        m = Measurement("m", "x", Interval(value, half_width), "student-t", "f.json", bound=bound)
        if control is not None:
            m.set_control(Interval(control, 0.5), "c.json")
        return m

    assert [measurement(v).status for v in (1.5, 0.5, -1.5)] == [SHOWN, "inconclusive", OPPOSITE]
    assert measurement(-0.5, bound=-2.0).status == SHOWN and measurement(-3.5, bound=-2.0).status == OPPOSITE
    assert judge([measurement(3, control=0), measurement(5, control=1)])[0] == REPRODUCED
    assert judge([measurement(3, control=2)]) == (MIXED, "1 of 1 shown; 1 not beating the random-init control")
    assert judge([measurement(3, control=0), measurement(-3, control=-9)]) == (MIXED, "1 of 2 shown; 1 opposite")
    assert judge([measurement(0.2), measurement(-3)]) == (NOT_REPRODUCED,
                                                          "no measurement shown: 1 of 2 inconclusive, 1 opposite")
    assert judge([])[0] == NOT_MEASURED


def test_nothing_to_read_says_which_command_makes_it(tmp_path):
    found, _ = claims_from_figures(tmp_path)
    assert [c.verdict for c in found] == [NOT_MEASURED] * 5
    assert all("make figures" in " ".join(c.notes) for c in found)


# ------------------------------------------------------------------------------- CIs as stated, checked by scipy
def test_paired_locality_ci_is_the_student_t_interval_of_the_per_image_differences(tmp_path):
    differences = np.random.default_rng(0).normal(0.01, 0.03, size=64)
    write(tmp_path, "heatmap_vicreg_cifar10", heatmap_doc(differences))
    m = claims_from_figures(tmp_path)[0][2].measurements[0]
    low, high = stats.ttest_1samp(differences, 0.0).confidence_interval(0.95)
    assert m.estimate.low == pytest.approx(low, abs=1e-12) and m.estimate.high == pytest.approx(high, abs=1e-12)


def test_retrieval_ci_is_the_unpaired_normal_interval_of_the_two_fraction_bounds(tmp_path):
    write(tmp_path, "retrieval_vicreg_cifar10", retrieval_doc(0.3, 0.2, 0.1, 0.15, queries=200))
    semantic, local = claims_from_figures(tmp_path)[0][3].measurements
    scale = math.sqrt(0.3 * 0.7 / 200 + 0.2 * 0.8 / 200)
    assert (semantic.estimate.low, semantic.estimate.high) == pytest.approx(
        stats.norm.interval(0.95, loc=0.1, scale=scale), abs=1e-12)
    scale = math.sqrt(0.15 * 0.85 / 200 + 0.1 * 0.9 / 200)
    assert (local.estimate.low, local.estimate.high) == pytest.approx(
        stats.norm.interval(0.95, loc=0.05, scale=scale), abs=1e-12)


def with_per_query(doc: dict, counts: dict[str, dict[str, np.ndarray]], rows=None) -> dict:
    """``doc`` whose layers keep each query's counts (``counts[layer][key]``, found = 8) and the fractions they give."""
    layers = {}
    for layer, stats_ in doc["layers"].items():
        c = counts[layer]
        q = len(c["same_image"])
        per_query = {"found": [8] * q, **{key: [int(v) for v in values] for key, values in c.items()}}
        layers[layer] = {**stats_, "statistics": {
            **stats_["statistics"], "num_queries": q, "query_rows": list(range(q) if rows is None else rows[layer]),
            "per_query": per_query, **{key: float(np.mean(np.asarray(values) / 8)) for key, values in c.items()}}}
    return {**doc, "layers": layers, "num_queries": len(counts["z"]["same_image"])}


def test_retrieval_ci_is_paired_over_queries_when_both_layers_keep_each_querys_counts(tmp_path):
    rng = np.random.default_rng(0)
    h_image = rng.integers(0, 9, size=200)
    z_image = np.clip(h_image - rng.integers(0, 2, size=200), 0, 8)  # strongly correlated, as two layers of a model
    h_class = rng.integers(0, 9, size=200)
    z_class = np.clip(h_class + rng.integers(-1, 3, size=200), 0, 8)
    counts = {"z": {"same_image": z_image, "same_class_other_image": z_class},
              "h": {"same_image": h_image, "same_class_other_image": h_class}}
    write(tmp_path, "retrieval_vicreg_cifar10", with_per_query(retrieval_doc(0, 0, 0, 0), counts))
    semantic, local = claims_from_figures(tmp_path)[0][3].measurements
    for m, d in ((semantic, (z_class - h_class) / 8), (local, (h_image - z_image) / 8)):
        low, high = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
        assert (m.estimate.low, m.estimate.high) == pytest.approx((low, high), abs=1e-12)
        assert m.estimate.value == pytest.approx(d.mean(), abs=1e-12)
        assert m.ci_method == "paired difference of fractions" and "per-query differences" in m.to_dict()["ci_method"]
    unpaired = claims.Interval(h_image.mean() / 8, claims.proportion_half_width(h_image.mean() / 8, 200)).minus(
        claims.Interval(z_image.mean() / 8, claims.proportion_half_width(z_image.mean() / 8, 200)))
    assert local.estimate.half_width < unpaired.half_width / 2  # what pairing buys here

    # other query rows in the two layers: unpaired (conservative)
    rows = {"z": list(range(200)), "h": list(range(1, 201))}
    write(tmp_path, "retrieval_vicreg_cifar10", with_per_query(retrieval_doc(0, 0, 0, 0), counts, rows))
    _, local = claims_from_figures(tmp_path)[0][3].measurements
    assert local.ci_method == "difference of fractions"
    assert local.estimate.half_width == pytest.approx(unpaired.half_width, abs=1e-12)


def test_fraction_bound_covers_any_per_query_fractions():
    """p(1-p)/Q bounds the variance of a mean of per-query fractions in [0, 1] (what the retrieval CI relies on)."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        fractions = rng.integers(0, 9, size=200) / 8 * rng.integers(0, 2, size=200)
        p = fractions.mean()
        assert fractions.std(ddof=0) <= math.sqrt(p * (1 - p)) + 1e-12


def test_accuracy_difference_ci_is_the_unpaired_binomial_interval(tmp_path):
    write(tmp_path, "evaluate_vicreg_cifar10", evaluate_doc(49.7, 51.8, fixed=False, test_size=1000))
    knn, _ = claims_from_figures(tmp_path)[0][1].measurements
    a, b = 0.518, 0.497
    expected = stats.norm.interval(0.95, loc=a - b, scale=math.sqrt(a * (1 - a) / 1000 + b * (1 - b) / 1000))
    assert (knn.estimate.low / 100, knn.estimate.high / 100) == pytest.approx(expected, abs=1e-12)
    assert knn.unit == "points" and knn.estimate.value == pytest.approx(2.1)


def with_per_image(doc: dict, protocol: str, right: np.ndarray, digest: str = "ids-a") -> dict:
    """``doc`` whose ``protocol`` row keeps each test image's right/wrong (k-NN and linear the same) and accuracy."""
    # the accuracy as evaluate records it: a float32 mean (57.7% of 1,000 reads 57.70000219...)
    text, accuracy = "".join("1" if r else "0" for r in right), 100 * float(np.mean(right, dtype=np.float32))
    rows = [dict(r) for r in doc["protocols"]]
    for row in rows:
        if row["protocol"] == protocol:
            row.update(knn={"20": accuracy, "200": accuracy}, linear=accuracy,
                       correct={"knn": {"20": text, "200": text}, "linear": text})
    return {**doc, "protocols": rows, "test_ids_sha256": digest, "test_size": len(right)}


def test_accuracy_differences_are_paired_when_the_files_keep_each_test_images_result(tmp_path):
    rng = np.random.default_rng(0)
    central = rng.random(1000) < 0.5
    patches = central.copy()  # mostly the same images right: strongly correlated, as two protocols of one model
    flip = rng.choice(1000, size=80, replace=False)
    patches[flip[:60]] = True
    patches[flip[60:]] = False
    doc = with_per_image(with_per_image(evaluate_doc(0, 0, fixed=False), "central", central), "16", patches)
    write(tmp_path, "evaluate_vicreg_cifar10", doc)
    knn, linear = claims_from_figures(tmp_path)[0][1].measurements
    d = patches.astype(float) - central.astype(float)
    low, high = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert (knn.estimate.low / 100, knn.estimate.high / 100) == pytest.approx((low, high), abs=1e-12)
    assert knn.estimate.value == pytest.approx(100 * (patches.mean() - central.mean()))
    assert linear.estimate == knn.estimate and linear.ci_method == knn.ci_method  # the same per-image values
    assert knn.ci_method == "paired difference of accuracies" and "per-image differences" in knn.to_dict()["ci_method"]
    unpaired = claims.accuracy(100 * patches.mean(), 1000).minus(claims.accuracy(100 * central.mean(), 1000))
    assert knn.estimate.half_width < unpaired.half_width / 2  # what pairing buys here

    # e across two files: paired only when both name the same test images
    fixed = with_per_image(evaluate_doc(0, 0, fixed=True, model="bagssl"), "16", patches)
    write(tmp_path, "evaluate_bagssl_cifar10", fixed)
    (match_knn, _), = [c.measurements[:2] for c in claims_from_figures(tmp_path)[0] if c.key == "e"]
    assert match_knn.estimate.half_width == pytest.approx(knn.estimate.half_width)
    write(tmp_path, "evaluate_bagssl_cifar10", {**fixed, "test_ids_sha256": "ids-b"})
    (match_knn, _), = [c.measurements[:2] for c in claims_from_figures(tmp_path)[0] if c.key == "e"]
    assert match_knn.estimate.half_width == pytest.approx(unpaired.half_width)
    assert match_knn.ci_method == "difference of accuracies" and match_knn.to_dict()["ci_method"].endswith("unpaired")


def test_convergence_ci_combines_the_recorded_student_t_half_widths(tmp_path):
    write(tmp_path, "convergence_vicreg_cifar10", convergence_doc(0.05, 0.3, ci=0.004))
    gain, above = claims_from_figures(tmp_path)[0][0].measurements
    assert gain.estimate.value == pytest.approx(0.05) and above.estimate.value == pytest.approx(0.3)
    assert gain.estimate.half_width == pytest.approx(math.hypot(0.004, 0.004))


def with_per_image_cosines(doc: dict, first: np.ndarray, last: np.ndarray, chance: np.ndarray) -> dict:
    """``doc`` whose first and last points keep each image's similarity (and the last its chance level)."""
    def summary(values):
        return {"mean": float(values.mean()), "std": float(values.std(ddof=1)),
                "ci95": claims.student_t_half_width(float(values.std(ddof=1)), len(values)),
                "per_image": [float(v) for v in values]}

    points = [dict(p) for p in doc["curves"][0]["points"]]
    points[0]["similarity"], points[-1]["similarity"], points[-1]["chance"] = summary(first), summary(last), summary(
        chance)
    return {**doc, "curves": [{**doc["curves"][0], "points": points}]}


def test_convergence_differences_are_paired_over_images_when_the_points_keep_them(tmp_path):
    rng = np.random.default_rng(0)
    first = rng.normal(0.75, 0.05, size=128)
    last = first + rng.normal(0.02, 0.005, size=128)  # strongly correlated, as the same images' cosines
    chance = rng.normal(0.55, 0.08, size=128)
    write(tmp_path, "convergence_vicreg_cifar10", with_per_image_cosines(convergence_doc(0, 0), first, last, chance))
    gain, above = claims_from_figures(tmp_path)[0][0].measurements
    for m, d in ((gain, last - first), (above, last - chance)):
        low, high = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
        assert (m.estimate.low, m.estimate.high) == pytest.approx((low, high), abs=1e-12)
        assert m.ci_method == "paired difference of means" and "per-image differences" in m.to_dict()["ci_method"]
    assert gain.estimate.half_width < math.hypot(*(claims.student_t_half_width(v.std(ddof=1), 128)
                                                   for v in (first, last))) / 4  # what pairing buys here


def damaged_evaluate() -> dict:
    right = np.arange(100) % 2 == 0
    doc = with_per_image(with_per_image(evaluate_doc(0, 0, fixed=False), "central", right), "16", right)
    doc["protocols"][2]["linear"] = 51.0  # the recorded accuracy no longer matches its per-image values
    return doc


def damaged_retrieval() -> dict:
    counts = {layer: {"same_image": np.arange(200) % 9, "same_class_other_image": np.arange(200) % 5}
              for layer in ("z", "h")}
    doc = with_per_query(retrieval_doc(0, 0, 0, 0), counts)
    doc["layers"]["h"]["statistics"]["same_image"] += 0.01
    return doc


def damaged_convergence() -> dict:
    values = np.linspace(0.5, 0.9, 128)
    doc = with_per_image_cosines(convergence_doc(0, 0), values, values + 0.01, values - 0.2)
    doc["curves"][0]["points"][-1]["similarity"]["mean"] += 0.01  # no longer the mean of its per-image values
    return doc


@pytest.mark.parametrize("name, make, claim, message", [
    ("evaluate_vicreg_cifar10", damaged_evaluate, 1, "the per-image values of 16 / linear do not give its accuracy"),
    ("retrieval_vicreg_cifar10", damaged_retrieval, 3,
     "the per-query counts of h / same_image do not give its fraction"),
    ("convergence_vicreg_cifar10", damaged_convergence, 0,
     "the per-image values of 16 px, N=all do not give its mean"),
])
def test_per_item_values_that_do_not_give_the_recorded_number_are_refused_in_one_note(tmp_path, name, make, claim,
                                                                                       message):
    write(tmp_path, name, make())
    judged = claims_from_figures(tmp_path)[0][claim]
    assert judged.verdict == NOT_MEASURED and not judged.measurements
    (note,) = judged.notes
    assert f"{name}.json: {message}" in note
    assert "damaged" in note and "make figures" in note and "\n" not in note


# ------------------------------------------------------------------------------- the committed figures
def committed(name: str) -> dict:
    return json.loads((FIGURES / f"{name}.json").read_text())


def test_committed_figures_give_a_row_per_claim_with_the_json_numbers(tmp_path):
    found, notes = claims_from_figures(FIGURES)
    assert [c.key for c in found] == list("abcde") and not notes
    table = claims.markdown_table(found).splitlines()
    assert len(table) == 2 + 5 and [row.split("|")[1].strip() for row in table[2:]] == list("abcde")
    assert all(c.verdict in (REPRODUCED, NOT_REPRODUCED, MIXED) for c in found)
    by_key = {c.key: c for c in found}

    def measured(key, model, measure_start):
        return next(m for m in by_key[key].measurements if m.model == model and m.measure.startswith(measure_start))

    for model in ("vicreg", "bagssl"):
        paired = committed(f"heatmap_{model}_cifar10")["locality"]["paired_h_minus_z"]
        assert measured("c", model, "cifar10").estimate.value == paired["mean"]

        # the paired value is the exact count difference; the recorded accuracies are float32 means (1e-4 points is
        # a thousandth of one test image)
        boost = {row["classifier"]: row for row in committed(f"evaluate_{model}_cifar10")["boost"]["rows"]}
        assert measured("b", model, "kNN k=20").estimate.value == pytest.approx(boost["kNN k=20"]["delta"], abs=1e-4)
        assert measured("b", model, "linear").estimate.value == pytest.approx(boost["linear"]["delta"], abs=1e-4)

        layers = committed(f"retrieval_{model}_cifar10")["layers"]
        z, h = layers["z"]["statistics"], layers["h"]["statistics"]
        assert measured("d", model, "semantic").estimate.value == pytest.approx(
            z["same_class_other_image"] - h["same_class_other_image"], abs=1e-12)
        assert measured("d", model, "local").estimate.value == pytest.approx(h["same_image"] - z["same_image"],
                                                                             abs=1e-12)

    curve = next(c for c in committed("convergence_vicreg_cifar10")["curves"] if c["patch_size"] == 16)
    first, last = curve["points"][0], curve["points"][-1]
    assert (first["n"], last["n"]) == ("1", "all")
    assert measured("a", "vicreg", "16 px: gain").estimate.value == pytest.approx(
        last["similarity"]["mean"] - first["similarity"]["mean"], abs=1e-12)
    assert measured("a", "vicreg", "16 px: above chance").estimate.value == pytest.approx(
        last["similarity"]["mean"] - last["chance"]["mean"], abs=1e-12)
    assert [m.measure.split(":")[0] for m in by_key["a"].measurements if m.model == "bagssl"] == ["16 px"] * 2

    bagssl16 = next(p for p in committed("evaluate_bagssl_cifar10")["protocols"] if p["protocol"] == "16")
    vicreg_central = next(p for p in committed("evaluate_vicreg_cifar10")["protocols"] if p["protocol"] == "central")
    assert measured("e", "bagssl vs vicreg", "linear").estimate.value == pytest.approx(
        bagssl16["linear"] - vicreg_central["linear"], abs=1e-4)
    assert measured("e", "bagssl vs vicreg", "linear").ci_method == "paired difference of accuracies"

    if (FIGURES / "heatmap_vicreg-random-init_cifar10.json").exists():
        control = committed("heatmap_vicreg-random-init_cifar10")["locality"]["paired_h_minus_z"]["mean"]
        assert measured("c", "vicreg", "cifar10").control.value == control


def test_command_writes_the_table_and_the_json(tmp_path, capsys):
    figures_with(tmp_path / "figures", effect=0.5, control=0.0)
    argv = ["--figures", str(tmp_path / "figures"), "--out", str(tmp_path / "out")]
    claims.main(argv)
    markdown = (tmp_path / "out" / "claims.md").read_text()
    assert markdown.startswith("| | claim (paper) |") and "Verdict rule:" in markdown
    written = json.loads((tmp_path / "out" / "claims.json").read_text())
    assert [c["verdict"] for c in written["claims"]] == [REPRODUCED] * 5
    # every JSON output records its command in one shape (claims.json did not)
    assert written["command"] == "python -m ssl_patch_analysis.claims " + " ".join(argv)
    assert written["claims"][2]["measurements"][0]["ci95_low"] > 0
    assert "| a |" in capsys.readouterr().out


def test_command_refuses_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        claims.main(["--figures", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert stop.value.code == 2 and "--figures" in capsys.readouterr().err


def test_command_refuses_cards_that_are_not_there(tmp_path, capsys):
    # Was: exit status 0, the missing file only a note in claims.md.
    figures_with(tmp_path / "figures", effect=0.5, control=0.0)
    with pytest.raises(SystemExit) as stop:
        claims.main(["--figures", str(tmp_path / "figures"), "--out", str(tmp_path / "out"),
                     "--cards", str(tmp_path / "typo.card.json")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "typo.card.json is not a file" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, said", [
    ("[]", "ValueError: it holds no rows"),
    ('{"model": "vicreg", "n_values": [1, 2]}', "KeyError"),  # a convergence JSON passed as a card
    ("not json", "JSONDecodeError"),
])
def test_command_refuses_a_file_that_is_not_a_card(tmp_path, capsys, content, said):
    # Was: exit status 0, the file only a note under the table.
    figures_with(tmp_path / "figures", effect=0.5, control=0.0)
    (tmp_path / "notes.json").write_text(content)
    with pytest.raises(SystemExit) as stop:
        claims.main(["--figures", str(tmp_path / "figures"), "--out", str(tmp_path / "out"),
                     "--cards", str(tmp_path / "notes.json")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert f"--cards {tmp_path / 'notes.json'} is not a model card that can be read ({said}" in err
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_not_a_json_object_is_a_note_not_a_crash(tmp_path, capsys):
    # Was: "internal error (AttributeError): 'list' object has no attribute 'get'", exit status 1.
    figures_with(tmp_path / "figures", effect=0.5, control=0.0)
    damaged = sorted((tmp_path / "figures").glob("convergence_*.json"))[0]
    damaged.write_text("[1, 2]")
    _, notes = claims_from_figures(tmp_path / "figures")
    assert any(str(damaged) in note and "not an analysis's output" in note for note in notes)
    claims.main(["--figures", str(tmp_path / "figures"), "--out", str(tmp_path / "out")])
    assert "not an analysis's output" in (tmp_path / "out" / "claims.md").read_text()


def test_the_readme_shows_the_committed_claims_table():
    """The README's claims table is figures/claims.md's, row for row (remade with `make claims`, then pasted)."""
    table = [line for line in (FIGURES / "claims.md").read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    readme = (FIGURES.parent / "README.md").read_text(encoding="utf-8").splitlines()
    start = readme.index(table[0])
    assert readme[start:start + len(table)] == table


# ------------------------------------------------------------------------------- model cards (the full protocol)
def _right_text(right: np.ndarray) -> str:
    return "".join("1" if r else "0" for r in right)


def card(checkpoint: Path, trained: dict, control: dict, *, extraction: str | None = "bf16 autocast") -> list[dict]:
    """pretrained/model_card.py --json rows: per protocol title, each test image's right/wrong (k-NN and linear the
    same), trained and random-init."""
    def accuracy(right):  # as the card records it: a float32 mean
        return 100 * float(np.mean(right, dtype=np.float32))

    some = next(iter(trained.values()))
    row = {"checkpoint": str(checkpoint), "checkpoint_sha256": claims.file_sha256(checkpoint), "method": "x",
           "train_images": 50000, "test_images": len(some), "knn": "weighted, cosine, k=20, T=0.07",
           "probe": "Adam, 100 epochs", "seed": 0, "test_ids_sha256": "all-test",
           "trained": {t: {"knn": accuracy(r), "linear": accuracy(r)} for t, r in trained.items()},
           "random_init": {t: {"knn": accuracy(r), "linear": accuracy(r)} for t, r in control.items()},
           "correct": {kind: {t: {"knn": _right_text(r), "linear": _right_text(r)} for t, r in part.items()}
                       for kind, part in (("trained", trained), ("random_init", control))}}
    if extraction is not None:
        row["extraction"] = extraction
    return [row]


def card_checkpoint(folder: Path, name: str, train: dict) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-resnet18-cifar10.pt"
    torch.save({"format": "test", "train": train}, path)
    return path


def test_model_cards_judge_b_and_e_on_every_test_image_paired_and_only_with_cards(tmp_path):
    """Cards of one checkpoint in two files (its central view and its 16 patches, measured apart) are one output
    with its control; b and e are the paired differences of each test image's right/wrong; a card never pairs with
    a figure's evaluation (other images), and a card of another file than the checkpoint now is left out, said."""
    rng = np.random.default_rng(1)
    n = 4000
    central, random_central = rng.random(n) < 0.55, rng.random(n) < 0.33
    patches = np.where(rng.random(n) < 0.2, ~central, central) | (rng.random(n) < 0.1)
    random_patches = np.where(rng.random(n) < 0.1, ~random_central, random_central)
    baseline, random_baseline = rng.random(n) < 0.57, rng.random(n) < 0.33
    patchy = card_checkpoint(tmp_path / "pretrained", "emp-ssl", {"patch_size": 16})
    multi = card_checkpoint(tmp_path / "pretrained", "vicreg", {"min_scale": 0.2, "max_scale": 1.0})
    files = {"16": card(patchy, {"16 patches": patches}, {"16 patches": random_patches}),
             "central": card(patchy, {"central": central}, {"central": random_central}),
             "vicreg": card(multi, {"central": baseline}, {"central": random_baseline})}
    paths = []
    for name, rows in files.items():
        paths.append(tmp_path / f"card_{name}.json")
        paths[-1].write_text(json.dumps(rows))
    figures = figures_with(tmp_path / "figures", effect=0.5, control=0.0)
    found, notes = claims_from_figures(figures, paths)
    assert not notes
    by_key = {c.key: c for c in found}

    def paired(a, b):
        return stats.ttest_1samp(a.astype(float) - b.astype(float), 0.0).confidence_interval(0.95)

    b = next(m for m in by_key["b"].measurements if m.model == "emp-ssl (full, bf16)" and m.measure.startswith("kNN"))
    assert b.estimate.value == pytest.approx(100 * (patches.mean() - central.mean()))
    assert (b.estimate.low / 100, b.estimate.high / 100) == pytest.approx(paired(patches, central), abs=1e-12)
    assert (b.control.low / 100, b.control.high / 100) == pytest.approx(paired(random_patches, random_central),
                                                                        abs=1e-12)
    e = [m for m in by_key["e"].measurements if "(full" in m.model]
    assert [m.model for m in e] == ["emp-ssl (full, bf16) vs vicreg (full, bf16)"] * 2
    assert (e[0].estimate.low / 100, e[0].estimate.high / 100) == pytest.approx(paired(patches, baseline), abs=1e-12)
    assert e[0].ci_method == "paired difference of accuracies" and e[0].bound == -claims.MATCH_MARGIN
    assert all(("(full" in m.model) == (m.model.count("(full") == 2) for m in by_key["e"].measurements)
    assert not by_key["e"].notes  # nor a note for every card and figure that were never to be compared
    assert "(full): the model cards, every one of the 4,000 test images" in by_key["e"].measured_as
    assert "vicreg (full, bf16)" in " ".join(by_key["b"].notes)  # a central view alone: said, not judged

    moved = card(multi, {"central": baseline}, {"central": random_baseline})
    moved[0]["checkpoint"] = str(tmp_path / "gone.pt")
    paths.append(tmp_path / "elsewhere.json")
    paths[-1].write_text(json.dumps(moved))
    multi.write_bytes(multi.read_bytes() + b"\0")  # the shipped file replaced since its card was made
    damaged = card(patchy, {"16 patches": ~patches}, {"16 patches": random_patches})  # would replace the 16 patches
    damaged.append({**damaged[0], "trained": {"sixteen": {"knn": 1.0, "linear": 1.0}}})
    paths.append(tmp_path / "damaged.json")
    paths[-1].write_text(json.dumps(damaged))
    found, notes = claims_from_figures(figures, paths)
    assert any("damaged.json: not a model card that can be read (ValueError: unknown protocol 'sixteen')" in note
               for note in notes)
    emp = next(m for m in {c.key: c for c in found}["b"].measurements if m.model == "emp-ssl (full, bf16)")
    assert emp.estimate == b.estimate  # the damaged file left out whole: its readable row did not join in
    assert any("card_vicreg.json: measured another file" in note for note in notes)
    assert any("elsewhere.json: its checkpoint" in note and "is not here" in note for note in notes)
    assert not [m for m in {c.key: c for c in found}["e"].measurements if "(full" in m.model]


def test_committed_cards_give_the_full_protocol_rows_without_a_note():
    """The model cards `make claims` reads (the bf16 full protocol of benchmarks/results) are of the shipped files
    and give b and e from their per-image values: the k-NN differences are the cards' accuracies' differences."""
    root = FIGURES.parent
    paths = sorted((root / "benchmarks" / "results").glob("card-full-16patches_*.json")) + sorted(
        (root / "benchmarks" / "results").glob("card-full-central-bf16_*.json"))
    outputs, notes = claims.read_cards(paths)  # their checkpoints are named from the repository's root
    assert not notes and {o.model for o in outputs} >= {"emp-ssl (full, bf16)", "bagssl (full, bf16)",
                                                        "vicreg (full, bf16)"}
    emp = next(o for o in outputs if o.model == "emp-ssl (full, bf16)")
    knn = {row["protocol"]: row["knn"]["20"] for row in emp.doc["protocols"]}
    sixteen = json.loads((root / "benchmarks/results/card-full-16patches_emp-ssl-resnet18-cifar10.json").read_text())
    assert knn["16"] == sixteen[0]["trained"]["16 patches"]["knn"]
    b = next(m for m in claims.aggregation_claim(outputs).measurements if m.measure.startswith("kNN"))
    assert b.estimate.value == pytest.approx(knn["16"] - knn["central"], abs=1e-4) and b.control_beaten
