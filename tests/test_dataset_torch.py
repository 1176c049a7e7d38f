"""`CTToTorch` and `collate_ct` on a tiny built M3Dsynth folder: map-style, streamed, and in a DataLoader."""

import datasets
import numpy as np
import pytest
import torch
from test_dataset_builder import PHANTOMS
from torch.utils.data import DataLoader

from m3d.build import build_dataset
from m3d.dataset_builder import CTToTorch, ScanResolver, collate_ct, example_mask
from m3d.dataset_builder.features import stored_volume
from m3d.dataset_builder.torch_format import TENSOR_KEYS


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_pipelines_dir):
    """pix2pix only (the other generators add time, not cases), quality check off, one scan per shard."""
    out = tmp_path_factory.mktemp("build") / "m3dsynth"
    build_dataset(
        out,
        pipelines_dir=tiny_pipelines_dir,
        generators=["pix2pix"],
        phantoms=2,
        **PHANTOMS,
        num_inference_steps=1,
        scans_per_shard=1,
        quality=None,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def split(folder, tmp_path_factory):
    """The largest split, with its name; it holds pristine scans and fakes stored as boxes over them."""
    loaded = datasets.load_dataset(str(folder), cache_dir=str(tmp_path_factory.mktemp("cache")))
    name = max(loaded, key=lambda split_name: len(loaded[split_name]))
    assert set(loaded[name]["label"]) == {0, 1} and any(loaded[name]["base_img_id"])
    return name, loaded[name]


def assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key
        else:
            assert actual[key] == value, key


def test_whole_scans_equal_m3d_reader(split):
    _, rows = split
    scans = ScanResolver(rows)
    formatted = rows.with_transform(CTToTorch(rows))
    for index, row in enumerate(rows):
        example = formatted[index]
        volume, mask = scans.volume(row), example_mask(row)
        assert example["volume"].dtype == torch.int16 and example["mask"].dtype == torch.bool
        assert example["volume"].shape == example["mask"].shape == tuple(row["scan_shape_zyx"])
        assert np.array_equal(example["volume"].numpy(), volume.hu)
        assert np.array_equal(example["mask"].numpy(), mask)
        assert int(example["mask"].sum()) == int(mask.sum()) and bool(mask.any()) == (row["label"] == 1)
        assert example["spacing_mm"].tolist() == list(volume.spacing_mm)
        assert example["origin_mm"].tolist() == list(volume.origin_mm)
        assert example["direction"].shape == (3, 3) and np.array_equal(example["direction"].numpy(), volume.direction)
        assert example["spacing_mm"].tolist() == pytest.approx(row["spacing_mm"])  # the column it replaces
        assert {key: value for key, value in example.items() if key not in TENSOR_KEYS} == {
            key: value for key, value in row.items() if key not in TENSOR_KEYS
        }
    batch = formatted[:3]  # a slice: lists, one tensor per example
    assert len(batch["volume"]) == 3 and torch.equal(batch["volume"][2], formatted[2]["volume"])


def test_without_bases_each_example_as_stored(split):
    _, rows = split
    scans = ScanResolver(rows)
    formatted = rows.with_transform(CTToTorch())
    for index, row in enumerate(rows):
        example, stored = formatted[index], stored_volume(row)
        assert np.array_equal(example["volume"].numpy(), stored.hu) and example["mask"].shape == stored.shape
        assert example["origin_mm"].numpy() == pytest.approx(stored.origin_mm)
        if row["base_img_id"]:  # a fake's changed box, placed in its scan's world at box_start_zyx
            start = row["box_start_zyx"]
            box = tuple(slice(a, a + n) for a, n in zip(start, stored.shape))
            assert np.array_equal(example["mask"].numpy(), example_mask(row)[box]) and example["mask"].any()
            assert example["origin_mm"].numpy() == pytest.approx(scans.volume(row).voxel_to_world(start))
        else:
            assert example["volume"].shape == tuple(row["scan_shape_zyx"]) and not example["mask"].any()


def test_streaming_gives_the_same_tensors(split, folder, tmp_path):
    name, rows = split
    stream = datasets.load_dataset(str(folder), split=name, streaming=True, cache_dir=str(tmp_path / "cache"))
    pristine = datasets.load_dataset(str(folder), "pristine", split=name, cache_dir=str(tmp_path / "cache"))
    whole_scans, as_stored = rows.with_transform(CTToTorch(rows)), rows.with_transform(CTToTorch())
    for transform, batched, formatted in (
        (CTToTorch(), False, as_stored),
        (CTToTorch(pristine), False, whole_scans),
        (CTToTorch(pristine), True, whole_scans),
    ):
        streamed = list(stream.map(transform, batched=batched, batch_size=3))
        assert [example["img_id"] for example in streamed] == list(rows["img_id"])
        for index, example in enumerate(streamed):
            assert_same(example, formatted[index])


def test_dataloader_with_two_workers(split, folder, tmp_path):
    name, rows = split
    formatted = rows.with_transform(CTToTorch(rows))
    loader = DataLoader(formatted, batch_size=3, num_workers=2, collate_fn=collate_ct)
    first = next(iter(loader))
    assert_same(first, collate_ct([formatted[index] for index in range(3)]))
    assert first["volume"].shape == (3, *rows[0]["scan_shape_zyx"])
    assert first["label"].tolist() == list(rows["label"])[:3]
    assert first["direction"].shape == (3, 3, 3) and first["img_id"] == list(rows["img_id"])[:3]

    as_stored = rows.with_transform(CTToTorch())
    fake = list(rows["label"]).index(1)
    mixed = collate_ct([as_stored[0], as_stored[fake]])  # a whole scan and a fake's box: kept as a list
    assert isinstance(mixed["volume"], list) and torch.equal(mixed["volume"][1], as_stored[fake]["volume"])
    assert mixed["malignancy_after"] == [None, None] and mixed["spacing_mm"].shape == (2, 3)

    stream = datasets.load_dataset(str(folder), split=name, streaming=True, cache_dir=str(tmp_path / "cache"))
    streamed = DataLoader(stream.map(CTToTorch()), batch_size=2, num_workers=2, collate_fn=collate_ct)
    by_id = {img_id: index for index, img_id in enumerate(rows["img_id"])}
    seen = []
    for batch in streamed:  # the workers share the shards: any order, every example once
        for position, img_id in enumerate(batch["img_id"]):
            seen.append(img_id)
            volume = batch["volume"][position]
            assert torch.equal(volume, as_stored[by_id[img_id]]["volume"])
    assert sorted(seen) == sorted(by_id)
