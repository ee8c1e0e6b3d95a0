"""Tests for ctxpred.data.batching: configuration and BatchAssembler."""

import io
import os
import warnings

import numpy as np
import pytest
import skimage.data
from PIL import Image

from ctxpred.data.batching import BatchAssembler, PatchPairConfig, SkippedImageWarning
from ctxpred.data.images import open_source
from ctxpred.data.sampling import OFFSETS, PatchGeometry

PATCH = 96


def save_photo(path, array):
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Five photos: astronaut, chelsea, coffee and two flipped copies."""
    folder = tmp_path_factory.mktemp("photos")
    astronaut, chelsea, coffee = (
        skimage.data.astronaut(),
        skimage.data.chelsea(),
        skimage.data.coffee(),
    )
    save_photo(folder / "astronaut.jpg", astronaut)
    save_photo(folder / "chelsea.png", chelsea)
    save_photo(folder / "coffee.jpg", coffee)
    save_photo(folder / "coffee_flipped.png", coffee[:, ::-1].copy())
    save_photo(folder / "astronaut_flipped.jpg", astronaut[::-1].copy())
    return folder


def new_buffer(config=None):
    config = config or PatchPairConfig()
    return np.zeros(
        (config.max_patches, 3, config.geometry.patch, config.geometry.patch), dtype=np.float32
    )


def pair_components(info):
    """Connected components of the pair graph, as sorted patch-index lists, in batch order."""
    parent = list(range(info.n_patches))

    def root(node):
        while parent[node] != node:
            node = parent[node]
        return node

    for first, second in zip(info.select1.tolist(), info.select2.tolist()):
        parent[root(first)] = root(second)
    components = {}
    for node in range(info.n_patches):
        components.setdefault(root(node), []).append(node)
    return sorted(components.values())


# ---------------------------------------------------------------------------
# Configuration


def test_config_defaults_and_json_round_trip():
    config = PatchPairConfig()
    assert (config.mode, config.colour, config.noise) == ("grid", "color_dropping", "uniform")
    assert config.geometry == PatchGeometry(96, 48, 7)
    assert (config.grids_per_image, config.max_patches, config.pairs_per_batch) == (4, 512, 128)
    assert (config.min_pixels, config.max_pixels, config.resample_probability) == (
        150_000,
        450_000,
        0.33,
    )
    assert config.mean_rgb == (123.68, 116.78, 103.94)
    assert config.batch_capacity == 511 and config.max_pairs == 8 * 511
    custom = PatchPairConfig(
        mode="pairs", colour="projection", noise="gaussian", geometry=PatchGeometry(jitter=3)
    )
    assert PatchPairConfig.from_json(custom.to_json()) == custom
    assert PatchPairConfig.from_json('{"geometry": {"gap": 40}}').geometry == PatchGeometry(gap=40)
    assert custom.batch_capacity == 256 and custom.max_pairs == 128


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"grid_per_image": 3}', "grid_per_image"),
        ('{"geometry": {"patches": 3}}', "patches"),
        ('{"mode": "triplets"}', "mode"),
        ('{"colour": "grey"}', "colour"),
        ('{"max_patches": 0}', "max_patches"),
        ('{"grids_per_image": 2.0}', "grids_per_image"),
        ('{"mean_rgb": [1, 2]}', "mean_rgb"),
        ('{"resample_probability": 1.5}', "resample_probability"),
        ('{"min_pixels": 500000}', "min_pixels"),
        ('{"mode": "pairs", "pairs_per_batch": 300}', "pairs_per_batch|300"),
        ("[1, 2]", "object"),
    ],
)
def test_config_json_errors_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        PatchPairConfig.from_json(text)


# ---------------------------------------------------------------------------
# Grid-mode batches


def test_grid_batches_are_bounded_labelled_and_carry_grids_over(photo_folder):
    config = PatchPairConfig()
    source = open_source(str(photo_folder))
    assembler = BatchAssembler(source, config, np.random.default_rng(0))
    out = new_buffer(config)
    previous_size = None
    visits = []  # (image index, number of grids) per run of consecutive grids from one image
    label_counts = np.zeros(8, dtype=np.int64)
    for _ in range(8):
        out.fill(np.nan)
        info = assembler.fill(out)
        assert info.n_patches < 512
        assert info.n_pairs <= config.max_pairs
        assert np.isfinite(out[: info.n_patches]).all() and np.isnan(out[info.n_patches :]).all()
        assert info.select1.dtype == info.select2.dtype == info.labels.dtype == np.int64
        assert info.image_indices.shape == (info.n_patches,) and info.corners.shape == (
            info.n_patches,
            2,
        )
        # Pairs join patches of one image, at the distance their label says.
        assert np.array_equal(info.image_indices[info.select1], info.image_indices[info.select2])
        displacement = info.corners[info.select2] - info.corners[info.select1]  # (dy, dx)
        expected = OFFSETS[info.labels][:, ::-1] * config.geometry.step
        assert np.abs(displacement - expected).max() <= 2 * config.geometry.jitter
        pairs = set(zip(info.select1.tolist(), info.select2.tolist(), info.labels.tolist()))
        assert pairs == {(b, a, 7 - label) for a, b, label in pairs}
        label_counts += np.bincount(info.labels, minlength=8)

        grids = pair_components(info)
        assert sum(map(len, grids)) == info.n_patches  # no patch outside a pair
        if previous_size is not None:
            # The first grid did not fit in the previous batch.
            assert previous_size + len(grids[0]) >= 512
        previous_size = info.n_patches
        for grid in grids:
            image_index = info.image_indices[grid[0]]
            if visits and visits[-1][0] == image_index:
                visits[-1][1] += 1
            else:
                visits.append([image_index, 1])
    # Every visit of an image contributes grids_per_image grids (the last may be unfinished).
    assert all(count % config.grids_per_image == 0 for _, count in visits[:-1])
    fractions = label_counts / label_counts.sum()
    assert np.array_equal(label_counts, label_counts[::-1])
    assert np.all(fractions > 0.08) and np.all(fractions < 0.17)


@pytest.mark.parametrize(
    "max_patches, batch_sizes", [(12, [8, 8, 8]), (13, [12, 12, 12]), (17, [16, 16, 16])]
)
def test_batch_closes_when_the_next_grid_would_reach_max_patches(
    tmp_path, max_patches, batch_sizes
):
    # A 383 x 383 image kept at its size, without jitter, always gives a 2 x 2 grid:
    # (383 + 48 - x0) // 144 == 2 for every origin x0 in [0, 143].
    save_photo(tmp_path / "square.png", skimage.data.astronaut()[:383, :383])
    config = PatchPairConfig(
        geometry=PatchGeometry(jitter=0),
        min_pixels=383 * 383,
        max_pixels=383 * 383,
        max_patches=max_patches,
    )
    assembler = BatchAssembler(open_source(str(tmp_path)), config, np.random.default_rng(0))
    out = new_buffer(config)
    infos = [assembler.fill(out) for _ in batch_sizes]
    assert [info.n_patches for info in infos] == batch_sizes
    assert all(info.n_pairs == 12 * info.n_patches // 4 for info in infos)


def test_images_are_visited_in_a_new_permutation_each_pass(photo_folder):
    source = open_source(str(photo_folder))
    config = PatchPairConfig(mode="pairs", pairs_per_image=1, pairs_per_batch=5, max_patches=10)
    assembler = BatchAssembler(source, config, np.random.default_rng(1))
    out = new_buffer(config)
    passes = [assembler.fill(out).image_indices[::2].tolist() for _ in range(6)]
    for order in passes:
        assert sorted(order) == list(range(len(source)))
    assert len({tuple(order) for order in passes}) > 1


def test_batches_are_deterministic_per_seed(photo_folder):
    source = open_source(str(photo_folder))
    outputs = []
    for seed in (5, 5, 6):
        assembler = BatchAssembler(source, PatchPairConfig(), np.random.default_rng(seed))
        out = new_buffer()
        infos = [assembler.fill(out).n_patches for _ in range(2)]
        outputs.append((infos, out.copy(), assembler.fill(out).labels))
    assert outputs[0][0] == outputs[1][0]
    assert np.array_equal(outputs[0][1], outputs[1][1]) and np.array_equal(
        outputs[0][2], outputs[1][2]
    )
    assert not np.array_equal(outputs[0][1], outputs[2][1])


def test_pair_mode_fills_exact_batches(photo_folder):
    config = PatchPairConfig(mode="pairs", colour="projection")
    assembler = BatchAssembler(open_source(str(photo_folder)), config, np.random.default_rng(2))
    out = new_buffer(config)
    counts = np.zeros(8, dtype=np.int64)
    for _ in range(16):
        info = assembler.fill(out)
        assert info.n_patches == 256 and info.n_pairs == 128
        assert np.array_equal(info.select1, np.arange(0, 256, 2))
        assert np.array_equal(info.select2, np.arange(1, 256, 2))
        displacement = info.corners[info.select2] - info.corners[info.select1]
        assert np.abs(displacement - OFFSETS[info.labels][:, ::-1] * 144).max() <= 14
        counts += np.bincount(info.labels, minlength=8)
        # Projection mode ships mean-subtracted RGB.
        assert out[:256].min() >= -124 and out[:256].max() <= 256 - 103.94
    assert np.all(np.abs(counts / counts.sum() - 1 / 8) < 0.025)


# ---------------------------------------------------------------------------
# Bad images


@pytest.fixture
def bad_and_good_list(tmp_path, photo_folder):
    """A list file of two good photos and every kind of bad input; returns (path, bad names)."""
    jpeg = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(jpeg, "JPEG")
    jpeg = jpeg.getvalue()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "corrupt.jpg").write_bytes(jpeg[:300] + os.urandom(2000))
    (tmp_path / "text.jpg").write_text("not an image\n" * 50)
    (tmp_path / "folder.jpg").mkdir()
    os.symlink(tmp_path / "missing.jpg", tmp_path / "dangling.jpg")
    save_photo(tmp_path / "thin.png", np.full((20, 2000, 3), 128, dtype=np.uint8))
    bad = [
        "empty.jpg",
        "truncated.jpg",
        "corrupt.jpg",
        "text.jpg",
        "folder.jpg",
        "dangling.jpg",
        "thin.png",
    ]
    good = [str(photo_folder / "chelsea.png"), str(photo_folder / "coffee.jpg")]
    list_path = tmp_path / "list.txt"
    list_path.write_text("\n".join(bad + good) + "\n")
    return list_path, [str(tmp_path / name) for name in bad]


def test_bad_images_are_skipped_with_one_warning_each(bad_and_good_list):
    list_path, bad_names = bad_and_good_list
    assembler = BatchAssembler(
        open_source(str(list_path)), PatchPairConfig(), np.random.default_rng(3)
    )
    out = new_buffer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = [assembler.fill(out) for _ in range(6)]
    messages = [
        str(warning.message)
        for warning in caught
        if issubclass(warning.category, SkippedImageWarning)
    ]
    assert len(messages) == len(bad_names)
    for name in bad_names:
        assert sum(name in message for message in messages) == 1
    assert sorted(assembler.skipped) == sorted(bad_names)
    assert "2000x20 pixels is smaller than one 96x96 patch" in assembler.skipped[bad_names[-1]]
    assert "empty" in assembler.skipped[bad_names[0]]
    used_images = {int(index) for info in infos for index in np.unique(info.image_indices)}
    assert used_images == {7, 8}


def test_source_without_usable_image_raises_naming_it(bad_and_good_list, tmp_path):
    list_path, bad_names = bad_and_good_list
    only_bad = tmp_path / "only_bad.txt"
    only_bad.write_text("\n".join(bad_names) + "\n")
    assembler = BatchAssembler(
        open_source(str(only_bad)), PatchPairConfig(), np.random.default_rng(4)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        with pytest.raises(ValueError, match="no usable image") as raised:
            assembler.fill(new_buffer())
    assert str(only_bad) in str(raised.value)
    assert len(assembler.skipped) == len(bad_names)


def test_fill_checks_the_buffer(photo_folder):
    assembler = BatchAssembler(
        open_source(str(photo_folder)), PatchPairConfig(), np.random.default_rng(0)
    )
    with pytest.raises(ValueError, match="out_data"):
        assembler.fill(np.zeros((511, 3, PATCH, PATCH), dtype=np.float32)[:100])
    with pytest.raises(ValueError, match="out_data"):
        assembler.fill(np.zeros((512, 3, PATCH, PATCH), dtype=np.float64))
