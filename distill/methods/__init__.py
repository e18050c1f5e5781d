"""All distillation methods behind one interface (I2): the `METHODS` table, `add_method_args`,
`build_method`.

`METHODS` maps each `--method` name to its row: the Method class (whose `from_hparams` builds it),
whether it needs a teacher, whether it has a KD term on the teacher's logits, the loss weights that
differ from the class's constructor defaults, and a one-line description. The CLI, the pipeline and
the docs read it. A new method is one module with a Method subclass plus one row here (and rows in
`FLAGS` for new hyper-parameters).

Every hyper-parameter flag takes its default from one constructor's signature (`FLAGS`), so the
published values live once, in the method's own module. `--w-ce` / `--w-kd` left at None take the
method's default: its row's `weights`, else its constructor's default, else 0 (no such term).
"""
import argparse
import inspect
from dataclasses import dataclass, field

from distill.methods.ab import AB
from distill.methods.at import AT
from distill.methods.base import Method
from distill.methods.cc import CC
from distill.methods.cocord import CoCoRD
from distill.methods.crd import CRD
from distill.methods.feature_method import TwoStageMethod
from distill.methods.fitnet import FitNet
from distill.methods.ft import FT
from distill.methods.kd import KD
from distill.methods.pkt import PKT
from distill.methods.rkd import RKD
from distill.methods.sp import SP
from distill.methods.supervised import Supervised
from distill.methods.vid import VID
from distill.models import ZooModel, num_classes_of


@dataclass(frozen=True)
class MethodEntry:
    cls: type                 # a Method subclass; cls.from_hparams(...) builds it
    needs_teacher: bool       # trains against a frozen teacher (--teacher-arch / --teacher-weights)
    kd_term: bool             # compares teacher and student logits, so both must predict the same classes
    description: str
    weights: dict = field(default_factory=dict)  # w_ce / w_kd that differ from cls's constructor defaults


METHODS = {
    "supervised": MethodEntry(Supervised, False, False, "cross-entropy only (teachers, the plain student)"),
    # RepDistiller's KD setting (-r 0.1 -a 0.9)
    "kd": MethodEntry(KD, True, True, "Hinton et al. knowledge distillation",
                      weights={"w_ce": 0.1, "w_kd": 0.9}),
    "crd": MethodEntry(CRD, True, False, "Contrastive Representation Distillation (Tian et al.)"),
    "crd+kd": MethodEntry(CRD, True, True, "CRD plus a KD term (CRD's -a 1)", weights={"w_kd": 1.0}),
    "cocord": MethodEntry(CoCoRD, True, False, "Contrastive Consistent Representation Distillation"),
    "cocord+kd": MethodEntry(CoCoRD, True, True, "CoCoRD plus a KD term", weights={"w_kd": 1.0}),
    # the feature-based baselines, RepDistiller's settings (CE 1, KD 0, beta = the method's --w-<name>)
    "fitnet": MethodEntry(FitNet, True, False, "FitNets hint on the middle feature map through a regressor"),
    "at": MethodEntry(AT, True, False, "attention transfer on every stage output"),
    "sp": MethodEntry(SP, True, False, "similarity-preserving KD on the last feature map"),
    "cc": MethodEntry(CC, True, False, "correlation congruence on embedded pooled features"),
    "vid": MethodEntry(VID, True, False, "variational information distillation on every stage output"),
    "rkd": MethodEntry(RKD, True, False, "relational KD (distance + angle) on pooled features"),
    "pkt": MethodEntry(PKT, True, False, "probabilistic knowledge transfer on pooled features"),
    "ab": MethodEntry(AB, True, False, "activation boundaries: connector initialisation stage, then CE"),
    "ft": MethodEntry(FT, True, False, "factor transfer: paraphraser initialisation stage, then translator"),
}


def constructor_default(cls, param):
    """The default of `param` in `cls.__init__`: the one place each published value is written."""
    p = inspect.signature(cls.__init__).parameters.get(param)
    if p is None or p.default is inspect.Parameter.empty:
        raise TypeError(f"{cls.__name__}.__init__ has no default for '{param}'")
    return p.default


# (flag, type, (class, constructor parameter) the default comes from, help; {default} is filled in)
FLAGS = (
    ("--kd-T", float, (CoCoRD, "kd_T"), "KD temperature (default: {default})"),
    ("--tau", float, (CoCoRD, "tau"), "CoCoRD InfoNCE temperature (default: {default})"),
    ("--queue-size", int, (CoCoRD, "queue_size"),
     "CoCoRD queue length K of teacher keys (default: {default}; ImageNet: 16384, our choice; "
     "CIFAR: 2048, the authors')"),
    ("--proj-dim", int, (CoCoRD, "proj_dim"), "CoCoRD projection output width (default: {default})"),
    ("--proj-hidden-dim", int, (CoCoRD, "proj_hidden_dim"), "CoCoRD projection hidden width (default: {default})"),
    ("--pred-dim", int, (CoCoRD, "pred_dim"), "CoCoRD predictor hidden width (default: {default})"),
    ("--teacher-head-momentum", float, (CoCoRD, "teacher_head_momentum"),
     "EMA momentum of the teacher projection head (default: {default})"),
    ("--slow-momentum", float, (CoCoRD, "slow_momentum"),
     "EMA momentum of the slow-moving student (default: {default})"),
    ("--w-contrast", float, (CoCoRD, "w_contrast"), "CoCoRD contrastive weight (default: {default})"),
    ("--w-pred", float, (CoCoRD, "w_pred"), "CoCoRD prediction-loss weight (default: {default})"),
    ("--crd-feat-dim", int, (CRD, "feat_dim"), "CRD embedding width (default: {default})"),
    ("--crd-nce-k", int, (CRD, "nce_k"), "CRD negatives per sample (default: {default})"),
    ("--crd-nce-t", float, (CRD, "nce_t"), "CRD temperature (default: {default})"),
    ("--crd-momentum", float, (CRD, "momentum"), "CRD memory-bank momentum (default: {default})"),
    ("--w-crd", float, (CRD, "w_crd"), "CRD loss weight (default: {default})"),
    ("--w-fitnet", float, (FitNet, "w_fitnet"), "FitNet hint-loss weight (default: {default})"),
    ("--hint-layer", int, (FitNet, "hint_layer"),
     "FitNet hint layer, an index into [stem, stage 1, stage 2, ...] (default: {default})"),
    ("--w-at", float, (AT, "w_at"), "attention-transfer loss weight (default: {default})"),
    ("--w-sp", float, (SP, "w_sp"), "similarity-preserving loss weight (default: {default})"),
    ("--w-cc", float, (CC, "w_cc"), "correlation-congruence loss weight (default: {default})"),
    ("--cc-feat-dim", int, (CC, "feat_dim"), "CC embedding width (default: {default})"),
    ("--w-vid", float, (VID, "w_vid"), "VID loss weight (default: {default})"),
    ("--w-rkd", float, (RKD, "w_rkd"), "RKD loss weight (default: {default})"),
    ("--rkd-w-dist", float, (RKD, "w_dist"), "RKD distance term weight inside the loss (default: {default})"),
    ("--rkd-w-angle", float, (RKD, "w_angle"), "RKD angle term weight inside the loss (default: {default})"),
    ("--w-pkt", float, (PKT, "w_pkt"), "PKT loss weight (default: {default})"),
    ("--w-ab", float, (AB, "w_ab"), "AB loss weight in its initialisation stage (default: {default})"),
    ("--w-ft", float, (FT, "w_ft"), "factor-transfer loss weight (default: {default})"),
    ("--init-epochs", int, (AB, "init_epochs"),
     "epochs of the initialisation stage of ab and ft, before the --epochs of the main stage (default: {default})"),
)


def get_method(name):
    """The METHODS row of `name`; an unknown name is an error listing the choices."""
    if name not in METHODS:
        raise ValueError(f"unknown --method '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def default_weight(name, key):
    """The weight `key` ("w_ce" / "w_kd") method `name` uses when the flag is not given."""
    entry = get_method(name)
    if key in entry.weights:
        return entry.weights[key]
    param = inspect.signature(entry.cls.__init__).parameters.get(key)
    if param is None:
        return 0.0  # the method has no such term
    return constructor_default(entry.cls, key)


def add_method_args(parser):
    """Add every method hyper-parameter flag (with its default) to an argparse parser."""
    g = parser.add_argument_group("distillation method hyper-parameters")
    g.add_argument("--w-ce", type=float, default=None,
                   help="weight of the cross-entropy term (%(default)s: the method's own, 0.1 for kd, 1 otherwise)")
    g.add_argument("--w-kd", type=float, default=None,
                   help="weight of Hinton's KD term (%(default)s: the method's own, 0.9 for kd, 1 for crd+kd / cocord+kd, 0 otherwise)")
    for flag, type_, (cls, param), help_ in FLAGS:
        default = type_(constructor_default(cls, param))
        # %(default)s: the parser's default (a trainer may change it, e.g. K on CIFAR); ArgumentDefaultsHelpFormatter
        # adds nothing to a help text that already shows it
        g.add_argument(flag, type=type_, default=default, help=help_.format(default="%(default)s"))
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
            hp[k] = default_weight(name, k)

    def need(cond, flag, what):
        if not cond:
            raise ValueError(f"--{flag} = {hp[flag.replace('-', '_')]!r} is invalid: {what}")

    for w in ("w-ce", "w-kd", "w-contrast", "w-pred", "w-crd", "w-fitnet", "w-at", "w-sp", "w-cc", "w-vid", "w-rkd",
              "rkd-w-dist", "rkd-w-angle", "w-pkt", "w-ab", "w-ft"):
        need(hp[w.replace("-", "_")] >= 0, w, "loss weights must be >= 0")
    for flag in ("kd-T", "tau", "crd-nce-t"):
        need(hp[flag.replace("-", "_")] > 0, flag, "temperatures must be > 0")
    for flag in ("queue-size", "proj-dim", "proj-hidden-dim", "pred-dim", "crd-feat-dim", "crd-nce-k", "cc-feat-dim"):
        need(hp[flag.replace("-", "_")] >= 1, flag, "sizes must be >= 1")
    for flag in ("hint-layer", "init-epochs"):
        need(hp[flag.replace("-", "_")] >= 0, flag, "must be >= 0")
    for flag in ("teacher-head-momentum", "slow-momentum", "crd-momentum"):
        need(0 <= hp[flag.replace("-", "_")] < 1, flag, "momenta must lie in [0, 1)")
    if name.endswith("+kd"):
        need(hp["w_kd"] > 0, "w-kd", f"--method {name} needs a positive KD weight")
    return hp


def build_method(name, args, student, teacher, num_samples, sample_labels, gather=None, image_size=None,
                 drives_init_stage=False) -> Method:
    """Build method `name` (a key of METHODS) from parsed flags; see methods/base.py for the interface.

    `teacher` is the frozen teacher when METHODS[name].needs_teacher, else None (whether the command
    line gives one is train_imagenet.check_args's check); `sample_labels` [num_samples] holds every
    training sample's class (CRD draws its negatives from other classes); `gather(t)` returns
    torch.cat of `t` over all ranks (None in a single process). The resolved hyper-parameters are
    available as `method.hparams`. The student must already hold its initial weights: CoCoRD's slow
    student is a copy of it taken here (on resume, `load_state_dict` restores that copy).

    `image_size` is the side of the square training crop; the feature-based methods size their
    regressors / connectors from one dummy pass at it. Not given: `args.crop_size` (ImageNet trainer),
    else `args.image_size` (benchmark), else 32 for a CIFAR zoo student. It is `hparams["image_size"]`.

    `drives_init_stage`: the caller runs the initialisation stage of `ab` / `ft` (the protocol in
    methods/feature_method.py); a caller that does not gets an error instead of a run that never leaves it.
    """
    entry = get_method(name)
    hp = _resolve(name, args)
    if issubclass(entry.cls, TwoStageMethod) and hp["init_epochs"] and not drives_init_stage:
        raise ValueError(f"--method {name} starts with an initialisation stage of --init-epochs {hp['init_epochs']}, "
                         f"which this trainer does not run; pass --init-epochs 0 to skip it, or train with a "
                         f"trainer that drives it")
    if image_size is None:
        image_size = getattr(args, "crop_size", None) or getattr(args, "image_size", None)
    if image_size is None and isinstance(student, ZooModel):
        image_size = 32  # the zoo is built for CIFAR's 32x32 images
    hp["image_size"] = image_size
    if entry.kd_term and num_classes_of(teacher) != num_classes_of(student):
        raise ValueError(f"--method {name}: the teacher predicts {num_classes_of(teacher)} classes but the "
                         f"student {num_classes_of(student)}; KD needs the same classes")
    method = entry.cls.from_hparams(student, teacher, hp, num_samples, sample_labels, gather)
    method.hparams = hp
    return method
