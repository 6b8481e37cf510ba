"""Plain-text report of an estimate (what `launcher estimate` prints)."""

from __future__ import annotations

import math

from launcher.estimate.hardware import GiB

MAX_COST_ROWS = 12


def gib(n: float) -> str:
    return f"{n / GiB:,.2f}"


def _hours(h: float) -> str:
    if not math.isfinite(h):
        return "never"
    if h < 1:
        return f"{h * 60:.0f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:.1f} days"


def _verdict(est) -> str:  # noqa: ANN001
    per, cap = est.memory.per_gpu["total"], est.capacity
    if est.fits is None:
        return "verdict  no GPU named: pass --gpu to check the fit"
    if est.fits:
        return f"verdict  fits, with {gib(cap - per)} GiB to spare per GPU"
    short = []
    if not est.gpu_fits:
        short.append(f"short by {gib(per - cap)} GiB per GPU")
    if not est.host_fits:
        short.append(f"host RAM short by {gib(est.memory.cpu_per_node - est.host_memory_bytes)} GiB per node")
    return "verdict  does NOT fit: " + "; ".join(short)


def _suggestion_lines(est) -> list[str]:  # noqa: ANN001
    if not est.suggestions:
        return ["no layout in the search fits (ZeRO 0-3, offload, checkpointing, micro-batch, up to 64 nodes): "
                "a larger GPU (--gpu) or a shorter data.max_seq_len"]
    out = ["cheapest layouts that fit (each re-estimated; --apply N writes one as a recipe):"]
    for i, x in enumerate(est.suggestions, 1):
        speed = f"step {x.step_time_s:,.2f} s" if x.step_time_s is not None else ""
        if x.total_hours is not None:
            speed += f", {_hours(x.total_hours)}"
        if x.total_usd is not None:
            speed += f", ${x.total_usd:,.0f}"
        elif x.usd_per_million_tokens is not None:
            speed += f", ${x.usd_per_million_tokens:,.2f} per million tokens"
        if x.slow:
            speed += f" ({x.slowdown:,.0f}x slower)"
        out.append(f"  {i:>2}. {gib(x.per_gpu_total_bytes):>8} GiB/GPU {gib(x.cpu_bytes_per_node):>9} GiB host  {speed}")
        out.append(f"      {x.description}")
        out.append(f"      {x.change}")
    return out


def _host_line(est) -> str:  # noqa: ANN001
    line = f"CPU memory per node: {gib(est.memory.cpu_per_node)} GiB"
    if est.host_memory_bytes is not None:
        line += f" of {gib(est.host_memory_bytes)} GiB host RAM ({est.host_memory_source})"
        if est.host_fits is False:
            line += ": does NOT fit"
    return line


def _cost_lines(est) -> list[str]:  # noqa: ANN001
    out = ["", f"cost     prices as of {est.prices_as_of} ({est.prices_source}); spot includes expected "
           "preemption losses; what fits first",
           f"  {'cloud':8} {'region':12} {'instance':26} {'GPUs':>4}  {'':4} {'$/hour':>9} {'hours':>8} "
           f"{'total $':>11}"]
    for c in est.costs[:MAX_COST_ROWS]:
        fit = "  (does not fit)" if c.fits is False else ""
        mark = "  <- cheapest that fits" if c.cheapest else ""
        hours = f"{c.hours:,.1f}" if math.isfinite(c.hours) else "never"
        total = "-" if not math.isfinite(c.total_usd) else (
            f"{c.total_usd:,.0f}" if c.total_usd >= 100 else f"{c.total_usd:,.2f}")
        out.append(f"  {c.cloud:8} {c.region:12} {c.instance:26} {c.gpus:>4}  {'spot' if c.spot else '':4} "
                   f"{c.usd_per_hour:>9,.2f} {hours:>8} {total:>11}{fit}{mark}")
    if len(est.costs) > MAX_COST_ROWS:
        out.append(f"  ({len(est.costs) - MAX_COST_ROWS} more rows in --json)")
    return out


def _trace_lines(est) -> list[str]:  # noqa: ANN001
    """The traced peak per category beside the analytic one, and the phase of each peak."""
    tr = est.trace
    traced, per = tr["traced_per_gpu_bytes"], est.memory.per_gpu
    out = ["", f"trace    one step under FakeTensorMode ({tr['trace_seconds']:.0f} s): peak in "
           f"{tr['traced_peak_phase']} (analytic: {tr['analytic_peak_phase']})",
           f"  {'GiB per GPU':14}{'analytic':>10}{'traced':>10}{'diff':>9}"]
    for k in ("params", "grads", "optimizer", "activations", "buffers", "overhead", "total"):
        diff = f"{(per[k] - traced[k]) / traced[k]:+.1%}" if traced[k] else ""
        note = "  (analytic: a fake run has none)" if k == "buffers" else (
            "  (CUDA context analytic)" if k == "overhead" else "")
        out.append(f"  {k:14}{gib(per[k]):>10}{gib(traced[k]):>10}{diff:>9}{note}")
    return out


def format_estimate(est) -> str:  # noqa: ANN001  (launcher.estimate.estimator.Estimate)
    s, lay, mem = est.shape, est.layout, est.memory
    out: list[str] = []
    w = out.append
    w(f"estimate for {est.title or 'recipe ' + est.recipe_name}")
    w(f"model    {est.model}: {s.total:,} parameters ({s.num_layers} layers of {s.per_layer:,}; "
      f"embeddings {s.embeddings:,}; largest module {s.largest_module:,})")
    gpu = f" {est.gpu.name}" if est.gpu else " workers"
    w(f"layout   {lay.describe().replace(' GPU(s)', gpu, 1)}; data-parallel {lay.data_parallel}")
    m = est.method
    if m is not None and not m.full:
        w(f"method   {m.method}: {m.trainable:,} trainable parameters ({m.adapters:,} in rank-{m.rank} adapters), "
          f"frozen base {m.base_16bit + m.quantized:,}" + (f" ({m.quantized:,} of them in 4 bits)" if m.quantized else ""))
    w("")
    width = max(len(r.name) for r in mem.rows) + 2
    w(f"memory per GPU{'':{width - 14}}      GiB")
    for r in mem.rows:
        w(f"  {r.name:{width}}{gib(r.bytes):>9}{'  *' if r.deepspeed else ''}")
    per = mem.per_gpu
    cap = est.capacity
    w(f"  {'total':{width}}{gib(per['total']):>9}" + (f"  of {gib(cap)} GiB on {est.gpu.name}" if cap else ""))
    if mem.deepspeed_gpu or mem.deepspeed_cpu:
        w(f"  * DeepSpeed's model-states estimate: {gib(mem.deepspeed_gpu)} GiB per GPU, "
          f"{gib(mem.deepspeed_cpu)} GiB CPU per node; the other rows are what it leaves out")
    else:  # LoRA/QLoRA: DeepSpeed's estimator functions know no frozen parameters
        w("  (frozen base: DeepSpeed's estimator functions do not cover it; every row is the launcher's)")
    w(_verdict(est))
    if est.trace:
        out += _trace_lines(est)
    if est.suggestions or est.fits is False:
        out += _suggestion_lines(est)
    w("")
    w(_host_line(est))
    for r in mem.cpu_rows:
        w(f"  {r.name:{width}}{gib(r.bytes):>9}{'  *' if r.deepspeed else ''}")
    if mem.nvme_bytes_per_node:
        w(f"  NVMe per node: {gib(mem.nvme_bytes_per_node)} GiB")
    t = est.time
    if t is not None:
        w("")
        w(f"time     {t.flops_per_token / 1e9:,.1f} GFLOP/token"
          + (" (incl. recompute)" if lay.grad_ckpt else "")
          + f" x {t.tokens_per_step:,} tokens/step at {t.mfu:.0%} of {est.gpu.peak_tflops:g} TFLOP/s "
          f"({t.mfu_source}; --mfu)")
        line = f"         step {t.step_time_s:,.2f} s (compute {t.compute_s:,.2f} s"
        if t.comm_bytes_per_gpu:
            line += f", communication {t.comm_s:,.2f} s for {t.comm_bytes_per_gpu / 1e9:,.1f} GB/GPU"
        line += f"), {t.tokens_per_s:,.0f} tokens/s"
        w(line)
        if t.bubble:
            w(f"         pipeline bubble {t.bubble:.0%}")
        if t.steps is not None:
            w(f"         {t.steps:,} steps ({est.examples_source}), {t.total_tokens:,} tokens: "
              f"{_hours(t.total_hours)} wall, {t.total_hours * lay.world:,.0f} GPU-hours")
    if est.costs:
        out += _cost_lines(est)
    if est.calibration:
        c = est.calibration
        w("")
        w(f"calibration ({c['steps']} measured steps on {c['world_size']} worker(s), {c['device']})")
        w(f"  step time   estimated {c['estimated_step_time_s']:.3f} s   measured {c['measured_step_time_s']:.3f} s"
          f"   -> efficiency {c['measured_mfu']:.1%}" if c.get("measured_mfu") is not None else
          f"  step time   measured {c['measured_step_time_s']:.3f} s")
        if c.get("measured_peak_memory_bytes") is not None:
            w(f"  peak memory estimated {gib(c['estimated_peak_bytes'])} GiB   measured "
              f"{gib(c['measured_peak_memory_bytes'])} GiB ({c['peak_memory_kind']})")
        else:
            w("  peak memory not recorded by this runtime (summary.json has no peak_memory_bytes)")
        if c.get("rescaled_total_hours") is not None:
            w(f"  rescaled    {_hours(c['rescaled_total_hours'])} wall with the measured efficiency")
    for x in est.warnings:
        w(f"warning: {x}")
    for x in est.notes:
        w(f"note: {x}")
    return "\n".join(out) + "\n"
