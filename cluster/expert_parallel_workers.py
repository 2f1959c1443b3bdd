"""`ExpertParallelWorkers`: a cluster's `expert_parallel` setting, which worker slots run as groups.

An expert-parallel group is one cluster worker (roles/worker.py). `roles` names the roles whose
slots start as groups: `{"size": 2, "roles": ["decode"]}` gives plain prefill workers and decode
groups. A slot keeps what it started as: a group switched to prefill stays a group, a plain
worker switched to decode stays plain, and a restart brings back the same kind (the slot decides,
not the role it has when it dies). Light (no torch, no Ray): the schema reads it.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any

from pdserve.engine.expert_parallel.config import ExpertParallelConfig
from pdserve.roles.messages import ROLES


@dataclass(frozen=True)
class ExpertParallelWorkers:
    """The group every expert-parallel worker runs (`group`) and the roles whose slots run one."""

    group: ExpertParallelConfig = field(default_factory=ExpertParallelConfig)
    roles: tuple[str, ...] = ROLES

    def __post_init__(self) -> None:
        roles = self.roles
        if isinstance(roles, str) or not isinstance(roles, list | tuple) or not roles:
            raise ValueError(
                f"expert_parallel.roles must be a non-empty list of {', '.join(ROLES)}, got {roles!r}"
            )
        for role in roles:
            if role not in ROLES:
                close = difflib.get_close_matches(str(role), ROLES, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"expert_parallel.roles: unknown role {role!r}{hint}; roles are {', '.join(ROLES)}"
                )
        if len(set(roles)) != len(roles):
            raise ValueError(f"expert_parallel.roles lists a role twice: {list(roles)!r}")
        object.__setattr__(self, "roles", tuple(roles))  # frozen: a YAML list kept as a tuple

    def runs_group(self, slot_role: str) -> bool:
        """Whether a slot started in `slot_role` runs an expert-parallel group."""
        return self.group.size > 1 and slot_role in self.roles

    def as_mapping(self) -> dict[str, Any]:
        """The setting as a user writes it (one flat mapping), JSON-ready."""
        return {**asdict(self.group), "roles": list(self.roles)}
