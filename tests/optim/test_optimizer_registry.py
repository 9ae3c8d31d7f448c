"""samkit.optim.registry: the training methods, their options, labels and construction."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn
from torch.optim import SGD, AdamW

from samkit.domains import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    SCALE,
    SEED,
    UNIT_CLOSED_OPEN,
    UNIT_OPEN_CLOSED,
    Interval,
)
from samkit.optim import (
    ESAM,
    SAM,
    OptimInfo,
    OptimOption,
    create_optimizer,
    get_optimizer_info,
    list_optimizers,
    register_optimizer,
    registry,
)
from samkit.optim.ascent_policy import AESAM, RST, RST_SCHEDULES, LateSAM
from samkit.optim.looksam import LookSAM


def params():
    torch.manual_seed(0)
    return list(nn.Linear(3, 2).parameters())


def test_list_in_registration_order():
    names = ["sgd", "sam", "esam", "gsam", "wsam", "fsam", "sam_on", "looksam", "aesam", "rst",
             "late_sam", "msam", "saf", "mesa"]  # fmt: skip
    assert list_optimizers() == names
    assert [info.name for info in registry.BUILTIN_OPTIMIZERS] == names


def test_entries():
    sgd, sam, esam = (get_optimizer_info(n) for n in ("sgd", "sam", "esam"))
    assert (sgd.cls, sam.cls, esam.cls) == (None, SAM, ESAM)
    assert (sgd.sharpness_aware, sam.sharpness_aware, esam.sharpness_aware) == (False, True, True)
    assert sam.supports_sync_perturbations and not esam.supports_sync_perturbations
    assert sgd.options == ()
    assert [o.name for o in sam.options] == ["rho", "adaptive"]
    assert [o.name for o in esam.options] == [
        "rho",
        "adaptive",
        "beta",
        "gamma",
        "sds_criterion",
        "seed",
    ]
    flags = {o.name: (o.flag, o.default, o.kind, o.domain, o.choices) for o in esam.options}
    assert flags == {
        "rho": ("sam_rho", 0.05, float, SCALE, None),
        "adaptive": ("sam_adaptive", False, bool, None, None),
        "beta": ("esam_beta", 0.5, float, UNIT_OPEN_CLOSED, None),
        "gamma": ("esam_gamma", 0.5, float, UNIT_OPEN_CLOSED, None),
        "sds_criterion": ("esam_criterion", "sharpness", str, None, ("sharpness", "loss")),
        "seed": ("run_seed", 0, int, SEED, None),
    }
    assert sam.option("rho") == esam.option("rho")
    assert sam.option("rho").help == "SAM neighbourhood size rho; 0 trains with plain SGD"
    for info in (sgd, sam, esam):
        assert info.description and "\n" not in info.description
        assert all(o.help and "\n" not in o.help for o in info.options)
    assert "Foret" in sam.paper and "Du" in esam.paper
    with pytest.raises(dataclasses.FrozenInstanceError):
        sam.name = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        sam.options[0].default = 1.0  # type: ignore[misc]


def test_unknown_option_names_the_known_ones():
    with pytest.raises(ValueError, match=r"'beta'.*rho, adaptive"):
        get_optimizer_info("sam").option("beta")
    with pytest.raises(ValueError, match="none"):
        get_optimizer_info("sgd").option("rho")


def test_describe_gives_the_run_labels():
    sgd, sam, esam = (get_optimizer_info(n) for n in ("sgd", "sam", "esam"))
    assert sgd.describe({}) == "SGD"
    assert sgd.describe({"lr": 0.1}) == "SGD"
    assert sam.describe({"rho": 0.05, "adaptive": False}) == "SAM rho=0.05"
    assert sam.describe({"rho": 0.05, "adaptive": True}) == "ASAM rho=0.05"
    assert sam.describe({"rho": 0.1}) == "SAM rho=0.1"
    assert sam.describe({}) == "SAM rho=0.05"
    values = {"rho": 0.05, "beta": 0.6, "gamma": 0.5, "adaptive": False}
    assert esam.describe(values) == "ESAM rho=0.05 beta=0.6 gamma=0.5"
    assert (
        esam.describe({**values, "adaptive": True}) == "ESAM rho=0.05 beta=0.6 gamma=0.5 adaptive"
    )
    assert esam.describe({"rho": 2, "lr": 0.1}) == "ESAM rho=2 beta=0.5 gamma=0.5"


def test_create_sam_with_hyper_parameters_and_base_kwargs():
    opt = create_optimizer("sam", params(), SGD, rho=0.1, adaptive=True, lr=0.2, momentum=0.9)
    assert type(opt) is SAM and isinstance(opt.base_optimizer, SGD)
    group = opt.param_groups[0]
    assert (group["rho"], group["adaptive"], group["lr"], group["momentum"]) == (
        0.1,
        True,
        0.2,
        0.9,
    )
    opt = create_optimizer("sam", params(), AdamW, lr=1e-3, ascent_steps=2)
    assert isinstance(opt.base_optimizer, AdamW) and opt.ascent_steps == 2
    assert opt.param_groups[0]["rho"] == 0.05 and opt.param_groups[0]["adaptive"] is False


def test_create_esam_with_hyper_parameters_and_base_kwargs():
    opt = create_optimizer(
        "esam",
        params(),
        SGD,
        rho=0.2,
        beta=0.6,
        gamma=0.7,
        sds_criterion="loss",
        seed=5,
        lr=0.1,
        momentum=0.8,
        nesterov=True,
    )
    assert type(opt) is ESAM
    assert (opt.beta, opt.gamma, opt.sds_criterion) == (0.6, 0.7, "loss")
    assert opt.param_groups[0]["rho"] == 0.2 and opt.param_groups[0]["momentum"] == 0.8
    assert opt.param_groups[0]["nesterov"] is True
    assert torch.equal(opt.generator.get_state(), torch.Generator().manual_seed(5).get_state())


def test_create_sgd_is_the_base_optimizer_alone():
    opt = create_optimizer("sgd", params(), SGD, lr=0.3, momentum=0.9)
    assert type(opt) is SGD
    assert opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[0]["momentum"] == 0.9
    instance = SGD(params(), lr=0.1)
    assert create_optimizer("sgd", instance.param_groups[0]["params"], instance) is instance
    with pytest.raises(TypeError, match="lr"):
        create_optimizer("sgd", instance.param_groups[0]["params"], instance, lr=0.2)


@pytest.mark.parametrize(
    "name, kwargs, text",
    [
        ("sam", {"rho": -0.1}, r"'rho' must be a number in \[0, 1000\], got -0.1"),
        ("sam", {"rho": float("nan")}, r"a number in \[0, 1000\]"),
        ("sam", {"adaptive": 1}, "'adaptive' must be True or False"),
        ("esam", {"beta": 0.0}, r"'beta' must be a number in \(0, 1\], got 0.0"),
        ("esam", {"gamma": 1.5}, r"'gamma' must be a number in \(0, 1\]"),
        ("esam", {"sds_criterion": "grad"}, "one of 'sharpness', 'loss'"),
        ("esam", {"seed": -1}, r"'seed' must be an integer in \[0, 4294967295\]"),
        ("esam", {"seed": 1.5}, r"an integer in \[0, 4294967295\]"),
        ("looksam", {"k": 0}, r"'k' must be an integer in \[1, 1000000000\], got 0"),
        ("looksam", {"k": 2.0}, r"'k' must be an integer in \[1, 1000000000\]"),
        ("looksam", {"alpha": -0.1}, r"'alpha' must be a number in \[0, 1000\]"),
        ("aesam", {"delta": 1.0}, r"'delta' must be a number in \[0, 1\), got 1.0"),
        ("aesam", {"lambda1": 1e4}, r"'lambda1' must be a number in \[-1000, 1000\]"),
        ("aesam", {"lambda2": float("inf")}, r"'lambda2' must be a number in \[-1000, 1000\]"),
        ("rst", {"p": 1.5}, r"'p' must be a fraction in \[0, 1\], got 1.5"),
        ("rst", {"p_end": -0.1}, r"'p_end' must be a fraction in \[0, 1\] or None, got -0.1"),
        ("rst", {"schedule": "step"}, "one of 'constant', 'piecewise', 'linear', 'cosine'"),
        ("late_sam", {"start_fraction": 2}, r"'start_fraction' must be a fraction in \[0, 1\]"),
    ],
)
def test_bad_option_values_raise_naming_optimizer_option_and_domain(name, kwargs, text):
    with pytest.raises(ValueError, match=f"optimizer '{name}'") as info:
        create_optimizer(name, params(), SGD, lr=0.1, **kwargs)
    assert info.match(text)


def test_unknown_optimizer_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'.*sgd, sam, esam"):
        get_optimizer_info("adam")
    with pytest.raises(ValueError, match="sgd, sam, esam"):
        create_optimizer("adam", params(), SGD, lr=0.1)


def test_register_rejects_duplicates_and_appends(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer(get_optimizer_info("sam"))
    info = OptimInfo(
        name="sam2",
        cls=SAM,
        description="SAM, again",
        options=(OptimOption("rho", "sam_rho", 0.1, "rho", NON_NEGATIVE),),
    )
    assert register_optimizer(info) is info
    assert list_optimizers()[-4:] == ["msam", "saf", "mesa", "sam2"]
    assert info.describe({"rho": 0.1}) == "SAM2"
    opt = create_optimizer("sam2", params(), SGD, rho=0.3, lr=0.1)
    assert opt.param_groups[0]["rho"] == 0.3


def test_option_definitions_are_checked():
    with pytest.raises(ValueError, match="default"):
        OptimOption("beta", "esam_beta", 0.0, "beta", UNIT_OPEN_CLOSED)
    with pytest.raises(ValueError, match="default"):
        OptimOption("adaptive", "sam_adaptive", 0, "adaptive", kind=bool)
    with pytest.raises(ValueError, match="choices"):
        OptimOption("x", "x", 1.0, "x", choices=("a",))
    with pytest.raises(ValueError, match="duplicate"):
        OptimInfo("x", None, "x", options=(get_optimizer_info("sam").option("rho"),) * 2)


def _constructor_keywords(cls):
    """The keywords ``cls(params, base_optimizer, ...)`` accepts for itself: its ``__init__``'s
    named parameters, and through ``**kwargs`` those of the parent ``__init__`` it forwards to,
    up to the parent whose ``**base_kwargs`` go to the base optimizer."""
    names = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names |= {
            p.name
            for p in parameters
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in ("self", "params", "base_optimizer")
        }
        var_keyword = [p.name for p in parameters if p.kind is p.VAR_KEYWORD]
        if not var_keyword or var_keyword[0] == "base_kwargs":
            break
    return names


@pytest.mark.parametrize("name", list_optimizers())
def test_options_are_constructor_keywords_with_the_same_defaults(name):
    info = get_optimizer_info(name)
    if info.cls is None:  # sgd; saf and mesa: their options are the trajectory loss's
        assert info.options == () or name in ("saf", "mesa")  # (tests/train/test_trajectory.py)
        return
    keywords = _constructor_keywords(info.cls)
    assert {o.name for o in info.options} <= keywords, keywords
    # every default accepted (SAM-ON takes the model: a normalisation layer to perturb)
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    opt = create_optimizer(name, model if info.param_groups else params(), SGD, lr=0.1)
    for o in info.options:
        for klass in info.cls.__mro__:
            parameter = inspect.signature(klass.__init__).parameters.get(o.name)
            if parameter is not None:
                assert parameter.default == o.default, (klass, o.name)
                break
    assert opt.param_groups[0]["rho"] == info.option("rho").default


def test_the_entries_of_the_methods_that_ascend_on_some_steps():
    infos = {n: get_optimizer_info(n) for n in ("looksam", "aesam", "rst", "late_sam")}
    assert {n: i.cls for n, i in infos.items()} == {
        "looksam": LookSAM, "aesam": AESAM, "rst": RST, "late_sam": LateSAM,
    }  # fmt: skip
    options = {
        n: {o.name: (o.flag, o.default, o.kind, o.domain, o.choices, o.optional) for o in i.options}
        for n, i in infos.items()
    }
    threshold = Interval(-1000, 1000)
    assert options == {
        "looksam": {
            "rho": ("sam_rho", 0.05, float, SCALE, None, False),
            "adaptive": ("sam_adaptive", False, bool, None, None, False),
            "k": ("looksam_k", 5, int, COUNT, None, False),
            "alpha": ("looksam_alpha", 0.7, float, SCALE, None, False),
        },
        "aesam": {
            "rho": ("sam_rho", 0.05, float, SCALE, None, False),
            "adaptive": ("sam_adaptive", False, bool, None, None, False),
            "delta": ("aesam_delta", 0.9, float, UNIT_CLOSED_OPEN, None, False),
            "lambda1": ("aesam_lambda1", -1.0, float, threshold, None, False),
            "lambda2": ("aesam_lambda2", 1.0, float, threshold, None, False),
        },
        "rst": {
            "rho": ("sam_rho", 0.05, float, SCALE, None, False),
            "adaptive": ("sam_adaptive", False, bool, None, None, False),
            "p": ("rst_p", 0.5, float, FRACTION, None, False),
            "p_end": ("rst_p_end", None, float, FRACTION, None, True),
            "schedule": ("rst_schedule", "constant", str, None, RST_SCHEDULES, False),
            "seed": ("run_seed", 0, int, SEED, None, False),
        },
        "late_sam": {
            "rho": ("sam_rho", 0.05, float, SCALE, None, False),
            "adaptive": ("sam_adaptive", False, bool, None, None, False),
            "start_fraction": ("late_sam_start_fraction", 0.875, float, FRACTION, None, False),
        },
    }
    for info in infos.values():
        assert info.description and "\n" not in info.description and info.paper
        assert all(o.help and "\n" not in o.help for o in info.options)


def test_labels_of_the_methods_that_ascend_on_some_steps():
    looksam, aesam, rst, late = (
        get_optimizer_info(n) for n in ("looksam", "aesam", "rst", "late_sam")
    )
    assert looksam.describe({}) == "LookSAM rho=0.05 k=5 alpha=0.7"  # the label before the flags
    assert looksam.describe({"k": 2, "alpha": 0.5, "adaptive": True}) == (
        "LookSAM rho=0.05 k=2 alpha=0.5 adaptive"
    )
    assert aesam.describe({}) == "AE-SAM rho=0.05 delta=0.9 c=1->-1"
    assert aesam.describe({"lambda1": 0.5, "lambda2": 0.5}) == "AE-SAM rho=0.05 delta=0.9 c=0.5"
    assert rst.describe({}) == "RST rho=0.05 p=0.5"  # the label before the flags
    assert rst.describe({"p": 0.8, "p_end": 0.2, "schedule": "cosine"}) == (
        "RST rho=0.05 p=0.8->0.2 cosine"
    )
    assert late.describe({"start_fraction": 0.5, "rho": 0.1}) == "LateSAM rho=0.1 start=0.5"


def test_create_the_methods_that_ascend_on_some_steps_with_their_options():
    opt = create_optimizer("looksam", params(), SGD, k=3, alpha=0.4, lr=0.1)
    assert (opt.ascent_policy.k, opt.alpha, opt.param_groups[0]["lr"]) == (3, 0.4, 0.1)
    opt = create_optimizer("aesam", params(), SGD, delta=0.8, lambda1=-0.5, lambda2=2.0, lr=0.1)
    policy = opt.ascent_policy
    assert (policy.delta, policy.lambda1, policy.lambda2, policy.total_steps) == (
        0.8, -0.5, 2.0, None,
    )  # fmt: skip
    opt = create_optimizer("rst", params(), SGD, p=0.3, p_end=0.9, schedule="linear", seed=2,
                           total_steps=10, lr=0.1)  # fmt: skip
    policy = opt.ascent_policy
    assert (policy.p, policy.p_end, policy.schedule, policy.total_steps) == (0.3, 0.9, "linear", 10)
    assert torch.equal(policy.generator.get_state(), torch.Generator().manual_seed(2).get_state())
    opt = create_optimizer("late_sam", params(), SGD, start_fraction=0.25, lr=0.1)
    assert (opt.ascent_policy.start_fraction, opt.ascent_policy.total_steps) == (0.25, None)
    for name in ("aesam", "rst", "late_sam", "looksam"):  # one first pass per step: no m
        assert get_optimizer_info(name).cls.one_first_pass_per_step


def test_an_optional_option_takes_none():
    with pytest.raises(ValueError, match="default None is not a fraction"):
        OptimOption("p_end", "rst_p_end", None, "p", FRACTION)
    option = OptimOption("p_end", "rst_p_end", None, "p", FRACTION, optional=True)
    assert option.check(None) is None and option.check(0.5) is None
    assert option.check(2.0) == option.describe_values() == "a fraction in [0, 1] or None"
