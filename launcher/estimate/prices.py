"""Instance prices: the table shipped in `data/prices.csv` (with its as-of date), or, when asked
for (`launcher estimate --live-prices`), SkyPilot's live catalog.

The live catalog is read in a child process with a timeout: SkyPilot may try the network for
every cloud and prints its progress and failures on stdout, which must stay clean for `--json`.
The child keeps its stdout for the offers alone and sends everything else to stderr, which the
parent drops (one note says why live prices were not used).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PRICES_CSV = Path(__file__).parent / "data" / "prices.csv"
LIVE_PRICES_TIMEOUT_S = 20.0
"""How long `--live-prices` waits for SkyPilot's catalog before using the shipped table
(LAUNCHER_LIVE_PRICES_TIMEOUT_S overrides)."""


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
    memory_gib: float | None = None
    """The instance's host RAM, GiB (None: unknown)."""


@dataclass
class PriceTable:
    offers: list[Offer]
    as_of: str
    source: str


def _float(text: str | None) -> float | None:
    text = (text or "").strip()
    return float(text) if text else None


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
        offers.append(Offer(row["cloud"], row["region"], row["instance"], row["gpu"], int(row["gpus"]),
                            float(row["usd_per_hour"]), _float(row["spot_usd_per_hour"]), row["source"],
                            _float(row.get("memory_gib"))))
    return PriceTable(offers, as_of, f"price table shipped with launcher ({path.name})")


def instance_memory_gib(gpu: str, gpus: int, clouds: list[str] | None = None) -> float | None:
    """Host RAM of the shipped table's instances with `gpus` x `gpu` (on `clouds`, lower case;
    empty: any): the smallest, since the cloud may pick any of them. None when none is known."""
    known = [o.memory_gib for o in load_prices().offers
             if o.gpu == gpu and o.gpus == gpus and o.memory_gib
             and (not clouds or o.cloud.lower() in clouds)]
    return min(known) if known else None


def live_prices(timeout_s: float | None = None) -> tuple[PriceTable | None, str | None]:
    """Prices from SkyPilot's catalog, read in a child process that gets `timeout_s` seconds
    (default LIVE_PRICES_TIMEOUT_S). Returns (table, None), or (None, why not) when SkyPilot is
    missing, slow or cannot read it. Off (None) when LAUNCHER_OFFLINE_PRICES=1."""
    if os.environ.get("LAUNCHER_OFFLINE_PRICES") == "1":
        return None, "LAUNCHER_OFFLINE_PRICES=1"
    if timeout_s is None:
        timeout_s = float(os.environ.get("LAUNCHER_LIVE_PRICES_TIMEOUT_S") or LIVE_PRICES_TIMEOUT_S)
    try:
        res = subprocess.run([sys.executable, "-m", "launcher.estimate.live_catalog"], capture_output=True,
                             text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"SkyPilot's catalog did not answer within {timeout_s:g} s"
    try:
        data = json.loads(res.stdout)
    except ValueError:
        data = None
    if res.returncode != 0 or not isinstance(data, dict):
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"SkyPilot's catalog could not be read ({last[:160]})"
    if data.get("error"):
        return None, data["error"]
    offers = [Offer(**o) for o in data["offers"]]
    if not offers:
        return None, "SkyPilot's catalog has no offers for these GPUs"
    return PriceTable(offers, data["as_of"], "SkyPilot catalog (live)"), None
