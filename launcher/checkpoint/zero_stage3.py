"""ZeRO stage 3 on disk: per rank a `zero_pp_rank_{r}_mp_rank_00_model_states.pt` (placeholders
in `module`, `param_shapes` per optimizer sub-group) and an optim file with `fp32_flat_groups[s]`
and `optimizer_state_dict.state[s]`; every parameter of sub-group s is cut into
ceil(numel / world) elements per rank, the last rank's part zero-padded."""

from __future__ import annotations

from pathlib import Path

from launcher.checkpoint.zero_meta import Frag, Parsed, numel, step_of
from launcher.errors import UserError


def parse(param_shapes: list[dict], first_optim: dict, optim_files: list[Path]) -> Parsed:
    world = len(optim_files)
    frags: dict[str, list[Frag]] = {}
    groups: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    # sub-group s belongs to the optimizer group whose 'params' lists s
    sub_to_group = {}
    for gi, g in enumerate(first_optim["optimizer_state_dict"]["param_groups"]):
        for s in g["params"]:
            sub_to_group[s] = gi
    flat_sizes = [t.numel() for t in first_optim["fp32_flat_groups"]]
    for s, sub in enumerate(param_shapes):
        offset = 0
        for name, shape in sub.items():
            n = numel(shape)
            part = -(-n // world)
            frags[name] = [
                Frag(r, s, offset, max(0, min(part, n - r * part)), r * part)
                for r in range(world)
                if n - r * part > 0
            ]
            offset += part
            groups[name] = sub_to_group.get(s, s)
            shapes[name] = tuple(int(x) for x in shape)
        if offset > flat_sizes[s]:
            raise UserError(
                f"{optim_files[0]}: sub-group {s} holds {flat_sizes[s]} elements but its "
                f"parameters need {offset}: the checkpoint does not match its metadata"
            )
    optimizer_step = step_of(first_optim["optimizer_state_dict"].get("state", {}))
    return Parsed(shapes, groups, frags, optimizer_step, world)


def flat(osd: dict, key: str, group: int):
    """A rank's flat tensor `group` of `key` ('fp32' or an Adam state key)."""
    if key == "fp32":
        return osd["fp32_flat_groups"][group]
    return osd["optimizer_state_dict"]["state"][group][key]
