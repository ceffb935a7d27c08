"""A learned per-step baseline ``V(x_k, k)`` for the likelihood-ratio terms (``estimator.baseline: value``).

A likelihood-ratio term of step k weights ``⟨∇μ_θ(x_k), ε_k⟩/σ_k`` by an advantage ``G^(k) − b``. Any ``b``
that does not depend on the step's own action ``ε_k`` given ``x_k`` leaves the estimate unbiased, and the
best such ``b`` is ``E[G^(k) | x_k]``: the part of the reward the state already decides — most of it near the
end of the chain — is then taken out of the weight. The group baseline (leave-one-out over the other samples
of the prompt) only takes out the part the prompt decides.

:class:`ValueBaseline` is a small MLP on pooled features of the recorded state and a one-hot of its step,
trained on the returns seen (a replay buffer of the last ``buffer`` records) *after* each iteration, so the
baseline of a sample never saw that sample's reward. The advantage becomes the configured group baseline of
the residuals, ``A = adv(G^(k) − V(x_k, k))`` (leave-one-out of ``G − V``), unbiased whatever V's quality.
A step uses V only while V's out-of-sample skill there (measured on each iteration's new records before
training on them: ``1 − SS(residuals)/SS(returns)``, both centred, decayed sums) is above ``min_skill`` —
early steps, whose state says little about the reward, keep the group baseline.

Every learner records the states and returns of its own chunks (:meth:`take`), the records of all learners
are gathered and every learner fits the same V on them in one canonical order (:meth:`fit`), so learners stay
identical and equal to the single-process loop. The state (weights, optimiser, buffer, skill) goes into checkpoints as base64 text.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rlr_dist.config import check


@dataclass
class ValueConfig:
    """hidden: width of the MLP's two hidden layers; steps / batch / lr: Adam steps (minibatch size, learning
    rate) per iteration on the buffer; buffer: records kept (the most recent); grid: image latents are
    average-pooled to at most grid × grid (video: grid × grid × grid) per channel; min_skill: a step uses V only
    while its out-of-sample skill is above this; decay: of the skill's sums per iteration; seed: of V's
    initial weights and minibatches."""

    hidden: int = 64
    steps: int = 50
    batch: int = 256
    lr: float = 1e-3
    buffer: int = 4096
    grid: int = 8
    min_skill: float = 0.0
    decay: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden", "steps", "batch", "buffer", "grid"):
            check(getattr(self, name) >= 1, f"value.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.lr > 0, "value.lr", f"must be > 0, got {self.lr}")
        check(self.min_skill < 1, "value.min_skill", f"must be < 1, got {self.min_skill}")
        check(0 <= self.decay < 1, "value.decay", f"must be in [0, 1), got {self.decay}")


def value_features(x: Tensor, grid: int) -> Tensor:
    """``(B, F)`` float32 features of states ``x``: vectors as they are; image latents ``(B, C, H, W)``
    average-pooled to at most ``grid × grid``; video ``(B, C, F, H, W)`` to at most ``grid³``; token latents
    ``(B, L, D)`` pooled over the tokens to at most ``grid²``."""
    x = x.detach().float()
    if x.dim() == 4:
        x = F.adaptive_avg_pool2d(x, (min(x.shape[2], grid), min(x.shape[3], grid)))
    elif x.dim() == 5:
        x = F.adaptive_avg_pool3d(x, tuple(min(s, grid) for s in x.shape[2:]))
    elif x.dim() == 3:
        x = F.adaptive_avg_pool1d(x.transpose(1, 2), min(x.shape[1], grid * grid))
    return x.flatten(1)


class ValueBaseline:
    def __init__(self, cfg: ValueConfig) -> None:
        self.cfg = cfg
        self.net: torch.nn.Module | None = None  # built on the first fit (input size from the records)
        self.opt: torch.optim.Optimizer | None = None
        self.T: int | None = None
        self.buf: tuple[Tensor, Tensor, Tensor] | None = None  # features, step, return
        self.ss_res: dict[int, float] = {}
        self.ss_tot: dict[int, float] = {}
        self.fits = 0
        self.y_mean, self.y_std = 0.0, 1.0
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self._n_pending = 0

    # ------------------------------------------------------------------ use
    def skill(self, k: int) -> float | None:
        """Out-of-sample skill at step k (``None``: not measured yet)."""
        tot = self.ss_tot.get(k, 0.0)
        return None if tot <= 0 else 1.0 - self.ss_res.get(k, 0.0) / tot

    def usable(self, k: int) -> bool:
        s = self.skill(k)
        return self.net is not None and s is not None and s > self.cfg.min_skill

    @torch.no_grad()
    def predict(self, feats: Tensor, k: Tensor) -> Tensor:
        """``V`` at features ``feats`` (B, F) of the states of steps ``k`` (B,), float64."""
        out = self.net(self._inputs(feats, k)).squeeze(1)
        return out.double() * self.y_std + self.y_mean

    def _inputs(self, feats: Tensor, k: Tensor) -> Tensor:
        """The MLP's input: the features and a one-hot of the step."""
        return torch.cat([feats, F.one_hot(k.clamp(0, self.T), self.T + 1).float()], 1)

    def baseline(self, x: Tensor, k: int, target: Tensor, T: int) -> Tensor | None:
        """Record ``(x_k, k, G^(k))`` for the next fit (``T``: the chain's steps); return ``V(x_k, k)`` (float64,
        on ``x``'s device) when step k uses it, else ``None``."""
        if self.net is None:
            self.T = T
        feats = value_features(x, self.cfg.grid).cpu()
        ks = torch.full((x.shape[0],), k, dtype=torch.long)
        self._pending.append((feats, ks, target.detach().double().cpu()))
        self._n_pending += len(ks)
        while self._n_pending > self.cfg.buffer:  # never taken (e.g. a test harness): keep the newest
            self._n_pending -= len(self._pending.pop(0)[1])
        if not self.usable(k) or feats.shape[1] + self.T + 1 != self.net[0].in_features:
            return None
        return self.predict(feats, ks).to(x.device)

    # ------------------------------------------------------------------ learn
    def take(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """This process's records since the last call (and forget them)."""
        if not self._pending:
            return None
        out = tuple(torch.cat(parts) for parts in zip(*self._pending))
        self._pending, self._n_pending = [], 0
        return out

    def fit(self, records: list[tuple[Tensor, Tensor, Tensor]]) -> dict[str, float]:
        """Measure V's skill on ``records`` (new: V has not seen them), then train on the buffer with them added.
        Returns ``value/skill`` (mean over the steps measured), ``value/steps_used`` and ``value/loss``."""
        records = [r for r in records if r is not None]
        if not records:
            return {}
        feats, ks, ys = (torch.cat(parts) for parts in zip(*records))
        # one order whatever the layout (learners hold chunks round-robin): by step, return, first feature
        order = torch.sort(feats[:, 0], stable=True).indices
        order = order[torch.sort(ys[order], stable=True).indices]
        order = order[torch.sort(ks[order], stable=True).indices]
        feats, ks, ys = feats[order], ks[order], ys[order]
        if self.net is None:
            self._build(feats.shape[1], max(self.T or 0, int(ks.max())))
        else:
            self._measure(feats, ks, ys)
        if self.buf is None:
            self.buf = (feats, ks, ys)
        else:
            self.buf = tuple(torch.cat([a, b])[-self.cfg.buffer:] for a, b in zip(self.buf, (feats, ks, ys)))
        loss = self._train()
        skills = [s for k in sorted(self.ss_tot) if (s := self.skill(k)) is not None]
        return {"value/loss": loss, "value/skill": sum(skills) / len(skills) if skills else float("nan"),
                "value/steps_used": float(sum(self.usable(k) for k in self.ss_tot))}

    def _build(self, n_in: int, T: int) -> None:
        c = self.cfg
        g = torch.Generator().manual_seed(c.seed)
        self.T = T
        self.net = torch.nn.Sequential(torch.nn.Linear(n_in + T + 1, c.hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(c.hidden, c.hidden), torch.nn.SiLU(), torch.nn.Linear(c.hidden, 1))
        with torch.no_grad():
            for p in self.net.parameters():
                bound = 1.0 / max(p.shape[-1], 1) ** 0.5
                p.uniform_(-bound, bound, generator=g)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=c.lr, weight_decay=1e-4)

    def _measure(self, feats: Tensor, ks: Tensor, ys: Tensor) -> None:
        res = ys - self.predict(feats, ks)
        d = self.cfg.decay
        for k in ks.unique().tolist():
            m = ks == k
            if int(m.sum()) < 2:
                continue
            self.ss_res[k] = d * self.ss_res.get(k, 0.0) + float((res[m] - res[m].mean()).pow(2).sum())
            self.ss_tot[k] = d * self.ss_tot.get(k, 0.0) + float((ys[m] - ys[m].mean()).pow(2).sum())

    def _train(self) -> float:
        c = self.cfg
        feats, ks, ys = self.buf
        self.y_mean, self.y_std = float(ys.mean()), max(float(ys.std()) if len(ys) > 1 else 1.0, 1e-6)
        x = self._inputs(feats, ks)
        y = ((ys - self.y_mean) / self.y_std).float()
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + self.fits)
        self.fits += 1
        total = 0.0
        with torch.enable_grad():
            for _ in range(c.steps):
                idx = torch.randint(0, len(y), (min(c.batch, len(y)),), generator=g)
                loss = (self.net(x[idx]).squeeze(1) - y[idx]).pow(2).mean()
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                total += float(loss.detach())
        return total / c.steps

    # ------------------------------------------------------------------ checkpoints (JSON-safe)
    def state_dict(self) -> dict:
        if self.net is None:
            return {}
        blob = io.BytesIO()
        torch.save({"net": self.net.state_dict(), "opt": self.opt.state_dict(), "buf": self.buf,
                    "n_in": self.net[0].in_features - self.T - 1}, blob)
        return {"T": self.T, "fits": self.fits, "y": [self.y_mean, self.y_std],
                "ss_res": {str(k): v for k, v in self.ss_res.items()}, "ss_tot": {str(k): v for k, v in self.ss_tot.items()},
                "blob": base64.b64encode(blob.getvalue()).decode("ascii")}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        tensors = torch.load(io.BytesIO(base64.b64decode(state["blob"])), weights_only=True)
        self._build(tensors["n_in"], int(state["T"]))
        self.net.load_state_dict(tensors["net"])
        self.opt.load_state_dict(tensors["opt"])
        self.buf = tuple(tensors["buf"])
        self.fits = int(state["fits"])
        self.y_mean, self.y_std = (float(v) for v in state["y"])
        self.ss_res = {int(k): float(v) for k, v in state["ss_res"].items()}
        self.ss_tot = {int(k): float(v) for k, v in state["ss_tot"].items()}
