"""configs/distill/cifar_pairs.yaml: the paper's 13 CIFAR-100 pairs and RepDistiller's recipe, as data.

The pairs are checked against the paper's table (../shared/reference/paper_tables.json, skipped when absent)
and the zoo, the recipe values are written out here, every flag name must be a real flag, and (slow) every
pair builds and trains a step with every method."""
import copy
import json

import pytest
import torch
import yaml

from conftest import REPO, shared_path
from distill import train_imagenet
from distill.methods import METHODS, build_method, default_method_args
from distill.models import CIFAR_ARCHS, build_model

PAIRS_FILE = REPO / "configs" / "distill" / "cifar_pairs.yaml"
ROWS = {"supervised": "Student", "kd": "KD", "fitnet": "FitNet", "at": "AT", "sp": "SP", "cc": "CC", "vid": "VID",
        "rkd": "RKD", "pkt": "PKT", "ab": "AB", "ft": "FT", "crd": "CRD", "crd+kd": "CRD+KD", "cocord": "CoCoRD",
        "cocord+kd": "CoCoRD+KD"}


@pytest.fixture(scope="module")
def table():
    with open(PAIRS_FILE, encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_recipe_is_repdistillers(table):
    assert table["recipe"] == {"epochs": 240, "batch-size": 64, "lr": 0.05, "momentum": 0.9, "wd": 0.0005,
                               "schedule": [150, 180, 210]}
    assert table["small_student_lr"] == {"lr": 0.01, "students": ["MobileNetV2", "ShuffleV1", "ShuffleV2"]}
    flags = table["method_flags"]
    assert flags["cocord"]["queue-size"] == 2048 and flags["cocord"]["w-pred"] == 4.0
    assert (flags["kd"]["w-ce"], flags["kd"]["w-kd"], flags["kd"]["kd-T"]) == (0.1, 0.9, 4.0)
    assert flags["crd+kd"]["w-kd"] == flags["cocord+kd"]["w-kd"] == 1.0
    assert (flags["crd"]["crd-nce-k"], flags["crd"]["crd-nce-t"], flags["crd"]["w-crd"]) == (16384, 0.07, 0.8)


def test_every_name_is_a_zoo_model_a_method_or_a_flag(table):
    for pair in table["pairs"]:
        assert pair["teacher"] in CIFAR_ARCHS and pair["student"] in CIFAR_ARCHS, pair
        assert pair["family"] in ("same", "different"), pair
    assert table["small_student_lr"]["students"][0] in CIFAR_ARCHS
    assert set(table["methods"]) == set(METHODS) - {"supervised"}
    assert table["paper_rows"] == ROWS
    known = vars(default_method_args())
    for method, flags in table["method_flags"].items():
        assert method in METHODS
        for flag in flags:
            assert flag.replace("-", "_") in known, (method, flag)
    options = train_imagenet.build_parser()._option_string_actions
    for flag in table["recipe"]:
        assert f"--{flag}" in options, flag


def test_pairs_are_the_papers_thirteen_in_its_order(table):
    with open(shared_path("reference", "paper_tables.json"), encoding="utf-8") as f:
        paper = json.load(f)["cifar100_top1"]
    same, different = paper["same_family"], paper["different_family"]
    assert [p["paper_key"] for p in table["pairs"]] == same["pairs"] + different["pairs"]
    for p in table["pairs"]:
        assert p["paper_key"] == f"{p['teacher']}->{p['student']}"
        assert p["family"] == ("same" if p["paper_key"] in same["pairs"] else "different")
    rows = set(same["rows"]) & set(different["rows"])
    assert set(ROWS.values()) <= rows  # every method has its row in both tables


@pytest.mark.slow
def test_every_pair_builds_and_steps_with_every_method(table):
    torch.set_num_threads(1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y, index = torch.tensor([0, 1]), torch.tensor([0, 1])
    args = default_method_args(queue_size=8, crd_nce_k=4, proj_dim=16, proj_hidden_dim=16, pred_dim=8)
    for pair in table["pairs"]:
        torch.manual_seed(0)
        teacher, student = build_model(pair["teacher"], 10), build_model(pair["student"], 10)
        for name in METHODS:
            s = copy.deepcopy(student)
            m = build_method(name, args, s, None if name == "supervised" else teacher, 20,
                             torch.arange(20) % 10, drives_init_stage=True).train()
            _, losses = m([x] * m.num_views, y, index)
            total = sum(losses.values())
            assert torch.isfinite(total), (pair, name, losses)
            total.backward()
