"""The Adam family as data.

Every algorithm here is one elementwise update whose per-step scalars depend only on the step count and the
hyperparameters.  This module owns those facts: which options an algorithm accepts, which state tensors it needs,
which kernel (state set) runs it, and the float64 host scalars for step ``t``.  The kernels
(:mod:`sharded_optim.kernels.adam_family`) never see an algorithm name, only a kernel variant and a scalar vector.

Conventions (ALGORITHMS.md section 0): ``t`` is the step count after incrementing (first step ``t = 1``),
``bc1 = 1 - beta1**t``, ``bc2 = 1 - beta2**t``.  Scalars are computed here in float64 from an int64 step counter
(torch's float32 step freezes at 2**24) and cast once to the compute dtype, as torch does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

# Indices into the scalar vector every kernel receives (one 1-D tensor, so new values never recompile).
GSCALE, L2, DECAY, W1, B2, W2, STEP, DSCALE, EPS, LO, HI, B3, W3, CG = range(14)
NUM_SCALARS = 14

COMMON_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")


@dataclass(frozen=True)
class AlgorithmSpec:
    """Static facts about one algorithm of the family."""

    name: str
    lr: float
    weight_decay: float
    decoupled_default: bool
    options: tuple[str, ...]        # algorithm-specific options accepted besides the common ones
    summary: str


_GENERIC = ("amsgrad", "bias_correction", "decoupled_weight_decay", "maximize")

SPECS: dict[str, AlgorithmSpec] = {
    "adam": AlgorithmSpec("adam", 1e-3, 0.0, False, _GENERIC,
                          "torch.optim.Adam: L2 weight decay by default, epsilon outside the bias-corrected sqrt (E1)"),
    "adamw": AlgorithmSpec("adamw", 1e-3, 1e-2, True, _GENERIC,
                           "torch.optim.AdamW: decoupled weight decay p <- p - (lr*wd)*p"),
    "adamax": AlgorithmSpec("adamax", 2e-3, 0.0, False, ("bias_correction", "decoupled_weight_decay", "maximize"),
                            "torch.optim.Adamax: u <- max(beta2*u, |g| + eps)"),
    "nadam": AlgorithmSpec("nadam", 2e-3, 0.0, False, ("momentum_decay", "decoupled_weight_decay", "maximize"),
                           "torch.optim.NAdam: Nesterov momentum with the mu_t warm-up schedule"),
    "radam": AlgorithmSpec("radam", 1e-3, 0.0, False, ("degenerated_to_sgd", "decoupled_weight_decay", "maximize"),
                           "torch.optim.RAdam: variance rectification once rho_t > 5"),
    "adamod": AlgorithmSpec("adamod", 1e-3, 0.0, True,
                            ("beta3", "amsgrad", "bias_correction", "decoupled_weight_decay", "maximize"),
                            "AdaMod (authors' code): step sizes bounded by their own EMA with beta3"),
    "adabound": AlgorithmSpec("adabound", 1e-3, 0.0, False,
                              ("final_lr", "gamma", "amsgrad", "bias_correction", "decoupled_weight_decay",
                               "maximize"),
                              "AdaBound / AMSBound (authors' code): step sizes clamped to bounds converging to final_lr"),
    "diffgrad": AlgorithmSpec("diffgrad", 1e-3, 0.0, False, ("decoupled_weight_decay", "maximize"),
                              "diffGrad v2 (authors' code, = torch-optimizer's DiffGrad): E0 Adam with the first "
                              "moment scaled by the friction xi = sigmoid(|g_prev - g|)"),
    "diffmod": AlgorithmSpec("diffmod", 1e-3, 0.0, True, ("beta3", "decoupled_weight_decay", "maximize"),
                             "DiffMod: AdaMod's bounded step size times diffGrad's friction on the first moment "
                             "(beta3 or len_memory)"),
}

ALGORITHMS: tuple[str, ...] = tuple(SPECS)

# Algorithms that keep the previous gradient (state ``previous_grad``) for the diffGrad friction term.
FRICTION_ALGORITHMS: tuple[str, ...] = ("diffgrad", "diffmod")
# Another spelling of beta3 (the DiffMod code's): beta3 = 1 - 1/len_memory, "pass it the number of batches".
# Converted to beta3 on the way in (constructor and param groups); param groups store beta3 only, so there is
# one source of truth for schedulers and state_dict.
LEN_MEMORY_ALGORITHMS: tuple[str, ...] = ("diffmod",)

OPTION_DEFAULTS: dict[str, Any] = {
    "amsgrad": False,
    "bias_correction": True,
    "maximize": False,
    "beta3": 0.999,
    "final_lr": 0.1,
    "gamma": 1e-3,
    "momentum_decay": 4e-3,
    "degenerated_to_sgd": True,
}


def _require_unit_interval(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


FLOAT32_MAX = 3.4028234663852886e38
# Coupled L2 adds wd*p to the gradient before v <- b2*v + (1-b2)*g^2: above sqrt(FLOAT32_MAX) (1.8e19) the square
# overflows for every parameter element of magnitude >= 1, and v is inf from then on (the update of such an element
# is frozen at 0 for good).  Such a coefficient is always a mistake: refuse it, as torch would not.
L2_WEIGHT_DECAY_MAX = math.sqrt(FLOAT32_MAX)


def _require_nonnegative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (float(value) >= 0.0) \
            or math.isinf(float(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if float(value) > FLOAT32_MAX:  # the kernels compute in float32: a larger value would become inf there
        raise ValueError(f"{name} must be <= {FLOAT32_MAX:.4g} (the float32 compute range), got {value!r}")
    return float(value)


def _require_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def validate_group(algorithm: str, group: Mapping[str, Any]) -> dict[str, Any]:
    """Check every hyperparameter of a param group; return the normalised values.

    Raises ``ValueError``/``TypeError`` naming the offending hyperparameter.  Nothing is modified: callers apply
    the returned dict only after validation passed, so a rejected value never reaches the optimizer state.
    """
    spec = SPECS[algorithm]
    out: dict[str, Any] = {}
    if "len_memory" in group:  # add_param_group converts it; one written into a group later would do nothing
        raise ValueError("len_memory in a param group is only read when the group is added (it becomes beta3 = "
                         "1 - 1/len_memory); set beta3 to change the memory of an existing group"
                         if algorithm in LEN_MEMORY_ALGORITHMS else
                         f"option 'len_memory' does not apply to algorithm {algorithm!r}")
    lr = group["lr"]
    if hasattr(lr, "item"):  # a 0-d tensor lr (torch.optim allows it) is read on the host
        lr = float(lr.item())
    out["lr"] = _require_nonnegative("lr", lr)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    out["betas"] = (_require_unit_interval("betas[0]", betas[0]), _require_unit_interval("betas[1]", betas[1]))
    out["eps"] = _require_nonnegative("eps", group["eps"])
    out["weight_decay"] = _require_nonnegative("weight_decay", group["weight_decay"])
    out["decoupled_weight_decay"] = _require_bool("decoupled_weight_decay", group["decoupled_weight_decay"])
    if not out["decoupled_weight_decay"] and out["weight_decay"] > L2_WEIGHT_DECAY_MAX:
        raise ValueError(f"weight_decay must be <= {L2_WEIGHT_DECAY_MAX:.4g} with coupled L2 (decoupled_weight_decay="
                         f"False): wd*p enters v as a square, which overflows float32 for any |p| >= 1; got "
                         f"{group['weight_decay']!r}")
    for name in spec.options:
        if name == "decoupled_weight_decay":
            continue
        value = group[name]
        if name in ("amsgrad", "bias_correction", "maximize", "degenerated_to_sgd"):
            out[name] = _require_bool(name, value)
        elif name == "beta3":
            out[name] = _require_unit_interval("beta3", value)
        elif name == "gamma":
            out[name] = _require_unit_interval("gamma", value)
            if out[name] == 0.0:
                raise ValueError("gamma must be in (0, 1): the AdaBound bounds divide by gamma*t, got 0")
        else:  # final_lr, momentum_decay
            out[name] = _require_nonnegative(name, value)
    return out


def len_memory_to_beta3(algorithm: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Replace a ``len_memory`` option by ``beta3 = 1 - 1/len_memory`` (a copy; other keys unchanged).

    ``len_memory`` must be a finite number > 1 (1 would make beta3 = 0, no memory at all), only for the
    algorithms of ``LEN_MEMORY_ALGORITHMS``, and never together with ``beta3``: two spellings of one value.
    """
    out = dict(options)
    if "len_memory" not in out:
        return out
    value = out.pop("len_memory")
    if algorithm not in LEN_MEMORY_ALGORITHMS:
        raise ValueError(f"option 'len_memory' does not apply to algorithm {algorithm!r} (only to "
                         f"{', '.join(LEN_MEMORY_ALGORITHMS)})")
    if "beta3" in out:
        raise ValueError(f"give beta3 or len_memory, not both (beta3 = 1 - 1/len_memory); got beta3="
                         f"{out['beta3']!r} and len_memory={value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)) \
            or not float(value) > 1.0:
        raise ValueError(f"len_memory must be a finite number > 1 (beta3 = 1 - 1/len_memory), got {value!r}")
    out["beta3"] = 1.0 - 1.0 / float(value)
    return out


def resolve_options(algorithm: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Fill algorithm defaults for the options a user did not pass; reject options that do not apply."""
    if algorithm not in SPECS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    spec = SPECS[algorithm]
    options = len_memory_to_beta3(algorithm, options)
    known = set(OPTION_DEFAULTS) | {"decoupled_weight_decay"}
    resolved: dict[str, Any] = {}
    for name, value in options.items():
        if name not in known:
            raise TypeError(f"unknown option {name!r} for algorithm {algorithm!r}; it accepts "
                            f"{', '.join(spec.options)}")
        if name not in spec.options:
            raise ValueError(f"option {name!r} does not apply to algorithm {algorithm!r} "
                             f"(it accepts {', '.join(spec.options)})")
        resolved[name] = value
    for name in spec.options:
        if name not in resolved:
            resolved[name] = spec.decoupled_default if name == "decoupled_weight_decay" else OPTION_DEFAULTS[name]
    if "decoupled_weight_decay" not in resolved or resolved["decoupled_weight_decay"] is None:
        resolved["decoupled_weight_decay"] = spec.decoupled_default
    return resolved


def foreign_options(algorithm: str, group: Mapping[str, Any]) -> list[str]:
    """Options in ``group`` that belong to other algorithms than ``algorithm`` (a group saved or written for
    another algorithm), in :data:`OPTION_DEFAULTS` order."""
    return [k for k in OPTION_DEFAULTS if k in group and k not in SPECS[algorithm].options]


def state_keys(algorithm: str, group: Mapping[str, Any]) -> tuple[str, ...]:
    """Names of the per-element state tensors, in torch.optim spelling, in kernel argument order."""
    if algorithm == "adamax":
        return ("exp_avg", "exp_inf")
    keys = ["exp_avg", "exp_avg_sq"]
    if group.get("amsgrad", False):
        keys.append("max_exp_avg_sq")
    if algorithm in ("adamod", "diffmod"):
        keys.append("exp_avg_lr")
    if algorithm in FRICTION_ALGORITHMS:
        keys.append("previous_grad")  # torch-optimizer's DiffGrad spelling
    return tuple(keys)


def kernel_variant(algorithm: str, group: Mapping[str, Any]) -> str:
    """Which fused update runs this group: the state set plus the final-step form.

    ``adam_*`` variants apply ``p -= step*(m/denom)`` (torch's addcdiv form); ``bound_*`` variants build the
    per-element step size ``eta = step/denom`` first and bound it (AdaMod's min with its EMA, AdaBound's clamp),
    as the authors' code does.  A trailing ``g`` (``adam_mvg``, ``bound_mvsg``) is the previous-gradient state
    of the diffGrad friction.
    """
    if algorithm == "adamax":
        return "adamax_mu"
    if algorithm == "diffgrad":
        return "adam_mvg"
    if algorithm == "diffmod":
        return "bound_mvsg"
    ams = "x" if group.get("amsgrad", False) else ""
    if algorithm == "adamod":
        return f"bound_mv{ams}s"
    if algorithm == "adabound":
        return f"bound_mv{ams}"
    return f"adam_mv{ams}"


@dataclass
class HostScalars:
    """The per-step scalars of one param group (float64 on the host) plus host-side bookkeeping."""

    values: list[float]
    rectification: float | None = None   # RAdam r_t when rectified, else None
    mu_product: float | None = None      # NAdam running product after this step


# Hyperparameters that enter the scalars, in the order of the float64 vector the device path receives
# (sharded_optim.device_step): all values a scheduler may change are data, never compiled-in constants.
HYPER_KEYS = ("lr", "beta1", "beta2", "eps", "weight_decay", "beta3", "final_lr", "gamma", "momentum_decay",
              "initial_lr")


def hyperparameters(algorithm: str, group: Mapping[str, Any], initial_lr: float) -> list[float]:
    """The ``HYPER_KEYS`` values of a param group as host floats.

    Options the algorithm does not have are 0 whatever the group holds: a key another algorithm uses (a user's
    ``group["beta3"] = None`` on Adam) is not read, as ``validate_group`` does not check it."""
    options = SPECS[algorithm].options

    def option(name: str) -> float:
        return float(group[name]) if name in options else 0.0
    lr = float(group["lr"].item() if hasattr(group["lr"], "item") else group["lr"])
    beta1, beta2 = (float(b) for b in group["betas"])
    return [lr, beta1, beta2, float(group["eps"]), float(group["weight_decay"]), option("beta3"),
            option("final_lr"), option("gamma"), option("momentum_decay"), float(initial_lr)]


class _HostMath:
    """Scalar math on Python floats (float64): the reference form of every formula in :func:`step_scalars`."""

    sqrt = staticmethod(math.sqrt)

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return a if cond else b

    @staticmethod
    def pos_sqrt(x: Any) -> Any:  # sqrt of a value only used where it is positive
        return math.sqrt(max(x, 0.0))


def step_scalars(algorithm: str, flags: Mapping[str, Any], h: Any, t: Any, mu_product: Any,
                 xp: Any = _HostMath) -> tuple[list[Any], Any, Any]:
    r"""The kernel's scalar vector for step ``t`` (>= 1), written once for the host and the device.

    ``h`` holds the ``HYPER_KEYS`` values, ``t`` the step and ``mu_product`` NAdam's running product before
    this step; on the host they are Python floats (``xp = _HostMath``), on the device float64 tensors and ``xp``
    the matching torch functions (:mod:`sharded_optim.device_step`), so a skipped step never needs the host to
    know the step count.  ``flags`` holds the structural options (booleans that pick formulas, never values).
    Returns ``(values, rectification, mu_product_after)``; values that are constants stay Python floats.
    """
    lr, beta1, beta2, eps, wd, beta3, final_lr, gamma, psi, initial_lr = (h[i] for i in range(len(HYPER_KEYS)))
    decoupled = bool(flags["decoupled_weight_decay"])
    bias_correction = bool(flags.get("bias_correction", True))
    bc1 = 1.0 - beta1 ** t if bias_correction else 1.0
    bc2 = 1.0 - beta2 ** t if bias_correction else 1.0
    s: list[Any] = [0.0] * NUM_SCALARS
    s[GSCALE] = -1.0 if flags.get("maximize", False) else 1.0
    s[L2] = 0.0 if decoupled else wd
    s[DECAY] = lr * wd if decoupled else 0.0
    s[W1] = 1.0 - beta1
    s[B2] = beta2
    s[W2] = 1.0 - beta2
    s[EPS] = eps
    s[LO], s[HI] = 0.0, math.inf
    s[B3], s[W3] = 1.0, 0.0
    s[CG] = 0.0
    rectification, mu_after = None, None

    if algorithm in ("adam", "adamw"):
        # E1: p -= (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)
        s[STEP] = lr / bc1
        s[DSCALE] = 1.0 / xp.sqrt(bc2)
    elif algorithm == "adamax":
        s[STEP] = lr / bc1
    elif algorithm == "nadam":
        mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
        prod = mu_product * mu
        # p -= lr*(1-mu)/(1-prod) * g/d + lr*mu_next/(1-prod*mu_next) * m/d,  d = sqrt(v)/sqrt(bc2) + eps
        s[CG] = lr * (1.0 - mu) / (1.0 - prod)
        s[STEP] = lr * mu_next / (1.0 - prod * mu_next)
        s[DSCALE] = 1.0 / xp.sqrt(1.0 - beta2 ** t)
        mu_after = prod
    elif algorithm == "radam":
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        bc2_raw = 1.0 - beta2 ** t
        rho_t = rho_inf - 2.0 * t * beta2 ** t / bc2_raw
        bc1_raw = 1.0 - beta1 ** t
        rectified = rho_t > 5.0
        r_t = xp.pos_sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        if flags.get("degenerated_to_sgd", True):
            # before rectification: SGD with bias-corrected momentum, denominator forced to 1
            fallback_step, fallback_decay = lr / bc1_raw, s[DECAY]
        else:
            # authors' code: neither the update nor the weight decay touches p before rectification
            fallback_step, fallback_decay = 0.0, 0.0
        # E0 once rectified: p -= lr * r_t * sqrt(bc2)/bc1 * m / (sqrt(v) + eps)
        s[STEP] = xp.where(rectified, lr * r_t * xp.sqrt(bc2_raw) / bc1_raw, fallback_step)
        s[DSCALE] = xp.where(rectified, 1.0, 0.0)
        s[EPS] = xp.where(rectified, eps, 1.0)
        s[DECAY] = xp.where(rectified, s[DECAY], fallback_decay)
        rectification = xp.where(rectified, r_t, None) if xp is _HostMath else r_t
    elif algorithm == "diffgrad":
        # E0, as in the diffGrad code: p -= (lr*sqrt(bc2)/bc1) * (xi*m) / (sqrt(v) + eps)
        s[STEP] = lr * xp.sqrt(bc2) / bc1
        s[DSCALE] = 1.0
    elif algorithm in ("adamod", "adabound", "diffmod"):
        # E0 with 1/bc1 folded into eta, as in both authors' codes: eta = (lr*sqrt(bc2)/bc1) / (sqrt(v) + eps)
        s[STEP] = lr * xp.sqrt(bc2) / bc1
        s[DSCALE] = 1.0
        if algorithm in ("adamod", "diffmod"):
            s[B3] = beta3
            s[W3] = 1.0 - beta3
        else:
            fl = xp.where(initial_lr > 0, final_lr * lr / xp.where(initial_lr > 0, initial_lr, 1.0), 0.0)
            s[LO] = fl * (1.0 - 1.0 / (gamma * t + 1.0))
            s[HI] = fl * (1.0 + 1.0 / (gamma * t))
            if decoupled:
                s[DECAY] = wd  # AdaBoundW: p <- p - wd*p, not multiplied by lr (authors' code)
    else:  # pragma: no cover - resolve_options rejects unknown names first
        raise ValueError(f"unknown algorithm {algorithm!r}")
    return s, rectification, mu_after


def host_scalars(algorithm: str, group: Mapping[str, Any], step: int, *, initial_lr: float,
                 mu_product: float = 1.0) -> HostScalars:
    """Per-step scalars for step ``step`` (>= 1) of one param group, in float64 (:func:`step_scalars`).

    ``initial_lr`` is the group's learning rate at construction (AdaBound scales its bounds by lr/initial_lr,
    so LR schedulers move the bounds, as in the authors' code).  ``mu_product`` is NAdam's running product of
    mu before this step.
    """
    values, rectification, mu_after = step_scalars(algorithm, group, hyperparameters(algorithm, group, initial_lr),
                                                    float(int(step)), mu_product)
    return HostScalars([float(v) for v in values], rectification, mu_after)
