"""The learned operator: an LSTM optimizer (Andrychowicz et al. 2016) that outputs the parameter
updates and, from a global head, the KD hyperparameters (beta_t, T_t) and a global step scale.

Per coordinate:

* inputs: the gradient preprocessed as log-magnitude and sign (p = 10), running averages of the
  gradient at several timescales, each normalized by its RMS over the tensor, and progress t / T;
* output: ``step = base_scale * scale_t * exp(magnitude) * direction`` with
  ``direction = -m_hat(0.9) + d``: the skip term makes a fresh operator a per-tensor normalized
  momentum method, stable at initialization; the learned part gives the corrections (d, magnitude).
  With ``mix`` the prior -m_hat(0.9) is a learned mix of classic directions (m_hat per timescale,
  Adam's m / sqrt(v), sign m), each of unit RMS per tensor, starting at -m_hat(0.9).

Where the corrections come from (``per_coordinate``):

* ``"lstm"``: every coordinate runs the LSTM on its inputs (all coordinates of all tensors form one
  batch of one fused ``nn.LSTM`` call; a hidden and cell state per coordinate), read out linearly;
* ``"mlp"``: the LSTM runs once per *tensor* on the tensor's pooled inputs (their means and the RMS of
  each running average relative to the gradient's: how consistent the gradient is), and a small MLP
  per coordinate reads the coordinate's inputs together with its tensor's LSTM output (the
  hierarchical design of VeLO, Metz et al. 2022). Per coordinate only the running averages are kept,
  and a step costs a few multiply-adds per coordinate instead of an LSTM cell.

Global head (pooled top LSTM state + progress, log train loss, KD/CE ratio) gives
``beta_t in (0, 1)``, ``T_t in (1, 20)`` and the step scale; a linear term in progress (``schedule``,
zero at init) lets each follow a schedule directly, e.g. ``scale_t = exp(b + a * t/T)``. ``kd(state)``
hands (beta_t, T_t) to the next training loss, so the operator writes the schedule of the KD
hyperparameters.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import PER_COORDINATE
from ..errors import UserError
from .base import KDChoice, Operator, Params, State, StepContext

T_MIN, T_MAX = 1.0, 20.0
# The recommended operator, at one stable path (the README, scripts/gpu_timing.sh and the tests name it).
SHIPPED_OPERATOR = str(Path(__file__).resolve().parents[2] / "checkpoints" / "operator.pt")
P = 10.0  # gradient preprocessing constant of Andrychowicz et al.


@dataclass
class LSTMOperatorConfig:
    hidden: int = 20
    layers: int = 2
    timescales: tuple[float, ...] = (0.5, 0.9, 0.99)
    base_scale: float = 1e-3
    beta_init: float = 0.5
    temperature_init: float = 4.0
    head_hidden: int = 32
    # True: each tensor's per-coordinate update exp(magnitude) * direction is rescaled to unit RMS, so the
    # per-coordinate LSTM decides only the *shape* of the update and the global head alone its size
    # (base_scale * scale_t): a short truncation can then not teach the coordinates "take smaller steps".
    normalize_update: bool = False
    per_coordinate: str = "lstm"  # a key of config.PER_COORDINATE (module docstring)
    coord_hidden: int = 8  # "mlp": width of the per-coordinate MLP
    # The RMS over a tensor that normalizes its running averages (and the gradient's, for "mlp") is floored
    # at rms_floor times the RMS over all coordinates: for a tensor whose gradient is rounding only (a bias
    # in front of BatchNorm) the inputs are then ~0 instead of unit-size rounding noise, and without
    # normalize_update its step is negligible instead of full-size in a rounding-determined direction. 0: no floor.
    rms_floor: float = 0.0
    # True: the prior direction is a learned mix (``LSTMOperatorNet.mix``, one weight per term, initialized to
    # the designed prior) of per-tensor unit-RMS terms: the running averages m_hat(timescale), Adam's
    # m(0.9) / sqrt(v) (v the running mean square of the gradient, 0.999) and sign(m(0.9)). A few weights that
    # change the shape of every coordinate's update, e.g. towards Adam's per-coordinate normalization.
    mix: bool = False
    # The seed of the networks' random initialization (the LSTM, the per-coordinate MLP, the head's hidden layer):
    # with the configuration it fixes them, so a checkpoint's initialization is rebuilt exactly (init_networks,
    # weight_changes). The read-outs start at zero, so at initialization the operator steps as its prior does.
    init_seed: int = 0

    @property
    def n_inputs(self) -> int:
        return 2 + len(self.timescales) + 1  # log|g|, sign g, normalized momenta, progress

    @property
    def n_terms(self) -> int:
        return len(self.timescales) + 2  # m_hat per timescale, Adam's direction, sign(m)

    @property
    def n_tensor_inputs(self) -> int:
        return self.n_inputs + len(self.timescales)  # their means over the tensor, log RMS(momentum) / RMS(g)


class LSTMOperatorNet(nn.Module):
    """The weights phi of the learned operator."""

    def __init__(self, cfg: LSTMOperatorConfig):
        super().__init__()
        if cfg.per_coordinate not in PER_COORDINATE:
            raise UserError(f"unknown per-coordinate part {cfg.per_coordinate!r}: use one of {', '.join(PER_COORDINATE)}")
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            self._build(cfg)

    def _build(self, cfg: LSTMOperatorConfig) -> None:
        if cfg.per_coordinate == "lstm":
            self.lstm = nn.LSTM(cfg.n_inputs, cfg.hidden, num_layers=cfg.layers)
            self.coord_out = nn.Linear(cfg.hidden, 2)  # direction correction, log-magnitude
        else:
            self.lstm = nn.LSTM(cfg.n_tensor_inputs, cfg.hidden, num_layers=cfg.layers)
            self.coord_in = nn.Linear(cfg.n_inputs + cfg.hidden, cfg.coord_hidden)
            self.coord_out = nn.Linear(cfg.coord_hidden, 2)
        self.head = nn.Sequential(nn.Linear(cfg.hidden + 3, cfg.head_hidden), nn.Tanh(), nn.Linear(cfg.head_hidden, 3))
        self.schedule = nn.Linear(1, 3, bias=False)  # slopes in progress of the head's 3 outputs
        with torch.no_grad():  # zero read-outs: at init the operator steps as its prior does (the networks change nothing yet)
            self.coord_out.weight.zero_()
            self.coord_out.bias.zero_()
            self.head[-1].weight.zero_()
            self.head[-1].bias.zero_()
            self.schedule.weight.zero_()
        if cfg.mix:  # after every random initialization: the other weights are those of an operator without it
            self.mix = nn.Parameter(prior_mix(cfg))
        self.register_buffer("beta_bias", torch.tensor(_logit(cfg.beta_init)))
        self.register_buffer("temperature_bias", torch.tensor(_logit((cfg.temperature_init - T_MIN) / (T_MAX - T_MIN))))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Weights saved before the ``schedule`` term existed keep its zero initialization (no slope)."""
        return super().load_state_dict({"schedule.weight": self.schedule.weight.detach().clone(), **state_dict}, strict, assign)

    def units(self, sizes: list[int]) -> int:
        """How many rows the LSTM's state has: one per coordinate, or one per tensor."""
        return sum(sizes) if self.cfg.per_coordinate == "lstm" else len(sizes)

    def corrections(self, features: torch.Tensor, ms_momenta: torch.Tensor, g: torch.Tensor, sizes: list[int], h, c):
        """The learned part: per coordinate (direction correction, log-magnitude) (2 x N), the LSTM
        output pooled for the global head, and the LSTM's new state. ``features`` is n_inputs x N,
        ``ms_momenta`` (K x tensors) the floored mean squares of the running averages over each tensor,
        ``g`` the gradient (N)."""
        if self.cfg.per_coordinate == "lstm":
            out, (h, c) = self.lstm(features.T[None], (h, c))
            return self.coord_out(out[0]).T, out[0].mean(0), h, c
        ms_grad = floored(_tensor_means(g[None] ** 2, sizes), g[None], self.cfg.rms_floor)[0]
        consistency = (0.5 * torch.log((ms_momenta + 1e-30) / (ms_grad + 1e-30))).clamp(-5, 5)
        pooled_in = torch.cat([_tensor_means(features, sizes), consistency]).T  # tensors x n_tensor_inputs
        top, h, c = lstm_step(self.lstm, pooled_in, h, c)  # tensors x hidden
        n_in = features.shape[0]
        w_in, w_out = self.coord_in.weight, self.coord_out.weight
        context = (top @ w_in[:, n_in:].T + self.coord_in.bias).T  # coord_hidden x tensors: each tensor's share of the hidden layer
        coord = [torch.addmm(self.coord_out.bias[:, None], w_out, torch.relu(torch.addmm(context[:, t:t + 1], w_in[:, :n_in], f)))
                 for t, f in enumerate(features.split(sizes, 1))]  # per tensor: its context is the bias column
        return torch.cat(coord, 1), top.mean(0), h, c


@dataclass
class LSTMOperator(Operator):
    """The operator interface around an :class:`LSTMOperatorNet`."""

    net: LSTMOperatorNet = field(default_factory=lambda: LSTMOperatorNet(LSTMOperatorConfig()))
    name = "lstm"
    chooses_kd = True

    @property
    def cfg(self) -> LSTMOperatorConfig:
        return self.net.cfg

    def init(self, params: Params) -> State:
        ref = next(iter(params.values()))
        n = sum(p.numel() for p in params.values())
        c = self.cfg
        z = lambda *s: torch.zeros(*s, device=ref.device, dtype=ref.dtype)
        units = self.net.units([p.numel() for p in params.values()])
        return {
            "momenta": z(len(c.timescales), n),
            **({"second": z(1, n)} if c.mix else {}),
            "h": z(c.layers, units, c.hidden),
            "c": z(c.layers, units, c.hidden),
            "beta": torch.sigmoid(self.net.beta_bias).to(ref),
            "temperature": (T_MIN + (T_MAX - T_MIN) * torch.sigmoid(self.net.temperature_bias)).to(ref),
            "scale": torch.ones((), device=ref.device, dtype=ref.dtype),
        }

    def kd(self, state: State) -> KDChoice:
        return KDChoice(state["beta"], state["temperature"])

    def step(self, params: Params, grads: Params, state: State, ctx: StepContext):
        names = list(params)
        sizes = [params[k].numel() for k in names]
        g = _flat_finite(grads, names)
        decay = torch.tensor(self.cfg.timescales, device=g.device, dtype=g.dtype)[:, None]
        momenta = decay * state["momenta"] + (1 - decay) * g
        ms_momenta = floored(_tensor_means(momenta**2, sizes), momenta, self.cfg.rms_floor)  # K x tensors
        m_hat = _unit_rms(momenta, ms_momenta, sizes)
        features = torch.cat([
            (torch.log(g.abs() + 1e-30) / P).clamp(-1, 1)[None],
            (g * math.exp(P)).clamp(-1, 1)[None],
            m_hat,
            torch.full_like(g, ctx.progress)[None],
        ])  # n_inputs x N
        coord, pooled, h, c = self.net.corrections(features, ms_momenta, g, sizes, state["h"], state["c"])
        mid = _prior_index(self.cfg)
        mixed = {}
        if self.cfg.mix:
            second = ADAM_DECAY * state["second"] + (1 - ADAM_DECAY) * g**2
            # sqrt(v + 1e-24): finite derivative where v = 0 (a gradient entry that was exactly 0 so far: ReLU, max-pool)
            adam = momenta[mid:mid + 1] / (torch.sqrt(second + 1e-24) + 1e-12)
            adam = _floored_unit_rms(adam, sizes, self.cfg.rms_floor)
            terms = torch.cat([m_hat, adam, torch.sign(momenta[mid:mid + 1])])
            prior = self.net.mix @ terms
            mixed = {"second": second}
        else:
            prior = m_hat[mid]
        direction = -prior + coord[0]
        magnitude = coord[1].clamp(-5, 3)

        globals_ = _global_inputs(ctx, g)
        o = self.net.head(torch.cat([pooled, globals_])) + self.net.schedule(globals_[:1])
        scale = torch.exp(o[2].clamp(-5, 5))
        shape = torch.exp(magnitude) * direction
        if self.cfg.normalize_update:
            shape = _unit_rms(shape[None], _tensor_means(shape[None] ** 2, sizes), sizes)[0]
        update = self.cfg.base_scale * scale * shape
        new_params = {k: params[k] + u.view_as(params[k]) for k, u in zip(names, update.split(sizes))}
        new_state = {
            "momenta": momenta,
            **mixed,
            "h": h,
            "c": c,
            "beta": torch.sigmoid(o[0] + self.net.beta_bias),
            "temperature": T_MIN + (T_MAX - T_MIN) * torch.sigmoid(o[1] + self.net.temperature_bias),
            "scale": scale,
        }
        return new_params, new_state, {"step_scale": scale.detach(), "lr": (self.cfg.base_scale * scale).detach()}

    def config(self) -> dict:
        return {"name": self.name, **asdict(self.cfg)}

    def save(self, path, **extra) -> None:
        save_checkpoint(path, "operator", self.config(), operator="lstm", weights=self.net.state_dict(), **extra)


# Variants of a learned operator (``compare --operators ckpt:PATH@VARIANT``): what each changes.
VARIANTS = {
    "schedule-only": "the per-coordinate read-out (coord_out) zeroed and the mix of terms (if any) reset to its initialization: "
                     "every coordinate's update is the designed prior -m_hat(0.9) sized by the global head, which keeps its "
                     "schedule (the LSTM still runs: its pooled state feeds the head)",
    "init-networks": "every weight of the networks (LSTM, per-coordinate MLP or read-out, the head but its output biases) reset "
                     "to the recorded initialization (LSTMOperatorConfig.init_seed): the designed prior's scalars (PRIOR) alone "
                     "are kept, so the operator steps as its prior does and the difference is what the networks learned",
    "step=K": "every step multiplied by K > 0 (base_scale times K, every weight the same): the one scalar to tune on "
              "validation, as a baseline's lr is, for a student whose best step size differs from the meta-training students'",
}


# The designed prior's global scalars: the mix of directions, the schedule's slopes and the head's output biases (its base
# beta, T and step scale). Every other weight belongs to the networks.
PRIOR = ("mix", "schedule.weight", "head.2.bias")


def is_prior(name: str) -> bool:
    return name in PRIOR


def init_networks(operator: LSTMOperator) -> LSTMOperator:
    """A copy of ``operator`` whose networks are at their recorded initialization (rebuilt from its config, which
    holds ``init_seed``), its prior's scalars (:data:`PRIOR`) kept: the ``init-networks`` variant."""
    net = LSTMOperatorNet(operator.cfg).to(next(operator.net.parameters()).device)
    trained = operator.net.state_dict()
    net.load_state_dict({k: trained[k] if is_prior(k) or k not in dict(net.named_parameters()) else v for k, v in net.state_dict().items()})
    return LSTMOperator(net)


def weight_changes(operator: LSTMOperator) -> list[dict]:
    """Per weight group (a module's parameters, or one prior scalar tensor), the norm of its recorded initialization,
    of its change from it and their ratio (the relative change; inf for a group that starts at zero and moved)."""
    init = dict(LSTMOperatorNet(operator.cfg).named_parameters())
    groups: dict[str, list[str]] = {}
    for name, _ in operator.net.named_parameters():
        groups.setdefault(name if is_prior(name) else name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
    rows = []
    now = dict(operator.net.named_parameters())
    for group, names in groups.items():
        start = torch.cat([init[n].detach().reshape(-1).cpu() for n in names])
        moved = torch.cat([now[n].detach().reshape(-1).cpu() for n in names]) - start
        size, change = float(start.norm()), float(moved.norm())
        rows.append({"group": group, "numel": start.numel(), "prior": all(is_prior(n) for n in names), "init_norm": size,
                     "change_norm": change, "relative_change": change / size if size else (math.inf if change else 0.0)})
    return rows


def step_factor(variant: str) -> float | None:
    """K of a ``step=K`` variant, None for another variant name; a bad variant is a UserError."""
    if variant in VARIANTS and variant != "step=K":
        return None
    name, _, value = variant.partition("=")
    try:
        factor = float(value) if name == "step" else math.nan
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        raise UserError(f"unknown operator variant {variant!r}: use schedule-only, init-networks or step=K with K a positive number")
    return factor


def with_variant(operator: LSTMOperator, variant: str) -> LSTMOperator:
    """A copy of ``operator`` changed as ``variant`` (a form of :data:`VARIANTS`) says."""
    factor = step_factor(variant)
    if variant == "init-networks":
        return init_networks(operator)
    if factor is None:
        return ablated(operator, variant)
    net = LSTMOperatorNet(replace(operator.cfg, base_scale=operator.cfg.base_scale * factor))
    net.load_state_dict(operator.net.state_dict())
    return LSTMOperator(net.to(next(operator.net.parameters()).device))


def ablated(operator: LSTMOperator, variant: str = "schedule-only") -> LSTMOperator:
    """A copy of ``operator`` with its learned per-coordinate part removed (the ``schedule-only`` variant)."""
    if variant != "schedule-only":
        raise UserError(f"unknown operator ablation {variant!r}: use schedule-only")
    net = copy.deepcopy(operator.net)
    with torch.no_grad():
        net.coord_out.weight.zero_()
        net.coord_out.bias.zero_()
        if net.cfg.mix:
            net.mix.copy_(prior_mix(net.cfg))
    return LSTMOperator(net)


def load_operator(path, device: str = "cpu") -> LSTMOperator:
    ck = load_checkpoint(path, kind="operator")
    cfg_dict = {k: v for k, v in ck["config"].items() if k != "name"}
    cfg_dict["timescales"] = tuple(cfg_dict.get("timescales", LSTMOperatorConfig.timescales))
    try:
        net = LSTMOperatorNet(LSTMOperatorConfig(**cfg_dict))
        net.load_state_dict(ck["weights"])
    except (TypeError, RuntimeError) as exc:
        raise UserError(f"{path}: operator weights do not fit its config ({str(exc).splitlines()[0]})") from exc
    return LSTMOperator(net.to(device))


ADAM_DECAY = 0.999  # the running mean square of the gradient in the mix's Adam term (Adam's beta_2)


def _prior_index(cfg: LSTMOperatorConfig) -> int:
    """Which running average the designed prior follows: that of timescale 0.9 (else the first)."""
    return cfg.timescales.index(0.9) if 0.9 in cfg.timescales else 0


def prior_mix(cfg: LSTMOperatorConfig) -> torch.Tensor:
    """The mix weights of the designed prior: all on m_hat(0.9)."""
    w = torch.zeros(cfg.n_terms)
    w[_prior_index(cfg)] = 1.0
    return w


_LENGTHS: dict = {}


def _tensor_means(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """For rows of ``x`` (K x N, the coordinates of the tensors of ``sizes`` one after another), the
    mean over each tensor's coordinates (K x tensors)."""
    return torch.stack([part.mean(1) for part in x.split(sizes, 1)], 1)


def floored(ms: torch.Tensor, x: torch.Tensor, rms_floor: float) -> torch.Tensor:
    """Mean squares over each tensor (K x tensors) of the rows of ``x`` (K x N), floored at
    ``rms_floor``^2 times their mean square over all coordinates (0: no floor)."""
    return torch.maximum(ms, rms_floor**2 * (x**2).mean(1, keepdim=True)) if rms_floor else ms


def _unit_rms(x: torch.Tensor, ms: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The rows of ``x`` (K x N) divided, tensor by tensor, by the root of their mean squares ``ms`` (K x tensors)."""
    return x / _broadcast(torch.sqrt(ms + 1e-16), sizes)


def _floored_unit_rms(x: torch.Tensor, sizes: list[int], rms_floor: float) -> torch.Tensor:
    """The rows of ``x`` (K x N) at unit RMS per tensor, each tensor's RMS floored as :func:`floored` says."""
    return _unit_rms(x, floored(_tensor_means(x**2, sizes), x, rms_floor), sizes)


def _flat_finite(tensors: Params, names: list[str]) -> torch.Tensor:
    """The tensors of ``names`` flattened into one vector, non-finite entries read as 0."""
    return torch.nan_to_num(torch.cat([tensors[k].reshape(-1) for k in names]), nan=0.0, posinf=0.0, neginf=0.0)


def _broadcast(v: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Per-tensor values (K x tensors) repeated over each tensor's coordinates (K x N)."""
    key = (tuple(sizes), str(v.device))
    if key not in _LENGTHS:
        _LENGTHS[key] = torch.tensor(sizes, device=v.device)
    return v.repeat_interleave(_LENGTHS[key], dim=1, output_size=sum(sizes))


def lstm_step(lstm: nn.LSTM, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One time step of ``lstm`` (rows ``x``: batch x inputs; states layers x batch x hidden) written out,
    equal to ``lstm(x[None], (h, c))`` (gate order i, f, g, o): plain matmuls, so it runs under ``vmap``
    (which has no batching rule for ``aten::lstm``) and, for the few rows of a per-tensor LSTM, is no slower.
    Returns the top layer's output and the new states."""
    hs, cs = [], []
    for layer in range(lstm.num_layers):
        w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
        gates = torch.addmm(getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}"), x, w_ih.T) + h[layer] @ w_hh.T
        i, f, g, o = gates.chunk(4, 1)
        cs.append(torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g))
        hs.append(torch.sigmoid(o) * torch.tanh(cs[-1]))
        x = hs[-1]
    return x, torch.stack(hs), torch.stack(cs)


def _global_inputs(ctx: StepContext, g: torch.Tensor) -> torch.Tensor:
    """The global head's inputs besides the pooled LSTM state: progress, log train loss, log(1 + KD/CE),
    each non-finite loss read as 0. Tensor operations only, so the losses may be numbers or (under ``vmap``)
    one tensor per student."""
    loss, ce, kd = (torch.as_tensor(v, dtype=g.dtype, device=g.device) for v in (ctx.loss, ctx.ce_loss, ctx.kd_loss))
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    loss = torch.where(torch.isfinite(loss), loss, zero)
    ratio = torch.where(torch.isfinite(kd) & torch.isfinite(ce), kd / (ce.abs() + 1e-8), zero)
    progress = torch.full_like(loss, ctx.progress)
    return torch.stack([progress, torch.log(loss.clamp_min(1e-8)), torch.log1p(ratio.clamp(0.0, 1e4))])


def _logit(p: float) -> float:
    return math.log(p / (1 - p))
