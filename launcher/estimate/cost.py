"""Dollar cost: GPU-hours x price per offer, on-demand and spot (with expected preemption losses),
and on-prem clusters at their $/GPU-hour."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from launcher.estimate.prices import Offer

PREEMPTIONS_PER_INSTANCE_HOUR = 0.05
"""Assumed spot preemption rate: one interruption per 20 instance-hours."""
RESTART_MINUTES = 10.0
"""Time to get a replacement instance, restart and load the last checkpoint."""


@dataclass
class CostRow:
    cloud: str
    region: str
    instance: str
    gpu: str
    gpus: int
    instances: int
    spot: bool
    usd_per_hour: float
    hours: float
    total_usd: float
    fits: bool | None
    source: str
    cheapest: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"cloud": self.cloud, "region": self.region, "instance": self.instance, "gpu": self.gpu,
                "gpus": self.gpus, "instances": self.instances, "spot": self.spot,
                "usd_per_hour": round(self.usd_per_hour, 4),
                "hours": round(self.hours, 3) if math.isfinite(self.hours) else None,
                "total_usd": round(self.total_usd, 2) if math.isfinite(self.total_usd) else None, "fits": self.fits, "source": self.source,
                "cheapest_that_fits": self.cheapest}


def instances_for(offer: Offer, nodes: int, gpus_per_node: int) -> int | None:
    """Instances of `offer` that give the layout its GPUs per node, or None if it cannot."""
    if offer.gpus == gpus_per_node:
        return nodes
    if offer.gpus > gpus_per_node and offer.gpus % gpus_per_node == 0:
        return math.ceil(nodes * gpus_per_node / offer.gpus)
    return None


def spot_hours(hours: float, instances: int, checkpoint_every_h: float | None, *,
               rate: float = PREEMPTIONS_PER_INSTANCE_HOUR, restart_min: float = RESTART_MINUTES) -> float:
    """Expected wall hours on spot: each preemption (rate per instance-hour) loses the work since
    the last checkpoint (half an interval on average; half the run without checkpoints) plus a
    restart. Infinite when preemptions come faster than the lost work can be redone."""
    lost = (checkpoint_every_h / 2 if checkpoint_every_h else hours / 2) + restart_min / 60
    per_hour = rate * instances * lost
    return hours / (1 - per_hour) if per_hour < 1 else math.inf


def cost_rows(offers: list[Offer], *, nodes: int, gpus_per_node: int, hours_for: Any, fits_for: Any,
              checkpoint_every_steps: int, step_time_for: Any,
              preemption_rate: float = PREEMPTIONS_PER_INSTANCE_HOUR,
              restart_minutes: float = RESTART_MINUTES) -> list[CostRow]:
    """One on-demand and one spot row per offer that matches the layout, those that fit first, each
    group by total cost. `hours_for(gpu)` and `step_time_for(gpu)` give the GPU type's estimates,
    `fits_for(offer)` whether the offer's GPUs and host RAM hold the layout."""
    rows: list[CostRow] = []
    for o in offers:
        n = instances_for(o, nodes, gpus_per_node)
        if n is None:
            continue
        hours = hours_for(o.gpu)
        if hours is None:
            continue
        fits = fits_for(o)
        per_hour = n * o.usd_per_hour
        rows.append(CostRow(o.cloud, o.region, o.instance, o.gpu, n * o.gpus, n, False, per_hour, hours,
                            per_hour * hours, fits, o.source))
        if o.spot_usd_per_hour is not None:
            ckpt_h = checkpoint_every_steps * step_time_for(o.gpu) / 3600 if checkpoint_every_steps else None
            sh = spot_hours(hours, n, ckpt_h, rate=preemption_rate, restart_min=restart_minutes)
            sp = n * o.spot_usd_per_hour
            rows.append(CostRow(o.cloud, o.region, o.instance, o.gpu, n * o.gpus, n, True, sp, sh, sp * sh,
                                fits, o.source))
    return mark_cheapest(rows)


def onprem_row(name: str, gpu: str, gpus: int, usd_per_gpu_hour: float, hours: float, fits: bool | None) -> CostRow:
    per_hour = usd_per_gpu_hour * gpus
    return CostRow("on-prem", name, gpu, gpu, gpus, 1, False, per_hour, hours, per_hour * hours, fits,
                   "cluster profile")


def mark_cheapest(rows: list[CostRow]) -> list[CostRow]:
    """Sort what fits (or may: unknown GPUs) first, each group by total cost; mark the cheapest
    that fits."""
    rows.sort(key=lambda r: (r.fits is False, r.total_usd, r.cloud, r.instance, r.spot))
    for r in rows:
        r.cheapest = False
    for r in rows:
        if r.fits and math.isfinite(r.total_usd):
            r.cheapest = True
            break
    return rows
