"""ZeRO stage 1/2 on disk (and bf16 + stage 1, whose files are named `bf16_zero_pp_rank_*`): one
`mp_rank_00_model_states.pt` (full bit16 `module`, `param_shapes` per optimizer group,
`shared_params`, `buffer_names`, frozen params) and, per data-parallel rank r,
`zero_pp_rank_{r}_mp_rank_00_optim_states.pt` with this rank's slice of each flat fp32 group
(`single_partition_of_fp32_groups[g]`), the matching `exp_avg`/`exp_avg_sq` in
`base_optimizer_state.state[g]`, and `param_slice_mappings[g][name] = (numel, start)`: which part
of which parameter lies where in the rank's slice (alignment padding included)."""

from __future__ import annotations

from pathlib import Path

from launcher.checkpoint.safe_load import safe_load
from launcher.checkpoint.zero_meta import Frag, Parsed, step_of
from launcher.errors import UserError


def parse(param_shapes: list[dict], first_optim: dict, optim_files: list[Path]) -> Parsed:
    frags: dict[str, list[Frag]] = {}
    groups: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for gi, sub in enumerate(param_shapes):
        for name, shape in sub.items():
            groups[name] = gi
            shapes[name] = tuple(int(x) for x in shape)
            frags[name] = []
    for r, f in enumerate(optim_files):
        rank_osd = first_optim if r == 0 else safe_load(f)["optimizer_state_dict"]
        mappings = rank_osd.get("param_slice_mappings")
        if mappings is None:
            raise UserError(f"{f}: no param_slice_mappings (written by DeepSpeed < 0.10?): not supported")
        for gi, mapping in enumerate(mappings):
            for name, addr in mapping.items():
                got = frags.setdefault(name, [])
                dest = sum(x.numel for x in got)
                got.append(Frag(r, gi, int(addr.start), int(addr.numel), dest))
        del rank_osd
    optimizer_step = step_of(first_optim["base_optimizer_state"].get("state", {}))
    return Parsed(shapes, groups, frags, optimizer_step, len(optim_files))


def flat(osd: dict, key: str, group: int):
    """A rank's flat tensor `group` of `key` ('fp32' or an Adam state key)."""
    if key == "fp32":
        return osd["single_partition_of_fp32_groups"][group]
    return osd["base_optimizer_state"]["state"][group][key]
