"""Tests of the example plugin: registration through segcft and each component's protocol.

Run after ``pip install -e plugins/segcft-example``: ``pytest plugins/segcft-example/tests``.
"""

from __future__ import annotations

import pytest
import torch

from segcft.plugins import load_registry
from segcft.protocols import Dataset, Generator, Phantom, Segmentor

import segcft_example


@pytest.fixture(scope="module")
def registry():
    _, reg = load_registry(extra_plugins=[("example-under-test", segcft_example)], entry_points=False)
    return reg


@pytest.fixture(scope="module")
def dataset(registry):
    entry = registry.get("dataset", "example-blobs")
    return entry.load()(entry.config(train_size=16, val_size=4, test_size=4), "train")


def test_registers_every_component(registry):
    assert registry.get("dataset", "example-blobs").dims == (2,)
    assert registry.get("generator", "example-cvae").plugin == "example-under-test"
    assert registry.get("segmentor", "example-convnet").config.__name__ == "ConvSegmentorConfig"


def test_dataset_contract_and_exact_counterfactual(dataset):
    assert isinstance(dataset, Dataset) and isinstance(dataset, Phantom)
    sample = dataset[3]
    assert sample["image"].shape == (1, 32, 32) and sample["mask"].dtype == torch.int64
    assert -1 <= sample["image"].min() and sample["image"].max() <= 1
    physical = dataset.info.denormalise(sample["parents"].double())
    mask_area = sample["mask"].sum().item() * dataset.info.voxel_size
    assert abs(mask_area - physical[1].item()) < 0.25 * physical[1].item()
    bigger = dataset.parents[3:4].clone()
    bigger[0, 1] *= 2
    _, mask_cf, _ = dataset.render(dataset.exogenous[3:4], bigger)
    assert mask_cf.sum() > 1.6 * sample["mask"].sum()
    assert (mask_cf[0] >= sample["mask"]).all()  # same centre: the disc only grows


def test_generator_protocol_and_null_intervention(registry, dataset):
    torch.manual_seed(0)
    entry = registry.get("generator", "example-cvae")
    gen = entry.load()(entry.config(), dataset.info)
    assert isinstance(gen, Generator)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    out = gen.elbo(batch["image"], batch["parents"])
    assert out["nelbo"].shape == (4,) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in gen.parameters())
    with torch.no_grad():
        x_cf, var = gen.counterfactual(batch["image"], batch["parents"], batch["parents"], particles=2)
    assert var is not None and var.shape == x_cf.shape
    assert torch.allclose(x_cf, batch["image"], atol=1e-4)  # composition: a null intervention is the identity
    assert gen.sample(batch["parents"]).shape == batch["image"].shape


def test_segmentor_protocol(registry, dataset):
    entry = registry.get("segmentor", "example-convnet")
    seg = entry.load()(entry.config(), dataset.info)
    assert isinstance(seg, Segmentor) and seg.classes == ("background", "blob")
    assert seg(dataset[0]["image"][None]).shape == (1, 2, 32, 32)
