"""The learned operator: a coordinate-wise LSTM (Andrychowicz et al. 2016) that outputs the parameter
updates and, from a global head, the KD hyperparameters (beta_t, T_t) and a global step scale.

Per coordinate (all coordinates of all tensors form one batch for one fused ``nn.LSTM`` call):

* inputs: the gradient preprocessed as log-magnitude and sign (p = 10), running averages of the
  gradient at several timescales, each normalized by its RMS over the tensor, and progress t / T;
* output: ``step = base_scale * scale_t * exp(magnitude) * direction`` with
  ``direction = -m_hat(0.9) + d_lstm``: the skip term makes a fresh operator a per-tensor normalized
  momentum method, stable at initialization; the LSTM learns corrections to it.

Global head (pooled top LSTM state + progress, log train loss, KD/CE ratio) gives
``beta_t in (0, 1)``, ``T_t in (1, 20)`` and the step scale; a linear term in progress (``schedule``,
zero at init) lets each follow a schedule directly, e.g. ``scale_t = exp(b + a * t/T)``. ``kd(state)``
hands (beta_t, T_t) to the next training loss, so the operator writes the schedule of the KD
hyperparameters.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_checkpoint, save_checkpoint
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

    @property
    def n_inputs(self) -> int:
        return 2 + len(self.timescales) + 1  # log|g|, sign g, normalized momenta, progress


class LSTMOperatorNet(nn.Module):
    """The weights phi of the learned operator."""

    def __init__(self, cfg: LSTMOperatorConfig):
        super().__init__()
        self.cfg = cfg
        self.lstm = nn.LSTM(cfg.n_inputs, cfg.hidden, num_layers=cfg.layers)
        self.coord_out = nn.Linear(cfg.hidden, 2)  # direction correction, log-magnitude
        self.head = nn.Sequential(nn.Linear(cfg.hidden + 3, cfg.head_hidden), nn.Tanh(), nn.Linear(cfg.head_hidden, 3))
        self.schedule = nn.Linear(1, 3, bias=False)  # slopes in progress of the head's 3 outputs
        with torch.no_grad():  # small outputs at init: the operator starts as normalized momentum
            self.coord_out.weight.mul_(0.01)
            self.coord_out.bias.zero_()
            self.head[-1].weight.mul_(0.01)
            self.head[-1].bias.zero_()
            self.schedule.weight.zero_()
        self.register_buffer("beta_bias", torch.tensor(_logit(cfg.beta_init)))
        self.register_buffer("temperature_bias", torch.tensor(_logit((cfg.temperature_init - T_MIN) / (T_MAX - T_MIN))))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Weights saved before the ``schedule`` term existed keep its zero initialization (no slope)."""
        return super().load_state_dict({"schedule.weight": self.schedule.weight.detach().clone(), **state_dict}, strict, assign)


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
        return {
            "momenta": z(len(c.timescales), n),
            "h": z(c.layers, n, c.hidden),
            "c": z(c.layers, n, c.hidden),
            "beta": torch.sigmoid(self.net.beta_bias).to(ref),
            "temperature": (T_MIN + (T_MAX - T_MIN) * torch.sigmoid(self.net.temperature_bias)).to(ref),
            "scale": torch.ones((), device=ref.device, dtype=ref.dtype),
        }

    def kd(self, state: State) -> KDChoice:
        return KDChoice(state["beta"], state["temperature"])

    def step(self, params: Params, grads: Params, state: State, ctx: StepContext):
        names = list(params)
        sizes = [params[k].numel() for k in names]
        seg = _segments(sizes, params[names[0]].device)
        g = torch.cat([grads[k].reshape(-1) for k in names])
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        decay = torch.tensor(self.cfg.timescales, device=g.device, dtype=g.dtype)[:, None]
        momenta = decay * state["momenta"] + (1 - decay) * g
        m_hat = momenta / torch.sqrt(_per_tensor_mean(momenta**2, seg, len(sizes)) + 1e-16)
        features = torch.cat([
            (torch.log(g.abs() + 1e-30) / P).clamp(-1, 1)[None],
            (g * math.exp(P)).clamp(-1, 1)[None],
            m_hat,
            torch.full_like(g, ctx.progress)[None],
        ]).T  # N x n_inputs
        out, (h, c) = self.net.lstm(features[None], (state["h"], state["c"]))
        top = out[0]  # N x hidden
        coord = self.net.coord_out(top)
        direction = -m_hat[self.cfg.timescales.index(0.9) if 0.9 in self.cfg.timescales else 0] + coord[:, 0]
        magnitude = coord[:, 1].clamp(-5, 3)

        pooled = top.mean(0)
        loss = float(ctx.loss) if math.isfinite(float(ctx.loss)) else 0.0
        ratio = float(ctx.kd_loss) / (abs(float(ctx.ce_loss)) + 1e-8) if math.isfinite(float(ctx.kd_loss)) else 0.0
        globals_ = torch.tensor([ctx.progress, math.log(max(loss, 1e-8)), math.log1p(max(min(ratio, 1e4), 0.0))], device=g.device, dtype=g.dtype)
        o = self.net.head(torch.cat([pooled, globals_])) + self.net.schedule(globals_[:1])
        scale = torch.exp(o[2].clamp(-5, 5))
        shape = torch.exp(magnitude) * direction
        if self.cfg.normalize_update:
            shape = shape / torch.sqrt(_per_tensor_mean(shape[None] ** 2, seg, len(sizes))[0] + 1e-16)
        update = self.cfg.base_scale * scale * shape
        new_params = {k: params[k] + u.view_as(params[k]) for k, u in zip(names, update.split(sizes))}
        new_state = {
            "momenta": momenta,
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


# Ablations of a learned operator (``compare --operators ckpt:PATH@VARIANT``): what each removes.
VARIANTS = {
    "schedule-only": "the per-coordinate read-out (coord_out) zeroed: every coordinate's update is the designed prior -m_hat(0.9) "
                     "sized by the global head, which keeps its schedule (the LSTM still runs: its pooled state feeds the head)",
}


def ablated(operator: LSTMOperator, variant: str) -> LSTMOperator:
    """A copy of ``operator`` with the part ``variant`` names (a key of :data:`VARIANTS`) removed."""
    if variant not in VARIANTS:
        raise UserError(f"unknown operator variant {variant!r}: use one of {', '.join(VARIANTS)}")
    net = copy.deepcopy(operator.net)
    with torch.no_grad():
        net.coord_out.weight.zero_()
        net.coord_out.bias.zero_()
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


_SEG_CACHE: dict = {}


def _segments(sizes: list[int], device) -> torch.Tensor:
    key = (tuple(sizes), str(device))
    if key not in _SEG_CACHE:
        _SEG_CACHE[key] = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return _SEG_CACHE[key]


def _per_tensor_mean(x: torch.Tensor, seg: torch.Tensor, n_tensors: int) -> torch.Tensor:
    """For rows of ``x`` (K x N), the mean over the coordinates of each tensor, broadcast back to N."""
    sums = torch.zeros(x.shape[0], n_tensors, device=x.device, dtype=x.dtype).index_add(1, seg, x)
    counts = torch.zeros(n_tensors, device=x.device, dtype=x.dtype).index_add(0, seg, torch.ones_like(x[0]))
    return (sums / counts)[:, seg]


def _logit(p: float) -> float:
    return math.log(p / (1 - p))
