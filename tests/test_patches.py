"""Patch samplers: geometry checked against brute-force enumeration, pixel painting and torchvision."""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.functional import center_crop

from ssl_patch_analysis.patches import (
    box_centers,
    box_sizes,
    central,
    grid,
    random_fixed,
    random_resized,
    sampler_from_dict,
)

FAST = settings(max_examples=60, deadline=None)


def brute_force_grid(height: int, width: int, patch: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Every top-left corner on the stride lattice whose patch stays inside, row by row."""
    return [
        (x, y, x + patch, y + patch)
        for y in range(height)
        for x in range(width)
        if y % stride == 0 and x % stride == 0 and y + patch <= height and x + patch <= width
    ]


def coverage(boxes: torch.Tensor, height: int, width: int) -> np.ndarray:
    """How many boxes cover each pixel (x1/y1 exclusive)."""
    count = np.zeros((height, width), dtype=int)
    for x0, y0, x1, y1 in boxes.to(torch.int64).tolist():
        count[y0:y1, x0:x1] += 1
    return count


def assert_inside_with_integer_corners(boxes: torch.Tensor, height: int, width: int) -> None:
    assert boxes.dtype == torch.float32
    assert torch.equal(boxes, boxes.round())
    x0, y0, x1, y1 = boxes.unbind(-1)
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (x1 <= width).all() and (y1 <= height).all()
    assert (x1 > x0).all() and (y1 > y0).all()


@FAST
@given(
    patch=st.integers(1, 9),
    rows=st.integers(1, 6),
    cols=st.integers(1, 6),
    extra_h=st.integers(0, 8),
    extra_w=st.integers(0, 8),
)
def test_grid_at_stride_patch_size_tiles_the_image_exactly_once(patch, rows, cols, extra_h, extra_w):
    # Leftover strips narrower than a patch stay uncovered; with none, every pixel is covered once.
    extra_h, extra_w = extra_h % patch, extra_w % patch
    height, width = rows * patch + extra_h, cols * patch + extra_w
    sampler = grid(patch)
    assert sampler.grid_shape((height, width)) == (rows, cols)
    count = coverage(sampler.boxes([0], (height, width))[0], height, width)
    assert (count[: rows * patch, : cols * patch] == 1).all()
    assert count[rows * patch :, :].sum() == 0 and count[:, cols * patch :].sum() == 0


@FAST
@given(
    height=st.integers(1, 40), width=st.integers(1, 40), patch=st.integers(1, 40), stride=st.integers(1, 12)
)
def test_grid_boxes_and_count_match_brute_force_enumeration(height, width, patch, stride):
    sampler = grid(patch, stride)
    if patch > min(height, width):
        with pytest.raises(ValueError, match=f"side {patch}.*height {height} and width {width}"):
            sampler.num_patches((height, width))
        return
    expected = brute_force_grid(height, width, patch, stride)
    assert sampler.num_patches((height, width)) == len(expected)
    rows, cols = sampler.grid_shape((height, width))
    assert rows * cols == len(expected)
    boxes = sampler.boxes([3, 1], (height, width))
    assert boxes.shape == (2, len(expected), 4) and boxes.dtype == torch.float32
    # Row-major order: y outer, x inner, exactly as enumerated.
    assert [tuple(b) for b in boxes[0].to(torch.int64).tolist()] == expected
    assert torch.equal(boxes[0], boxes[1])


@FAST
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    patch=st.integers(1, 40),
    stride=st.integers(1, 6),
    replace=st.booleans(),
    seed=st.integers(0, 2**40),
)
def test_random_fixed_boxes_are_inside_on_the_stride_lattice_and_of_the_patch_size(
    height, width, patch, stride, replace, seed
):
    if patch > min(height, width):
        return
    count = len(brute_force_grid(height, width, patch, stride))
    n = min(5, count) if not replace else 5
    sampler = random_fixed(n, patch, seed=seed, replace=replace, stride=stride)
    boxes = sampler.boxes([0, 7, 9], (height, width))
    assert boxes.shape == (3, n, 4)
    assert_inside_with_integer_corners(boxes, height, width)
    assert (box_sizes(boxes) == patch).all()
    assert (boxes[..., :2].to(torch.int64) % stride == 0).all()


def test_random_fixed_positions_are_uniform_over_the_lattice():
    height, width, patch, stride = 20, 14, 6, 4  # 4 x 3 = 12 positions
    positions = brute_force_grid(height, width, patch, stride)
    boxes = random_fixed(300, patch, seed=3, stride=stride).boxes(range(40), (height, width))
    drawn = [tuple(b) for b in boxes.reshape(-1, 4).to(torch.int64).tolist()]
    observed = [drawn.count(p) for p in positions]
    assert sum(observed) == len(drawn)  # nothing drawn off the lattice
    assert stats.chisquare(observed).pvalue > 1e-3


def test_random_fixed_without_replacement_draws_distinct_positions_and_all_of_them_at_n_equal_count():
    height, width, patch, stride = 32, 32, 16, 2
    positions = brute_force_grid(height, width, patch, stride)
    assert len(positions) == 81
    few = random_fixed(40, patch, seed=1, replace=False, stride=stride).boxes(range(6), (height, width))
    for image in few.to(torch.int64).tolist():
        assert len(set(map(tuple, image))) == 40
    every = random_fixed(81, patch, seed=1, replace=False, stride=stride).boxes(range(4), (height, width))
    for image in every.to(torch.int64).tolist():
        assert sorted(map(tuple, image)) == sorted(positions)
    # Random order, not the grid order, so any prefix is itself a random draw.
    assert [tuple(b) for b in every[0].to(torch.int64).tolist()] != positions
    with pytest.raises(ValueError, match="only 81 positions"):
        random_fixed(82, patch, replace=False, stride=stride).boxes([0], (height, width))


SEEDED = [
    random_fixed(8, 12, seed=4),
    random_fixed(8, 12, seed=4, replace=False, stride=2),
    random_resized(8, seed=4),
]


@pytest.mark.parametrize("sampler", SEEDED, ids=lambda s: s.kind + str(s.to_dict().get("replace", "")))
def test_random_boxes_depend_only_on_seed_and_image_id(sampler):
    size = (32, 40)
    alone = sampler.boxes([5], size)
    in_batch = sampler.boxes(list(range(10)), size)
    assert torch.equal(alone[0], in_batch[5])
    assert torch.equal(sampler.boxes(torch.tensor([9, 5]), size)[1], alone[0])
    assert torch.equal(sampler.boxes(np.array([5, 2]), size)[0], alone[0])
    assert torch.equal(sampler.boxes([5], size), alone)
    rebuilt_other_seed = sampler_from_dict({**sampler.to_dict(), "seed": 5})
    assert not torch.equal(rebuilt_other_seed.boxes([5], size), alone)
    assert not torch.equal(in_batch[5], in_batch[6])  # different images, different boxes


def _torchvision_boxes(height: int, width: int, scale, ratio, draws: int) -> torch.Tensor:
    image = torch.empty(3, height, width)
    torch.manual_seed(0)
    params = [RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(draws)]
    return torch.tensor([(j, i, j + w, i + h) for i, j, h, w in params], dtype=torch.float32)


@pytest.mark.parametrize("height,width", [(32, 32), (24, 64)])
def test_random_resized_matches_torchvision_random_resized_crop_statistically(height, width):
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    sampler = random_resized(100, scale=scale, ratio=ratio, seed=0)
    ours = sampler.boxes(range(100), (height, width)).reshape(-1, 4)
    theirs = _torchvision_boxes(height, width, scale, ratio, 10_000)
    assert_inside_with_integer_corners(ours, height, width)
    features = {
        "area fraction": lambda b: box_sizes(b).prod(-1) / (height * width),
        "aspect ratio": lambda b: box_sizes(b)[:, 0] / box_sizes(b)[:, 1],
        "centre x": lambda b: box_centers(b)[:, 0] / width,
        "centre y": lambda b: box_centers(b)[:, 1] / height,
    }
    for name, feature in features.items():
        a, b = feature(ours).numpy(), feature(theirs).numpy()
        standard_error = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 4 * standard_error, name
        assert stats.ks_2samp(a, b).pvalue > 1e-3, name
    if height == width:
        return
    # A wide image often gets no fitting try: both fall back to the centred crop on the same share.
    fallback_w = round(height * ratio[1])
    fallback = torch.tensor([(width - fallback_w) // 2, 0, (width - fallback_w) // 2 + fallback_w, height],
                            dtype=torch.float32)
    ours_rate = (ours == fallback).all(-1).float().mean().item()
    theirs_rate = (theirs == fallback).all(-1).float().mean().item()
    assert ours_rate > 0.01 and abs(ours_rate - theirs_rate) < 0.02


@pytest.mark.parametrize(
    "height,width,scale,ratio",
    [
        (32, 32, (1.0, 1.0), (1.0, 1.0)),  # the whole image
        (20, 30, (1.0, 1.0), (1.0, 1.0)),  # no try fits: fallback to a centred square
        (32, 32, (1.0, 1.0), (0.5, 0.5)),  # fallback to a tall crop
        (32, 32, (1.0, 1.0), (2.0, 2.0)),  # fallback to a wide crop
        (64, 16, (0.9, 1.0), (3.0, 4.0)),  # fallback for a tall image asked for wide crops
    ],
)
def test_random_resized_equals_torchvision_where_its_outcome_is_deterministic(height, width, scale, ratio):
    expected = _torchvision_boxes(height, width, scale, ratio, 1)[0]
    boxes = random_resized(5, scale=scale, ratio=ratio, seed=2).boxes([0, 1], (height, width))
    assert torch.equal(boxes, expected.expand(2, 5, 4))


def test_random_resized_scale_one_ratio_one_is_the_whole_image():
    boxes = random_resized(4, scale=(1, 1), ratio=(1, 1)).boxes([0], (32, 32))
    assert torch.equal(boxes, torch.tensor([0.0, 0.0, 32.0, 32.0]).expand(1, 4, 4))


def test_central_gives_the_standard_views():
    assert central().boxes([0], (32, 32)).tolist() == [[[0.0, 0.0, 32.0, 32.0]]]
    assert central(224).boxes([0, 1], (256, 256)).tolist() == [[[16.0, 16.0, 240.0, 240.0]]] * 2
    assert central().num_patches((32, 32)) == 1


@FAST
@given(height=st.integers(1, 30), width=st.integers(1, 30), size=st.one_of(st.none(), st.integers(1, 30)))
def test_central_box_is_torchvision_center_crop(height, width, size):
    if size is not None and size > min(height, width):
        with pytest.raises(ValueError, match=f"side {size}.*height {height} and width {width}"):
            central(size).boxes([0], (height, width))
        return
    side = min(height, width) if size is None else size
    # Each pixel holds its own (row, col), so the crop says where it was taken.
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    crop = center_crop(torch.stack((rows, cols)), [side, side])
    (y0, x0), (y_last, x_last) = crop[:, 0, 0].tolist(), crop[:, -1, -1].tolist()
    expected = [x0, y0, x_last + 1, y_last + 1]
    assert central(size).boxes([4], (height, width)).tolist() == [[expected]]


ALL = [grid(8), grid(8, 3), central(), central(20), *SEEDED]


@pytest.mark.parametrize("sampler", ALL, ids=lambda s: json.dumps(s.to_dict()))
def test_to_dict_round_trips_through_json(sampler):
    d = json.loads(json.dumps(sampler.to_dict()))
    assert d["kind"] == sampler.kind
    rebuilt = sampler_from_dict(d)
    assert rebuilt == sampler
    assert torch.equal(rebuilt.boxes([2, 3], (32, 40)), sampler.boxes([2, 3], (32, 40)))


@pytest.mark.parametrize("sampler", ALL, ids=lambda s: json.dumps(s.to_dict()))
def test_num_patches_is_the_number_of_boxes_and_empty_batches_work(sampler):
    size = (32, 40)
    p = sampler.num_patches(size)
    assert sampler.boxes([0, 1, 2], size).shape == (3, p, 4)
    assert sampler.boxes([], size).shape == (0, p, 4)


def test_seed_and_patch_size_attributes_describe_the_sampler():
    # Extractors record these: deterministic samplers report seed 0, multi-scale ones no fixed side.
    assert grid(8).seed == 0 and central(4).seed == 0
    assert random_fixed(2, 5, seed=7).seed == 7 and random_resized(2, seed=9).seed == 9
    assert grid(8).patch_size == 8 and random_fixed(2, 5).patch_size == 5 and central(4).patch_size == 4
    assert random_resized(2).patch_size is None and central().patch_size is None


def test_box_centers_and_sizes():
    boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [4.0, 6.0, 12.0, 10.0]]])
    assert box_centers(boxes).tolist() == [[[16.0, 16.0], [8.0, 8.0]]]
    assert box_sizes(boxes).tolist() == [[[32.0, 32.0], [8.0, 4.0]]]
    with pytest.raises(ValueError, match="last dimension of 4"):
        box_sizes(torch.zeros(2, 3))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: grid(0), "patch_size must be a positive integer"),
        (lambda: grid(-3), "patch_size must be a positive integer"),
        (lambda: grid(8, 0), "stride must be a positive integer"),
        (lambda: grid(8.5), "patch_size must be an integer"),
        (lambda: random_fixed(4, 8, stride=-1), "stride must be a positive integer"),
        (lambda: random_fixed(0, 8), r"n \(patches per image\) must be a positive integer"),
        (lambda: random_fixed(4, 0), "patch_size must be a positive integer"),
        (lambda: random_resized(0), r"n \(patches per image\) must be a positive integer"),
        (lambda: random_resized(4, scale=(0.0, 1.0)), "scale must be"),
        (lambda: random_resized(4, scale=(0.5, 1.5)), "scale must be"),
        (lambda: random_resized(4, scale=(0.9, 0.2)), "scale must be"),
        (lambda: random_resized(4, scale=0.5), "scale must be a pair"),
        (lambda: random_resized(4, ratio=(0.0, 1.0)), "ratio must be"),
        (lambda: random_resized(4, ratio=(-1.0, 1.0)), "ratio must be"),
        (lambda: random_resized(4, ratio=(2.0, 1.0)), "ratio must be"),
        (lambda: central(0), "central size must be a positive integer"),
        (lambda: sampler_from_dict({"kind": "sliding"}), "unknown sampler kind 'sliding'"),
        (
            lambda: sampler_from_dict({"kind": "grid", "patch_size": 8, "stride": 8, "seed": 1}),
            r"unknown parameters \['seed'\]",
        ),
    ],
)
def test_invalid_parameters_are_rejected_with_a_clear_message(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: grid(40).boxes([0], (32, 64)), "side 40 does not fit in an image of height 32 and width 64"),
        (lambda: random_fixed(4, 33).boxes([0], (32, 32)), "side 33 does not fit in an image of height 32"),
        (lambda: random_fixed(4, 33).num_patches((32, 32)), "at most 32"),
        (lambda: central(224).boxes([0], (32, 32)), "central crop of side 224 does not fit"),
        (lambda: random_fixed(10, 16, replace=False, stride=16).boxes([0], (32, 32)), "only 4 positions"),
        (lambda: grid(8).boxes([0], (32, 0)), "image width must be a positive integer"),
        (lambda: grid(8).boxes([0], (32,)), r"image_size must be \(height, width\)"),
        (lambda: grid(8).boxes([[0, 1]], (32, 32)), "1-D sequence of integer"),
        (lambda: random_resized(2).boxes([0.5], (32, 32)), "1-D sequence of integer"),
        (lambda: random_resized(2).boxes(["a"], (32, 32)), "1-D sequence of integer"),
        (lambda: random_fixed(2, 4).boxes([-1], (32, 32)), "non-negative"),
    ],
)
def test_bad_image_sizes_and_ids_are_rejected_with_a_clear_message(call, match):
    with pytest.raises(ValueError, match=match):
        call()
