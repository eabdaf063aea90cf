"""Effective-learning-rate telemetry of an lvopt optimizer (``track=True``).

With ``track=True`` every step's kernels also sum, per tensor, ``||W||^2`` (W before the step)
and ``||dW||^2`` in the pass they already make (fp64, deterministic order), and the optimizer
keeps them as :attr:`lvopt.AdamW.telemetry`, a :class:`Telemetry`. The effective learning rate
of a tensor is ``||dW|| / ||W||``, the step size in normalised weight space
(docs/design.md section 2.5):

* AdamW tensors: ``dW = W_after - W_before`` as stored (bf16 parameters: after rounding).
* AdamH hyperball matrices: ``dW = -lr * R * u/||u||``, the step on the tangent plane before
  the retraction to radius R (docs/design.md section 2.2), so ``||dW|| = lr * R`` and the effective LR
  equals the scheduled LR by construction; ``||W||`` is measured (it equals R to fp32 rounding).
* Row-sparse tables: the sums run over the rows the step writes (the touched rows; in exact
  mode ``dW`` includes their catch-up of skipped steps), not the whole table, whose other
  rows the step does not read.

Aggregates per param group and per role (groups built by :func:`lvopt.scaling.from_model`
carry a ``"role"`` key) add the squared norms: ``||W_group|| = sqrt(sum ||W_i||^2)``, and the
group's effective LR is ``||dW_group|| / ||W_group||``.

Hooks (:meth:`lvopt.AdamW.register_telemetry_hook`) receive ``(optimizer, telemetry)`` after
every tracked step; :class:`CSVLogger` and :class:`TensorBoardLogger` are ready-made ones.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

FIELDS = ("step", "scope", "key", "group", "index", "name", "role", "kind", "w_norm", "dw_norm", "eff_lr")


@dataclass(frozen=True)
class Entry:
    """Which tensor a telemetry row describes."""

    group: int
    index: int
    name: str | None
    role: str | None
    kind: str  # "adamw", "adamh" or "sparse"


def _row(w_sq: float, dw_sq: float) -> dict:
    w, dw = math.sqrt(max(w_sq, 0.0)), math.sqrt(max(dw_sq, 0.0))
    return {"w_norm": w, "dw_norm": dw, "eff_lr": dw / w if w > 0.0 else float("nan")}


class Telemetry:
    """One step's norms: ``sums`` is an fp64 ``[k, 2]`` tensor of (||W||^2, ||dW||^2) for the
    tensors ``entries`` names. Host conversion happens on first access (on a GPU, reading the
    sums synchronises; the step itself does not)."""

    def __init__(self, step: int, entries: list[Entry], sums: Tensor):
        self.step = step
        self.entries = entries
        self._sums = sums
        self._host: list[tuple[float, float]] | None = None

    def _values(self) -> list[tuple[float, float]]:
        if self._host is None:
            self._host = [tuple(r) for r in self._sums.detach().to("cpu", torch.float64).tolist()]
        return self._host

    def per_tensor(self) -> list[dict]:
        """One dict per tracked tensor: group, index, name, role, kind, w_norm, dw_norm, eff_lr."""
        return [
            {"group": e.group, "index": e.index, "name": e.name, "role": e.role, "kind": e.kind, **_row(w, d)}
            for e, (w, d) in zip(self.entries, self._values())
        ]

    def _aggregate(self, key: Callable[[Entry], object]) -> dict:
        acc: dict = {}
        for e, (w, d) in zip(self.entries, self._values()):
            a = acc.setdefault(key(e), [0.0, 0.0])
            a[0] += w
            a[1] += d
        return {k: _row(w, d) for k, (w, d) in acc.items()}

    def per_group(self) -> dict:
        """{group index: {w_norm, dw_norm, eff_lr}} over the group's tracked tensors."""
        return self._aggregate(lambda e: e.group)

    def per_role(self) -> dict:
        """{role: {w_norm, dw_norm, eff_lr}}; tensors of groups without a role count as None."""
        return self._aggregate(lambda e: e.role)

    def rows(self) -> Iterable[dict]:
        """Flat records (FIELDS) for loggers: tensors, then groups, then roles."""
        for r in self.per_tensor():
            key = r["name"] if r["name"] is not None else f"g{r['group']}.p{r['index']}"
            yield {"step": self.step, "scope": "tensor", "key": key, **r}
        for g, r in self.per_group().items():
            yield {
                "step": self.step,
                "scope": "group",
                "key": f"group{g}",
                "group": g,
                "index": None,
                "name": None,
                "role": None,
                "kind": None,
                **r,
            }
        for role, r in self.per_role().items():
            yield {
                "step": self.step,
                "scope": "role",
                "key": str(role),
                "group": None,
                "index": None,
                "name": None,
                "role": role,
                "kind": None,
                **r,
            }

    def __repr__(self) -> str:
        groups = ", ".join(f"{g}: {r['eff_lr']:.3g}" for g, r in self.per_group().items())
        return f"Telemetry(step={self.step}, tensors={len(self.entries)}, eff_lr per group={{{groups}}})"


class CSVLogger:
    """A telemetry hook that appends every step's rows (FIELDS) to a CSV file.

    ``scopes`` selects which rows to write ("tensor", "group", "role")."""

    def __init__(self, path: str | os.PathLike, scopes: Iterable[str] = ("tensor", "group", "role")):
        self.path = os.fspath(path)
        self.scopes = set(scopes)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=FIELDS)
        if self._file.tell() == 0:
            self._writer.writeheader()

    def __call__(self, optimizer, telemetry: Telemetry) -> None:
        for r in telemetry.rows():
            if r["scope"] in self.scopes:
                self._writer.writerow(r)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger:
    """A telemetry hook writing ``eff_lr``, ``w_norm`` and ``dw_norm`` scalars per group and
    per role (and per tensor if ``per_tensor``) to a ``torch.utils.tensorboard.SummaryWriter``
    (given, or created on ``log_dir``; needs the ``tensorboard`` package)."""

    def __init__(self, writer=None, log_dir: str | None = None, per_tensor: bool = False, prefix: str = "lvopt"):
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter  # needs `pip install tensorboard`

            writer = SummaryWriter(log_dir=log_dir)
        self.writer = writer
        self.per_tensor = per_tensor
        self.prefix = prefix

    def __call__(self, optimizer, telemetry: Telemetry) -> None:
        for r in telemetry.rows():
            if r["scope"] == "tensor" and not self.per_tensor:
                continue
            for field in ("eff_lr", "w_norm", "dw_norm"):
                self.writer.add_scalar(f"{self.prefix}/{field}/{r['scope']}/{r['key']}", r[field], telemetry.step)
