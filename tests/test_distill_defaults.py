"""The published hyper-parameters of every method, written out literally (issue 16, item 1).

Each value is asserted where it is defined (the constructor's default), where users meet it (the
command-line default) and in a method built from default flags, so changing one of them anywhere
(e.g. the teacher head's EMA momentum 0.999 -> 0.99) fails here.
"""
import inspect

from distill import train_imagenet
from distill.methods import build_method, default_method_args
from distill.methods.ab import AB
from distill.methods.at import AT
from distill.methods.cc import CC
from distill.methods.cocord import CoCoRD
from distill.methods.crd import CRD
from distill.methods.fitnet import FitNet
from distill.methods.ft import FT
from distill.methods.pkt import PKT
from distill.methods.rkd import RKD
from distill.methods.sp import SP
from distill.methods.supervised import Supervised
from distill.methods.vid import VID
from test_methods import LABELS, tiny_resnet

# CoCoRD (the authors' released settings; K = 16384 is our ImageNet choice)
COCORD = {"proj_dim": 2048, "proj_hidden_dim": 2048, "pred_dim": 512, "queue_size": 16384, "tau": 0.1,
          "teacher_head_momentum": 0.999, "slow_momentum": 0.9, "w_ce": 1.0, "w_contrast": 1.0, "w_pred": 4.0,
          "w_kd": 0.0, "kd_T": 4.0}
# CRD (RepDistiller: feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5, -r 1 -b 0.8)
CRD_DEFAULTS = {"feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "momentum": 0.5, "w_ce": 1.0, "w_crd": 0.8,
                "w_kd": 0.0, "kd_T": 4.0}
# the feature-based baselines (RepDistiller's scripts/run_cifar_distill.sh -b values, -r 1 -a 0; train_student.py
# --hint_layer 2 --feat_dim 128 --init_epochs 30; distiller_zoo/RKD.py w_d 25 w_a 50)
FEATURE = {FitNet: {"w_fitnet": 100.0, "hint_layer": 2}, AT: {"w_at": 1000.0}, SP: {"w_sp": 3000.0},
           CC: {"w_cc": 0.02, "feat_dim": 128}, VID: {"w_vid": 1.0},
           RKD: {"w_rkd": 1.0, "w_dist": 25.0, "w_angle": 50.0},
           PKT: {"w_pkt": 30000.0}, AB: {"w_ab": 1.0, "init_epochs": 30}, FT: {"w_ft": 200.0, "init_epochs": 30}}
# command-line flag -> default
FLAGS = {"kd_T": 4.0, "tau": 0.1, "queue_size": 16384, "proj_dim": 2048, "proj_hidden_dim": 2048, "pred_dim": 512,
         "teacher_head_momentum": 0.999, "slow_momentum": 0.9, "w_contrast": 1.0, "w_pred": 4.0,
         "crd_feat_dim": 128, "crd_nce_k": 16384, "crd_nce_t": 0.07, "crd_momentum": 0.5, "w_crd": 0.8,
         "w_fitnet": 100.0, "hint_layer": 2, "w_at": 1000.0, "w_sp": 3000.0, "w_cc": 0.02, "cc_feat_dim": 128,
         "w_vid": 1.0, "w_rkd": 1.0, "rkd_w_dist": 25.0, "rkd_w_angle": 50.0, "w_pkt": 30000.0, "w_ab": 1.0,
         "w_ft": 200.0, "init_epochs": 30, "w_ce": None, "w_kd": None}
# loss weights each --method uses when --w-ce / --w-kd are not given (kd: RepDistiller's -r 0.1 -a 0.9)
WEIGHTS = {"supervised": (1.0, 0.0), "kd": (0.1, 0.9), "crd": (1.0, 0.0), "crd+kd": (1.0, 1.0),
           "cocord": (1.0, 0.0), "cocord+kd": (1.0, 1.0),
           **{name: (1.0, 0.0) for name in ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft")}}


def defaults(cls):
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_constructor_defaults_are_the_published_values():
    got = defaults(CoCoRD)
    assert {k: got[k] for k in COCORD} == COCORD
    got = defaults(CRD)
    assert {k: got[k] for k in CRD_DEFAULTS} == CRD_DEFAULTS
    assert defaults(Supervised)["w_ce"] == 1.0
    for cls, published in FEATURE.items():
        got = defaults(cls)
        assert {k: got[k] for k in published} == published, cls.__name__
        assert (got["w_ce"], got["w_kd"], got["kd_T"]) == (1.0, 0.0, 4.0), cls.__name__


def test_command_line_defaults_are_the_same_values():
    assert vars(default_method_args()) == FLAGS
    args = train_imagenet.parse_args(["DATA"])
    assert {k: getattr(args, k) for k in FLAGS} == FLAGS
    assert all(type(getattr(args, k)) is type(v) for k, v in FLAGS.items() if v is not None)


def test_methods_built_from_default_flags_carry_the_published_values():
    for name, (w_ce, w_kd) in WEIGHTS.items():
        teacher = None if name == "supervised" else tiny_resnet(12, seed=1)
        m = build_method(name, default_method_args(), tiny_resnet(), teacher, len(LABELS), LABELS, image_size=16,
                         drives_init_stage=True)
        assert (m.hparams["w_ce"], m.hparams["w_kd"]) == (w_ce, w_kd), name
        assert m.w_ce == w_ce, name
        if name != "supervised":
            assert getattr(m, "w_kd") == w_kd, name
        if name.startswith("cocord"):
            assert (m.tau, m.m_t, m.m_slow, m.w_contrast, m.w_pred, m.kd_T) == (0.1, 0.999, 0.9, 1.0, 4.0, 4.0)
            assert tuple(m.queue.shape) == (16384, 2048)
            assert m.proj_s[0].out_features == 2048 and m.predictor[0].out_features == 512
        if name.startswith("crd"):
            assert (m.nce_k, m.nce_t, m.momentum, m.w_crd, m.kd_T) == (16384, 0.07, 0.5, 0.8, 4.0)
            assert m.memory_s.shape[1] == 128
        if name == "kd":
            assert m.T == 4.0
        if name in ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft"):
            published = FEATURE[type(m)]
            assert m.w_feat == published[f"w_{name}"] and m.kd_T == 4.0, name
        if name in ("ab", "ft"):
            assert m.init_epochs == 30 and m.in_init_stage, name
    assert build_method("fitnet", default_method_args(), tiny_resnet(), tiny_resnet(12, seed=1), len(LABELS), LABELS,
                        image_size=16).hint_layer == 2
    m = build_method("rkd", default_method_args(), tiny_resnet(), tiny_resnet(12, seed=1), len(LABELS), LABELS)
    assert (m.relation.w_dist, m.relation.w_angle) == (25.0, 50.0)
    m = build_method("cc", default_method_args(), tiny_resnet(), tiny_resnet(12, seed=1), len(LABELS), LABELS)
    assert m.correlation.embed_s.out_features == 128

