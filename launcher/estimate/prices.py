"""Instance prices: the table shipped in `data/prices.csv` (with its as-of date), or SkyPilot's
live catalog when SkyPilot is installed and its catalog can be read."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

PRICES_CSV = Path(__file__).parent / "data" / "prices.csv"


@dataclass(frozen=True)
class Offer:
    cloud: str
    region: str
    instance: str
    gpu: str
    gpus: int
    usd_per_hour: float
    spot_usd_per_hour: float | None
    source: str


@dataclass
class PriceTable:
    offers: list[Offer]
    as_of: str
    source: str


def load_prices(path: Path = PRICES_CSV) -> PriceTable:
    as_of = "unknown"
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            if line.startswith("# as_of:"):
                as_of = line.split(":", 1)[1].strip()
            continue
        lines.append(line)
    offers = []
    for row in csv.DictReader(lines):
        spot = row["spot_usd_per_hour"].strip()
        offers.append(Offer(row["cloud"], row["region"], row["instance"], row["gpu"], int(row["gpus"]),
                            float(row["usd_per_hour"]), float(spot) if spot else None, row["source"]))
    return PriceTable(offers, as_of, f"price table shipped with launcher ({path.name})")


# SkyPilot's accelerator names for the estimator's GPUs
_SKY_NAMES = {"H100-80GB": "H100", "H200-141GB": "H200", "A100-80GB": "A100-80GB", "A100-40GB": "A100",
              "L4-24GB": "L4", "A10G-24GB": "A10G", "V100-16GB": "V100", "V100-32GB": "V100-32GB"}


def live_prices() -> PriceTable | None:
    """Prices from SkyPilot's catalog, or None when SkyPilot is missing or cannot read it.
    Off when LAUNCHER_OFFLINE_PRICES=1."""
    if os.environ.get("LAUNCHER_OFFLINE_PRICES") == "1":
        return None
    try:
        import sky  # noqa: F401
        from sky import catalog as sky_catalog
    except Exception:
        return None
    offers: list[Offer] = []
    try:
        for ours, theirs in _SKY_NAMES.items():
            found = sky_catalog.list_accelerators(gpus_only=True, name_filter=theirs, case_sensitive=False,
                                                  clouds=["aws", "gcp", "azure", "lambda"], all_regions=False)
            for name, infos in found.items():
                if name.lower() != theirs.lower():
                    continue
                for i in infos:
                    if not i.price or i.price <= 0 or i.price >= 700:  # missing or placeholder prices
                        continue
                    spot = i.spot_price if i.spot_price and i.spot_price > 0 else None
                    offers.append(Offer(str(i.cloud), getattr(i, "region", "") or "", i.instance_type or "",
                                        ours, int(i.accelerator_count), float(i.price), spot, "skypilot-live"))
    except Exception:
        return None
    if not offers:
        return None
    from datetime import date

    return PriceTable(offers, date.today().isoformat(), "SkyPilot catalog (live)")
