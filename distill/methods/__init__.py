"""All distillation methods behind one interface (I2): `add_method_args`, `build_method`, `METHODS`.

Every hyper-parameter flag lives here, with its default; `build_method` turns the parsed flags into a
Method (see methods/base.py for the interface). Weight flags left at None take the method's own
default (table in `METHOD_DEFAULTS`), so `kd` and `cocord+kd` can keep their published weights.
"""
import argparse

from distill.methods.base import Method
from distill.methods.crd import CRD
from distill.methods.kd import KD
from distill.methods.supervised import Supervised

METHODS = ("supervised", "kd", "crd", "crd+kd", "cocord", "cocord+kd")

# weights used when --w-ce / --w-kd are not given (kd: RepDistiller's KD setting, -r 0.1 -a 0.9;
# crd/crd+kd: CRD's -r 1 -b 0.8 [-a 1]; cocord+kd: 1 / 1)
METHOD_DEFAULTS = {
    "supervised": {"w_ce": 1.0, "w_kd": 0.0},
    "kd": {"w_ce": 0.1, "w_kd": 0.9},
    "crd": {"w_ce": 1.0, "w_kd": 0.0},
    "crd+kd": {"w_ce": 1.0, "w_kd": 1.0},
    "cocord": {"w_ce": 1.0, "w_kd": 0.0},
    "cocord+kd": {"w_ce": 1.0, "w_kd": 1.0},
}


def add_method_args(parser):
    """Add every method hyper-parameter flag (with its default) to an argparse parser."""
    g = parser.add_argument_group("distillation method hyper-parameters")
    # loss weights
    g.add_argument("--w-ce", type=float, default=None,
                   help="weight of the cross-entropy term (default: 0.1 for kd, 1 otherwise)")
    g.add_argument("--w-kd", type=float, default=None,
                   help="weight of Hinton's KD term (default: 0.9 for kd, 1 for crd+kd / cocord+kd, 0 otherwise)")
    g.add_argument("--kd-T", type=float, default=4.0, help="KD temperature (default: 4)")
    # CoCoRD
    g.add_argument("--tau", type=float, default=0.1, help="CoCoRD InfoNCE temperature (default: 0.1)")
    g.add_argument("--queue-size", type=int, default=16384,
                   help="CoCoRD queue length K of teacher keys (default: 16384, our ImageNet choice; "
                        "the authors use 2048 on CIFAR)")
    g.add_argument("--proj-dim", type=int, default=2048, help="CoCoRD projection output width (default: 2048)")
    g.add_argument("--proj-hidden-dim", type=int, default=2048,
                   help="CoCoRD projection hidden width (default: 2048)")
    g.add_argument("--pred-dim", type=int, default=512, help="CoCoRD predictor hidden width (default: 512)")
    g.add_argument("--teacher-head-momentum", type=float, default=0.999,
                   help="EMA momentum of the teacher projection head (default: 0.999)")
    g.add_argument("--slow-momentum", type=float, default=0.9,
                   help="EMA momentum of the slow-moving student (default: 0.9)")
    g.add_argument("--w-contrast", type=float, default=1.0, help="CoCoRD contrastive weight (default: 1)")
    g.add_argument("--w-pred", type=float, default=4.0, help="CoCoRD prediction-loss weight (default: 4)")
    # CRD
    g.add_argument("--crd-feat-dim", type=int, default=128, help="CRD embedding width (default: 128)")
    g.add_argument("--crd-nce-k", type=int, default=16384, help="CRD negatives per sample (default: 16384)")
    g.add_argument("--crd-nce-t", type=float, default=0.07, help="CRD temperature (default: 0.07)")
    g.add_argument("--crd-momentum", type=float, default=0.5, help="CRD memory-bank momentum (default: 0.5)")
    g.add_argument("--w-crd", type=float, default=0.8, help="CRD loss weight (default: 0.8)")
    return parser


def default_method_args(**overrides):
    """The flags' defaults as a Namespace (for tests and the benchmark), with `overrides` applied."""
    args = add_method_args(argparse.ArgumentParser(add_help=False)).parse_args([])
    for k, v in overrides.items():
        if not hasattr(args, k):
            raise AttributeError(f"no method flag named '{k}'")
        setattr(args, k, v)
    return args


def _resolve(name, args):
    """Validated hyper-parameters for `name` from the Namespace (None weights -> method defaults)."""
    hp = {k: getattr(args, k) for k in vars(default_method_args())}
    for k in ("w_ce", "w_kd"):
        if hp[k] is None:
            hp[k] = METHOD_DEFAULTS[name][k]

    def need(cond, flag, what):
        if not cond:
            raise ValueError(f"--{flag} = {hp[flag.replace('-', '_')]!r} is invalid: {what}")

    for w in ("w-ce", "w-kd", "w-contrast", "w-pred", "w-crd"):
        need(hp[w.replace("-", "_")] >= 0, w, "loss weights must be >= 0")
    for flag in ("kd-T", "tau", "crd-nce-t"):
        need(hp[flag.replace("-", "_")] > 0, flag, "temperatures must be > 0")
    for flag in ("queue-size", "proj-dim", "proj-hidden-dim", "pred-dim", "crd-feat-dim", "crd-nce-k"):
        need(hp[flag.replace("-", "_")] >= 1, flag, "sizes must be >= 1")
    for flag in ("teacher-head-momentum", "slow-momentum", "crd-momentum"):
        need(0 <= hp[flag.replace("-", "_")] < 1, flag, "momenta must lie in [0, 1)")
    if name.endswith("+kd"):
        need(hp["w_kd"] > 0, "w-kd", f"--method {name} needs a positive KD weight")
    return hp


def build_method(name, args, student, teacher, num_samples, sample_labels, gather=None) -> Method:
    """Build method `name` (one of METHODS) from parsed flags; see methods/base.py for the interface.

    `teacher` is None for `supervised` (and required otherwise); `sample_labels` [num_samples] holds
    every training sample's class (CRD draws its negatives from other classes); `gather(t)` returns
    torch.cat of `t` over all ranks (None in a single process). The resolved hyper-parameters are
    available as `method.hparams`. The student must already hold its initial weights: CoCoRD's slow
    student is a copy of it taken here (on resume, `load_state_dict` restores that copy).
    """
    if name not in METHODS:
        raise ValueError(f"unknown --method '{name}'; choose one of {', '.join(METHODS)}")
    hp = _resolve(name, args)
    if name == "supervised":
        if teacher is not None:
            raise ValueError("--method supervised trains without a teacher; drop --teacher-arch/--teacher-weights")
    else:
        if teacher is None:
            raise ValueError(f"--method {name} needs a teacher (--teacher-arch and --teacher-weights)")
        if name in ("kd", "crd+kd", "cocord+kd") and teacher.fc.out_features != student.fc.out_features:
            raise ValueError(f"--method {name}: the teacher predicts {teacher.fc.out_features} classes but the "
                             f"student {student.fc.out_features}; KD needs the same classes")
    if name == "supervised":
        method = Supervised(student, w_ce=hp["w_ce"])
    elif name == "kd":
        method = KD(student, teacher, w_ce=hp["w_ce"], w_kd=hp["w_kd"], T=hp["kd_T"])
    elif name in ("crd", "crd+kd"):
        if sample_labels is None or len(sample_labels) != num_samples:
            raise ValueError(f"--method {name} needs the class of each of the {num_samples} training samples "
                             f"(sample_labels), got {None if sample_labels is None else len(sample_labels)}")
        method = CRD(student, teacher, sample_labels, feat_dim=hp["crd_feat_dim"], nce_k=hp["crd_nce_k"],
                     nce_t=hp["crd_nce_t"], momentum=hp["crd_momentum"], w_ce=hp["w_ce"], w_crd=hp["w_crd"],
                     w_kd=hp["w_kd"], kd_T=hp["kd_T"], gather=gather)
    else:
        from distill.cocord import CoCoRD  # here, not at the top: distill.cocord imports distill.methods.base
        method = CoCoRD(student, teacher, proj_dim=hp["proj_dim"], proj_hidden_dim=hp["proj_hidden_dim"],
                        pred_dim=hp["pred_dim"], queue_size=hp["queue_size"], tau=hp["tau"],
                        teacher_head_momentum=hp["teacher_head_momentum"], slow_momentum=hp["slow_momentum"],
                        w_ce=hp["w_ce"], w_contrast=hp["w_contrast"], w_pred=hp["w_pred"], w_kd=hp["w_kd"],
                        kd_T=hp["kd_T"], gather=gather)
    method.hparams = hp
    return method
