"""The models in pretrained/: each one loads as what its name says, stays under 25 MB, and has its log and card
(its README section and its measured card JSON)."""
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from ssl_patch_analysis import load_model
from ssl_patch_analysis.store import file_sha256
from ssl_patch_analysis.weights import SHIPPED_ALIASES

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"
SHIPPED = sorted(PRETRAINED.glob("*.pt"))
MAX_BYTES = 25 * 10**6


def test_there_are_shipped_models():
    assert {"vicreg-resnet18-cifar10.pt", "bagssl-resnet18-cifar10.pt"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_model_is_small_float16_and_named_for_what_it_is(path):
    assert path.stat().st_size < MAX_BYTES
    raw = torch.load(path, weights_only=True)
    floats = [t for part in ("backbone", "projector", "pre_feature") for t in (raw.get(part) or {}).values()
              if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float16 for t in floats)
    model = load_model(path, verbose=False)
    method, arch, data = path.stem.rsplit("-", 2)  # <method>-<arch>-<data>, e.g. emp-ssl-resnet18-cifar10
    assert (model.info.method, model.info.arch, data) == (method, arch, "cifar10")
    assert (PRETRAINED / f"{path.stem}.log.jsonl").is_file()  # how it was trained
    readme = (PRETRAINED / "README.md").read_text(encoding="utf-8")
    assert path.name in readme or f"`{path.stem}`" in readme  # and its card
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out["h"].shape == (2, model.info.embedding_dim) and torch.isfinite(out["h"]).all()


def test_every_shipped_file_has_a_short_name_and_every_short_name_says_whether_it_ships():
    assert {p.stem for p in SHIPPED} <= set(SHIPPED_ALIASES.values())
    for alias, stem in SHIPPED_ALIASES.items():
        if (PRETRAINED / f"{stem}.pt").is_file():
            assert load_model(alias, verbose=False).info.extra["name"] == stem
        else:  # a model the project names but does not ship yet (simclr): one line saying so
            with pytest.raises(FileNotFoundError, match="not in this checkout yet"):
                load_model(alias, verbose=False)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_model_card_gives_knn_and_linear_for_the_model_and_its_random_init(path):
    """Issue 12: each card has the linear probe and the random-init row beside the k-NN, and the model beats its
    control (a card of an untrained or wrongly loaded file would not)."""
    cards = json.loads((PRETRAINED / f"{path.stem}.card.json").read_text(encoding="utf-8"))
    (card,) = [c for c in cards if Path(c["checkpoint"]).name == path.name]
    assert card["trained"].keys() == card["random_init"].keys() and "central" in card["trained"]
    for protocol, trained in card["trained"].items():
        control = card["random_init"][protocol]
        for metric in ("knn", "linear"):
            assert 10.0 < control[metric] < trained[metric] <= 100.0, (protocol, metric)


FULL_CARDS = sorted((PRETRAINED.parent / "benchmarks" / "results").glob("card-full-*.json"))


@pytest.mark.parametrize("path", FULL_CARDS, ids=[p.stem for p in FULL_CARDS])
def test_full_protocol_cards_are_of_a_shipped_model_and_quoted_as_measured(path):
    """The bf16 full-protocol cards (all 50,000 train, all 10,000 test) are of a shipped file, beat their control,
    keep each test image's right/wrong, and pretrained/README.md quotes their numbers as measured."""
    (card,) = json.loads(path.read_text(encoding="utf-8"))
    assert (PRETRAINED.parent / card["checkpoint"]).resolve() in {p.resolve() for p in SHIPPED}
    assert (card["train_images"], card["test_images"]) == (50000, 10000)
    readme = (PRETRAINED / "README.md").read_text(encoding="utf-8")
    for protocol, trained in card["trained"].items():
        for metric in ("knn", "linear"):
            control = card["random_init"][protocol][metric]
            assert control < trained[metric], (protocol, metric)
            for kind, value in (("trained", trained[metric]), ("random_init", control)):
                right = card["correct"][kind][protocol][metric]
                assert len(right) == 10000 and 100 * right.count("1") / 10000 == pytest.approx(value)
                assert f"{value:.2f}" in readme, (protocol, metric, kind)


CARDS = sorted([*PRETRAINED.glob("*.card.json"), *(PRETRAINED.parent / "benchmarks" / "results").glob("card-*.json")])


def _git(*args: str) -> subprocess.CompletedProcess | None:
    """``git -C <repository root> args``, or None where git is not installed."""
    try:
        return subprocess.run(["git", "-C", str(PRETRAINED.parent), *args], capture_output=True)
    except FileNotFoundError:
        return None


def _from_history(spec: str, card: Path) -> bytes:
    """The file ``REV:PATH`` as this repository's history holds it. Where it cannot be read, the test is skipped with
    the reason when the checkout cannot hold it (no git, not a repository, a shallow clone) and fails otherwise."""
    shallow = _git("rev-parse", "--is-shallow-repository")
    if shallow is None or shallow.returncode or shallow.stdout.strip() == b"true":
        reason = "git is not installed" if shallow is None else shallow.stderr.decode().strip() or "a shallow clone"
        pytest.skip(f"{card.name} names {spec}, which this checkout cannot hold: {reason}")
    git = _git("show", spec)
    assert git.returncode == 0, f"{card.name} names {spec}, not in the history: {git.stderr.decode().strip()}"
    return git.stdout


@pytest.mark.parametrize("path", CARDS, ids=[p.stem for p in CARDS])
def test_a_card_measured_the_file_shipped_now_or_names_the_commit_of_the_file_it_measured(path):
    """A shipped file replaced by a better model leaves its cards stale: every card row records the sha256 of the
    file it measured (model_card.py does since 2026-12-05; older cards were given theirs from the git history), and a
    row naming a file of pretrained/ measured the file there now, or says in ``checkpoint_commit`` which commit's file
    it measured (a record kept for a comparison, in benchmarks/results/ only: a model's own card is never stale)."""
    for row in json.loads(path.read_text(encoding="utf-8")):
        assert "checkpoint_sha256" in row, f"{path.name} does not record which file it measured"
        shipped = PRETRAINED.parent / row["checkpoint"]
        if shipped.parent.resolve() != PRETRAINED.resolve():
            continue
        if "checkpoint_commit" not in row:
            assert file_sha256(shipped) == row["checkpoint_sha256"], f"{path.name} measured another {shipped.name}"
            continue
        assert path.parent != PRETRAINED, f"{path.name}: the shipped model's own card must measure the file shipped"
        measured = _from_history(f"{row['checkpoint_commit']}:{row['checkpoint']}", path)
        assert hashlib.sha256(measured).hexdigest() == row["checkpoint_sha256"], path.name


@pytest.mark.parametrize("path", CARDS, ids=[p.stem for p in CARDS])
def test_a_control_taken_from_another_card_names_a_committed_card_that_gives_it(path):
    """A row whose random-init control was taken from another card (``model_card.py --control-from``) names that card
    as a file committed here or as ``REV:PATH`` of this repository's history (not a run folder's copy, gone with its
    session), and that card gives the same control: the same random network, the same numbers."""
    root = PRETRAINED.parent
    for row in json.loads(path.read_text(encoding="utf-8")):
        source = row.get("random_init_from")
        if source is None:
            continue
        assert (root / source).resolve() != path.resolve(), f"{path.name} names itself as its control's source"
        if ":" in source and not (root / source).exists():  # REV:PATH
            text = _from_history(source, path).decode()
        else:
            repository = _git("rev-parse", "--git-dir")
            if repository is not None and repository.returncode == 0:
                tracked = _git("ls-files", "--error-unmatch", source)
                assert tracked.returncode == 0, f"{path.name} took its control from {source}, which is not committed"
            assert (root / source).is_file(), f"{path.name} took its control from {source}, which is not here"
            text = (root / source).read_text(encoding="utf-8")
        (other,) = json.loads(text)
        if "control_backbone_sha256" in other:  # a card from before it was recorded: model_card.py rebuilt its control
            assert other["control_backbone_sha256"] == row["control_backbone_sha256"], (path.name, source)
        for protocol, numbers in row["random_init"].items():
            assert other["random_init"][protocol] == numbers, (path.name, source, protocol)
            assert other["correct"]["random_init"][protocol] == row["correct"]["random_init"][protocol]
