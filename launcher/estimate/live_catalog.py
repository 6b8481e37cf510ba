"""Child process of `prices.live_prices`: SkyPilot's catalog offers for the estimator's GPUs as
one JSON object on stdout (`{"offers": [...], "as_of": ...}` or `{"error": ...}`).

Everything SkyPilot prints, from Python or native code, goes to stderr: the parent reads stdout
as JSON, and keeps its own stdout clean for `launcher estimate --json`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

from launcher.estimate.prices import Offer

# SkyPilot's accelerator names for the estimator's GPUs
SKY_NAMES = {"H100-80GB": "H100", "H200-141GB": "H200", "A100-80GB": "A100-80GB", "A100-40GB": "A100",
             "L4-24GB": "L4", "A10G-24GB": "A10G", "V100-16GB": "V100", "V100-32GB": "V100-32GB",
             "L40S-48GB": "L40S", "RTX-A6000-48GB": "A6000", "RTX4090-24GB": "RTX4090", "RTX3090-24GB": "RTX3090",
             "RTX5090-32GB": "RTX5090"}


def read_sky_catalog() -> dict:
    """The child's work: SkyPilot's offers for the estimator's GPUs, as a JSON-ready dict."""
    try:
        import sky  # noqa: F401
        from sky import catalog as sky_catalog
    except Exception:  # noqa: BLE001  (missing or broken install: the caller uses the shipped table)
        return {"error": "SkyPilot is not installed (pip install 'skypilot[aws]')"}
    offers: list[Offer] = []
    for ours, theirs in SKY_NAMES.items():
        found = sky_catalog.list_accelerators(gpus_only=True, name_filter=theirs, case_sensitive=False,
                                              clouds=["aws", "gcp", "azure", "lambda", "runpod"], all_regions=False)
        for name, infos in found.items():
            if name.lower() != theirs.lower():
                continue
            for i in infos:
                if not i.price or i.price <= 0 or i.price >= 700:  # missing or placeholder prices
                    continue
                spot = i.spot_price if i.spot_price and i.spot_price > 0 else None
                mem = getattr(i, "memory", None)
                offers.append(Offer(str(i.cloud), getattr(i, "region", "") or "", i.instance_type or "",
                                    ours, int(i.accelerator_count), float(i.price), spot, "skypilot-live",
                                    float(mem) if mem else None))
    from datetime import date

    return {"offers": [asdict(o) for o in offers], "as_of": date.today().isoformat()}


def main() -> None:
    # Keep the real stdout for the JSON alone: everything SkyPilot prints (Python or native) goes
    # to stderr from here on.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        data = read_sky_catalog()
    except Exception as e:  # noqa: BLE001  (offline, no credentials, ...: reported, not fatal)
        data = {"error": f"SkyPilot's catalog could not be read ({type(e).__name__}: {str(e)[:160]})"}
    out.write(json.dumps(data))
    out.flush()


if __name__ == "__main__":
    main()
