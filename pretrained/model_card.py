"""The numbers of the model cards in pretrained/README.md, measured with ``ssl_patch_analysis.evaluate``.

For each checkpoint, and for its random-init control (the same architecture with fresh weights,
BatchNorm calibrated on 512 training images: ``models.randomly_initialised``), on CIFAR-10 test
against the training split: the central view (the whole 32x32 image), and for patch-trained models
also the mean embedding of ``--num-patches`` fixed-scale patches at the pretraining patch size (the
paper's "n patches" protocol). Each feature set gets the weighted k-NN of DINO/solo-learn (cosine,
k = 20, temperature 0.07) and a linear probe (``evaluate``'s default: Adam on standardised
features, last epoch), exactly as ``python -m ssl_patch_analysis.evaluate`` computes them.

    python pretrained/model_card.py pretrained/vicreg-resnet18-cifar10.pt pretrained/bagssl-resnet18-cifar10.pt
    python pretrained/model_card.py runs/x/checkpoint.pt --max-images 2000 --probe-epochs 20   # a quick look
    python pretrained/model_card.py runs/x/checkpoint.pt --protocols central   # the central view only

A card written with --json resumes: run the same command again after an interruption and the parts already in
that file (same checkpoint sha256, same settings) are reused. A part (the model, or its control) stopped in the middle
loses its extraction unless --cache-dir DIR keeps the patch embeddings in evaluate's resumable stores: then it goes
on from the last batch written (the full 16-patch card takes hours on a CPU without bf16 units).

Every ResNet-18 of pretrained/ has the same control, so a card can take it from another's after checking it is the
same random network on the same patches and images:

    python pretrained/model_card.py pretrained/bagssl-resnet18-cifar10.pt --amp --protocols 16 \
        --control-from benchmarks/results/card-full-16patches_emp-ssl-resnet18-cifar10.json --json bagssl16.json

``--control-from REV:PATH`` (git's syntax) takes it from the card as a commit holds it, e.g. the card a newer model's
replaced; the card records what it was given (``random_init_from``).

Two cards measured on the same test images (each keeps every test image's right/wrong) compare paired:

    python pretrained/model_card.py --compare new.card.json old.card.json   # A - B, per protocol pair, 95% CI
    python pretrained/model_card.py --compare new.card.json old.card.json --control   # their random-init controls

A candidate is judged before it replaces the shipped model: ``--compare candidate.json shipped.json --verdict`` exits
0 when the candidate's k-NN is better beyond the paired 95% interval on every protocol both cards measured and no
classifier is worse beyond it, and 3 (the shipped model stays) otherwise. A candidate's card then becomes the shipped
model's without measuring again: copy it to the shipped card's path and run the card of the shipped file (the same
bytes, its sha256) with that --json; both parts are reused under the new path.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ssl_patch_analysis import cli
from ssl_patch_analysis.checkpoints import describe, load_model
from ssl_patch_analysis.claims import paired_difference
from ssl_patch_analysis.data import load_dataset
from ssl_patch_analysis.evaluate import (
    ProbeSchedule,
    effective_ks,
    evaluate_protocols,
    pretraining_scale,
    protocol_title,
    read_correct,
    subset_ids,
)
from ssl_patch_analysis.extract import extract_patch_embeddings, extraction_options
from ssl_patch_analysis.models import randomly_initialised
from ssl_patch_analysis.patches import central, random_fixed
from ssl_patch_analysis.report import data_label, save_json
from ssl_patch_analysis.store import file_sha256

CALIBRATION_IMAGES = 512
# What two cards must share for one's measurement to stand for the other's (a resumed part, a shared control); the
# test ids' sha256 follows from the images and the seed, and is known only once a part has been measured.
SAME_SETTINGS = ("train_images", "test_images", "knn", "probe", "extraction", "seed", "data")
# Settings a card written before they were recorded lacks: unknown there, so not compared (cards before 2026-12-08
# have no "data"; the project's were all measured on CIFAR-10 (JPEG copy)).
_RECORDED_LATER = ("data",)


def amp_agreement(model, data, protocols, device) -> dict[str, dict[str, float]]:
    """Cosine similarity between bf16-autocast and float32 patch embeddings, per protocol."""
    result = {}
    for name, sampler in protocols.items():
        runs = [extract_patch_embeddings(model, data, sampler, layers=["h"], device=device, dtype="float32",
                                         progress=False, amp=amp).layer("h") for amp in (True, False)]
        cosine = F.cosine_similarity(*(torch.from_numpy(r).float().flatten(0, 1) for r in runs), dim=1)
        result[name] = {"min": float(cosine.min()), "mean": float(cosine.mean())}
    return result


def card_protocols(model, num_patches: int) -> list[str]:
    """``central`` for every model, and ``N`` patches at the pretraining scale for patch-trained ones."""
    patch_size = model.info.extra.get("train", {}).get("patch_size")
    if model.info.method in ("bagssl", "emp-ssl") and patch_size:
        return ["central", str(num_patches)]
    return ["central"]


def card_numbers(results: dict) -> dict[str, dict[str, float]]:
    """``{protocol title: {"knn": k=20 top-1, "linear": probe top-1}}`` from evaluate_protocols' results."""
    k = results["knn_settings"]["ks"][0]
    return {row["title"]: {"knn": row["knn"][k], "linear": row["linear"]} for row in results["protocols"]}


def card_correct(results: dict) -> dict[str, dict[str, str]]:
    """``{protocol title: {"knn": "0110...", "linear": "..."}}``: each test image's right/wrong (k = 20 and the
    probe), in the order whose sha256 is ``results["test_ids_sha256"]``, so that two cards can be compared paired."""
    k = results["knn_settings"]["ks"][0]
    return {row["title"]: {"knn": row["correct"]["knn"][k], "linear": row["correct"]["linear"]}
            for row in results["protocols"]}


def control_sha256(model, calibration: torch.Tensor) -> str:
    """sha256 of what a control's layer h is made of: its backbone's random weights and the images its BatchNorm
    statistics were calibrated on (the statistics themselves vary in their last bits with the memory layout)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.backbone.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(calibration.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _patch_scale(model) -> dict | None:
    """The scale of the patches of the card's "N patches" protocol, or None for a model that records none (it has
    the central view only)."""
    try:
        return json.loads(json.dumps(dataclasses.asdict(pretraining_scale(model))))  # as a card JSON holds it
    except ValueError:
        return None


def _differences(row: dict, other: dict, keys: tuple[str, ...]) -> list[str]:
    """What differs between two cards' ``keys`` (a card without ``seed`` was made with the default, 0)."""
    def value(card: dict, key: str):
        return card.get(key, 0) if key == "seed" else card.get(key)
    return [f"{key} ({value(other, key)!r} there, {value(row, key)!r} here)" for key in keys
            if value(other, key) != value(row, key)
            and not (key in _RECORDED_LATER and (key not in row or key not in other))]


def earlier_rows(path: str | None) -> list:
    """The rows an earlier run wrote to ``path`` (--json), or none (no file); SystemExit for a file that is not a card
    (it would be replaced by one)."""
    if not path or not Path(path).exists():
        return []
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        rows = error
    if not isinstance(rows, list) or not all(isinstance(row, dict) and "checkpoint" in row for row in rows):
        reason = f"cannot be read as JSON: {rows}" if isinstance(rows, Exception) else "is not a card"
        raise SystemExit(f"error: --json {path} {reason} (a list of model_card.py rows), so it is not replaced: "
                         "choose another --json, or move that file away")
    return rows


def measured_before(rows: list, row: dict, titles: set[str]) -> dict | None:
    """This checkpoint's row from an earlier run that wrote the same --json (``rows``: an interrupted run, or the card
    of a candidate model copied there before the candidate was shipped under another path), when it measured the
    same file (its sha256, wherever the file was then: cards written before they recorded it are measured again) the
    same way (images, classifiers, extraction, seed, protocols); else None. Its parts (trained, random_init) are
    reused."""
    for old in rows:
        if not isinstance(old, dict) or "trained" not in old:
            continue
        same = not _differences(row, old, SAME_SETTINGS) and set(old["trained"]) == titles
        same &= old.get("checkpoint_sha256") == row["checkpoint_sha256"]
        if same and "test_ids_sha256" in old and "trained" in old.get("correct", {}):
            return old
    return None


def control_from(path: str, row: dict, calibration: torch.Tensor) -> dict:
    """The random-init part of the card ``path`` for this row, after checking that it measured the same network
    (the sha256 of the control's backbone: the same architecture and seed, BatchNorm calibrated on the same images)
    on the same patches and images, with the same classifiers and extraction; SystemExit naming what differs."""
    other = _read_card(path)
    problems = _differences(row, other, (*SAME_SETTINGS, "test_ids_sha256"))
    missing = [t for t in row["trained"] if t not in other.get("random_init", {})
               or t not in other["correct"].get("random_init", {})]
    if missing:
        problems.append(f"no random-init {', '.join(missing)} there")
    other_sha, other_scale = other.get("control_backbone_sha256"), other.get("patch_scale")
    if other_sha is None or other_scale is None:  # a card written before they were recorded: rebuild its control
        try:
            other_model = load_model(other["checkpoint"], device="cpu", verbose=False)
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: --control-from {path}: its checkpoint {other['checkpoint']} cannot be loaded "
                             f"to check its control ({error}); measure the control (drop --control-from)") from None
        other_scale = _patch_scale(other_model)
        other_sha = control_sha256(randomly_initialised(other_model, row["seed"]), calibration)
    if other_sha != row["control_backbone_sha256"]:
        problems.append("another random network (the controls' backbone sha256 differ)")
    if other_scale != row["patch_scale"] and set(row["trained"]) != {"central"}:  # the central view cuts no patches
        problems.append(f"other patches ({other_scale} there, {row['patch_scale']} here)")
    if problems:
        raise SystemExit(f"error: --control-from {path} cannot stand for {row['checkpoint']}'s control: "
                         + "; ".join(problems) + ". Measure it (drop --control-from)")
    return {"random_init": {t: other["random_init"][t] for t in row["trained"]},
            "correct": {t: other["correct"]["random_init"][t] for t in row["trained"]}}


def _card_text(path: str) -> str:
    """A card file's text; ``REV:PATH`` (git's syntax, when no file has that name) is the file at a commit of the
    working directory's repository, so that a card replaced by a newer model's can still give its control."""
    if Path(path).exists() or not re.fullmatch(r"[0-9A-Fa-f]{4,40}:[^:]+", path):
        return Path(path).read_text(encoding="utf-8")
    try:
        git = subprocess.run(["git", "show", path], capture_output=True)
    except FileNotFoundError:
        raise SystemExit(f"error: cannot read the card {path} from git: git is not installed") from None
    if git.returncode:
        reason = git.stderr.decode(errors="replace").strip().splitlines() or [f"git show exited {git.returncode}"]
        raise SystemExit(f"error: cannot read the card {path} from git: {reason[0]} (run from the repository that "
                         "has the commit)")
    return git.stdout.decode("utf-8")


def _read_card(path: str) -> dict:
    """The one row of a card JSON (a file, or ``REV:PATH``: :func:`_card_text`) that keeps each test image's
    right/wrong, or SystemExit with what is wrong."""
    try:
        rows = json.loads(_card_text(path))
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot read the card {path}: {error}") from None
    if not isinstance(rows, list) or len(rows) != 1 or not isinstance(rows[0], dict):
        raise SystemExit(f"error: {path} is not a card of one model (model_card.py --json of one checkpoint)")
    if "correct" not in rows[0] or "test_ids_sha256" not in rows[0]:
        raise SystemExit(f"error: {path} does not keep each test image's right/wrong (a card made before they were "
                         "kept): measure it again with pretrained/model_card.py --json")
    return rows[0]


def compare_cards(path_a: str, path_b: str, a: dict, b: dict, kind: str = "trained") -> list[dict]:
    """Card ``a`` (read from ``path_a`` by ``_read_card``) minus card ``b``, paired over the same test images: one row
    per protocol of A, protocol of B and classifier (k-NN, linear), with the Student-t 95% interval of the mean
    per-image difference."""
    if a.get("data") and b.get("data") and a["data"] != b["data"]:  # the same ids of other pixels (official vs JPEG)
        raise SystemExit(f"error: {path_a} and {path_b} were measured on different data ({a['data']} vs {b['data']}): "
                         "measure both on the same data (--data-root)")
    if a["test_ids_sha256"] != b["test_ids_sha256"]:
        raise SystemExit(f"error: {path_a} and {path_b} were measured on different test images (test ids sha256 "
                         f"{a['test_ids_sha256'][:12]} vs {b['test_ids_sha256'][:12]}): measure both with the same "
                         "--max-images and --seed")
    rows = []
    for protocol_a, right_a in a["correct"][kind].items():
        for protocol_b, right_b in b["correct"][kind].items():
            for classifier in ("knn", "linear"):
                x, y = (read_correct(r[classifier]) for r in (right_a, right_b))
                if len(x) != len(y):
                    raise SystemExit(f"error: {path_a} and {path_b} keep {len(x)} and {len(y)} test images' results "
                                     "under the same test ids: a damaged card; measure it again")
                difference = paired_difference(x, y)
                rows.append({"a": protocol_a, "b": protocol_b, "classifier": classifier,
                             "accuracy_a": 100.0 * x.mean(), "accuracy_b": 100.0 * y.mean(),
                             "difference": difference.to_dict(), "test_images": len(x)})
    return rows


def print_comparison(path_a: str, path_b: str, a: dict, b: dict, rows: list[dict], what: str = "trained models"
                     ) -> None:
    for name, path, card in (("A", path_a, a), ("B", path_b, b)):
        print(f"{name} = {path}" + (f" ({card['extraction']})" if card.get("extraction") else ""))
    if a.get("extraction") and b.get("extraction") and a["extraction"] != b["extraction"]:
        print(f"(extracted differently: {a['extraction']} vs {b['extraction']}; that difference is part of "
              "A - B below)")
    print(f"({what})\n")
    print("| protocol A | protocol B | classifier | A | B | A - B [95% CI], paired |")
    print("|---|---|---|---:|---:|---|")
    for r in rows:
        d = r["difference"]
        print(f"| {r['a']} | {r['b']} | {r['classifier']} | {r['accuracy_a']:.2f} | {r['accuracy_b']:.2f} "
              f"| {d['value']:+.2f} [{d['ci95_low']:+.2f}, {d['ci95_high']:+.2f}] |")


# exit status of --compare --verdict when candidate A does not replace B (0 when it does; 1 and 2 are errors)
KEEP_STATUS = 3


def ship_verdict(rows: list[dict]) -> tuple[bool, str]:
    """Whether candidate card A should replace B (rows of :func:`compare_cards`): on every protocol both measured,
    A's k-NN is better beyond the paired 95% interval (its low end above 0) and no classifier is worse beyond it
    (high end below 0). A gain inside the interval is not a gain: the model that is shipped stays."""
    same = [r for r in rows if r["a"] == r["b"]]
    if not same:
        raise SystemExit("error: --verdict: the two cards share no protocol; compare cards of the same protocols")

    def line(r: dict) -> str:
        d = r["difference"]
        return f"{r['a']} {r['classifier']} {d['value']:+.2f} [{d['ci95_low']:+.2f}, {d['ci95_high']:+.2f}]"

    worse = [line(r) for r in same if r["difference"]["ci95_high"] < 0]
    # an interval that is not a number (one test image) is no gain: NaN <= 0 is false, so it is asked the other way
    flat = [line(r) for r in same if r["classifier"] == "knn" and not r["difference"]["ci95_low"] > 0]
    if worse:
        return False, "worse beyond the interval: " + "; ".join(worse)
    if flat:
        return False, "k-NN not better beyond the interval: " + "; ".join(flat)
    return True, "k-NN better beyond the interval, nothing worse: " + "; ".join(line(r) for r in same)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python pretrained/model_card.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoints, or with --compare two card JSONs")
    parser.add_argument("--compare", action="store_true",
                        help="the two arguments are card JSONs (--json) measured on the same test images: print A - B "
                             "per protocol pair and classifier, paired over the test images, with 95%% intervals")
    parser.add_argument("--control", action="store_true",
                        help="with --compare: compare the cards' random-init controls instead of the trained models")
    parser.add_argument("--verdict", action="store_true",
                        help="with --compare of a candidate card A and the shipped model's card B: say whether A "
                             "replaces B (k-NN better beyond its paired 95%% interval on every shared protocol, "
                             f"nothing worse beyond it); exit status 0 if it does, {KEEP_STATUS} if it does not")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", type=cli.device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-patches", type=cli.positive_int, default=16)
    parser.add_argument("--protocols", default=None,
                        help="comma-separated evaluate protocols, e.g. central (default: central, and --num-patches "
                             "patches for patch-trained models)")
    parser.add_argument("--seed", type=cli.non_negative_int, default=0)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (default float32)")
    parser.add_argument("--json", type=cli.output_file, default=None,
                        help="write the results here (also after each model's trained part, so that an interrupted "
                             "run keeps what it measured)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--cache-dir", type=cli.folder, default=None, metavar="DIR",
                        help="keep the patch embeddings in resumable stores under DIR (evaluate's --cache-dir, "
                             "float32): a card stopped in the middle of an extraction goes on from the last batch "
                             "written when the same command runs again, instead of from the start of that part; "
                             "the full 16-patch card holds ~2 GB there")
    parser.add_argument("--max-images", type=cli.positive_int, default=None,
                        help="a seeded class-stratified subset of this many images of each split (quick checks)")
    parser.add_argument("--probe-epochs", type=cli.positive_int, default=None,
                        help="linear-probe epochs (default: evaluate's)")
    parser.add_argument("--amp-check", action="store_true",
                        help="also compare bf16-autocast embeddings with float32 ones (test split)")
    parser.add_argument("--control-from", default=None, metavar="CARD",
                        help="take the random-init control from this card JSON (of another checkpoint; REV:PATH "
                             "reads it from a commit, as git show does) instead of measuring it, after checking "
                             "that it is the same random network (sha256 of the control's backbone) on the same "
                             "patches, images, classifiers and extraction: every ResNet-18 of pretrained/ has the "
                             "same control, ~45 min per full card on a CPU")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verdict and not args.compare:
        parser.error("--verdict judges two cards: use it with --compare CANDIDATE.json SHIPPED.json")
    if args.compare:
        if len(args.checkpoints) != 2:
            parser.error("--compare takes two card JSONs")
        cards = [_read_card(path) for path in args.checkpoints]
        rows = compare_cards(*args.checkpoints, *cards, kind="random_init" if args.control else "trained")
        print_comparison(*args.checkpoints, *cards, rows,
                         "random-init controls" if args.control else "trained models")
        if args.verdict:
            if args.control:
                parser.error("--verdict judges trained models; drop --control")
            replace, why = ship_verdict(rows)
            print(f"\nverdict: {'ship A, it replaces B' if replace else 'keep B, A is not shipped'} ({why})")
            if not replace:
                raise SystemExit(KEEP_STATUS)
        return rows
    previous = earlier_rows(args.json)  # a --json that is not a card is refused before anything is measured
    device = cli.resolve_device(args.device)
    # Each file loaded once, before a minute of decoding the data sets (a file that is no model is said first), and
    # hashed as it is loaded: the card names the bytes it measured.
    loaded = [_load_once(path) for path in args.checkpoints]
    train = load_dataset("cifar10", "train", root=args.data_root)
    test = load_dataset("cifar10", "test", root=args.data_root)
    train_ids = subset_ids(train.labels.numpy(), args.max_images, args.seed)
    test_ids = subset_ids(test.labels.numpy(), args.max_images, args.seed)
    (knn_k,) = effective_ks([20], len(train_ids))  # the k used: a bank of fewer than 20 images caps it
    schedule = ProbeSchedule()
    if args.probe_epochs:
        schedule = dataclasses.replace(schedule, epochs=args.probe_epochs)
    calibration = train.get_batch(list(range(min(len(train), CALIBRATION_IMAGES))))

    rows = []
    for path in args.checkpoints:
        model, sha256 = loaded.pop(0)
        model = model.to(device)
        print(describe(model, one_line=True))
        method = model.info.method
        protocols = args.protocols.split(",") if args.protocols else card_protocols(model, args.num_patches)
        start = time.perf_counter()
        row = {"command": cli.command_line("python pretrained/model_card.py", argv),
               "checkpoint": path, "checkpoint_sha256": sha256, "method": method,
               "train_images": len(train_ids), "test_images": len(test_ids),
               "knn": f"weighted, cosine, k={knn_k}, T=0.07", "probe": schedule.describe(), "data": data_label(test),
               "extraction": "bf16 autocast" if args.amp else "float32", "device": str(device), "seed": args.seed,
               "patch_scale": _patch_scale(model), "correct": {}}
        rows.append(row)
        earlier = measured_before(previous, row, {protocol_title(p) for p in protocols})
        for kind in ("trained", "random_init"):
            if kind == "random_init":
                model = randomly_initialised(model, args.seed, calibration_images=calibration)
                row["control_backbone_sha256"] = control_sha256(model, calibration)
            same_control = kind == "trained" or (earlier is not None and earlier.get(
                "control_backbone_sha256", row["control_backbone_sha256"]) == row["control_backbone_sha256"])
            if earlier is not None and kind in earlier and kind in earlier["correct"] and same_control:
                where = "" if earlier.get("checkpoint") == path else f" as {earlier.get('checkpoint')}"
                print(f"{path}: its {kind.replace('_', '-')} part measured earlier{where} into {args.json} (same file "
                      "and settings), reused")
                row[kind], row["correct"][kind] = earlier[kind], earlier["correct"][kind]
                row["test_ids_sha256"] = earlier["test_ids_sha256"]
                row[f"{kind}_seconds_earlier"] = earlier.get("seconds")
                if kind == "random_init" and "random_init_from" in earlier:
                    row["random_init_from"] = earlier["random_init_from"]
                continue
            if kind == "random_init" and args.control_from:
                taken = control_from(args.control_from, row, calibration)
                row["random_init"], row["correct"]["random_init"] = taken["random_init"], taken["correct"]
                row["random_init_from"] = args.control_from
                row["seconds"] = round(time.perf_counter() - start, 1)
                if args.json:
                    _write_json(args.json, rows)
                continue
            with extraction_options(amp=args.amp):
                results = evaluate_protocols(model, train, test, protocols, train_ids=train_ids, test_ids=test_ids,
                                             ks=(20,), schedule=schedule, seed=args.seed, device=device,
                                             store_dir=args.cache_dir, progress=not args.no_progress)
            row[kind] = card_numbers(results)
            row["test_ids_sha256"] = results["test_ids_sha256"]
            row["correct"][kind] = card_correct(results)
            if kind == "trained" and args.amp_check:
                samplers = {"central": central()}
                if str(args.num_patches) in protocols:
                    samplers[f"{args.num_patches} patches"] = random_fixed(
                        args.num_patches, int(model.info.extra["train"]["patch_size"]), seed=args.seed)
                row["bf16_vs_fp32_cosine"] = amp_agreement(model, test, samplers, device)
            row["seconds"] = round(time.perf_counter() - start, 1)
            if args.json:
                _write_json(args.json, rows)
        if args.json:  # also a card reused whole: it is now named after this path
            _write_json(args.json, rows)

    print("| checkpoint | protocol | k-NN top-1 trained | linear trained | k-NN top-1 random init "
          "| linear random init |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        for name, trained in row["trained"].items():
            control = row["random_init"][name]
            print(f"| {row['checkpoint']} | {name} | {trained['knn']:.2f} | {trained['linear']:.2f} "
                  f"| {control['knn']:.2f} | {control['linear']:.2f} |")
    return rows


def _load_once(path: str):
    """The model in ``path`` and the sha256 of the bytes it was loaded from: a file rewritten while it is read (a run
    saving into it) is refused, since the card would name bytes it did not measure."""
    before = file_sha256(Path(path)) if Path(path).is_file() else None  # load_model says what a missing file is
    model = load_model(path, verbose=False)
    after = file_sha256(Path(path))
    if before is not None and after != before:
        raise SystemExit(f"error: {path} changed while it was being read (is a run writing it?): run the card again "
                         "once it is written")
    return model, after


def _write_json(path: str, rows: list[dict]) -> None:
    """``report.save_json`` (whole or not at all); a file that cannot be written (a full disk) stops the run in one
    line that still gives the accuracies measured so far."""
    try:
        save_json(rows, path)
    except OSError as error:
        measured = {row["checkpoint"]: {kind: row[kind] for kind in ("trained", "random_init") if kind in row}
                    for row in rows}
        raise SystemExit(f"error: cannot write the card {path} ({error}); measured so far: "
                         f"{json.dumps(measured)}") from None


if __name__ == "__main__":
    cli.command(main)()  # one line and exit status 2 for a user's error, the traceback with --debug
