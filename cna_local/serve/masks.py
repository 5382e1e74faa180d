"""The server's masks: numbered in the order given, each with a server-wide multiplier that a request may
override for itself (the shape of llama-server's `--lora` / `"lora": [{"id", "scale"}]`), and, beside the
multiplier, whether the mask's gate decides which prompts are steered (`"gate": true|false`; a gate needs
the server to serve one mask; on by default when that mask has one).

Everything a client sends about masks is checked here; a bad value raises `RequestError` naming the field
and the fix, which the app answers with HTTP 400.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import CnaLocalError
from ..maskfile import NeuronMask
from ..multipliers import MultiplierError, check_multiplier


class RequestError(CnaLocalError):
    """A request the server refuses (HTTP 400); `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class MaskSlot:
    id: int
    path: str
    mask: NeuronMask

    @property
    def name(self) -> str:
        return str(self.mask.meta.get("name") or Path(self.path).stem)


class MaskRegistry:
    """The masks a server was started with and their server-wide multipliers (thread-safe)."""

    def __init__(self, slots: Sequence[MaskSlot]):
        self.slots = list(slots)
        self._lock = threading.Lock()
        # a gate reads one mask's neurons: with several masks composed, every prompt is steered
        self._gates = [len(self.slots) == 1 and s.mask.gate is not None for s in self.slots]
        self._multipliers = [float(s.mask.default_multiplier(g)) for s, g in zip(self.slots, self._gates)]

    @classmethod
    def load(cls, paths: Sequence[str | Path]) -> "MaskRegistry":
        slots = [MaskSlot(i, str(p), NeuronMask.load(p)) for i, p in enumerate(paths)]
        schedules = {s.mask.schedule for s in slots}
        if len(schedules) > 1:  # composed masks steer the same positions
            raise CnaLocalError("the masks have different default schedules (" + ", ".join(
                f"{s.path}: {s.mask.schedule}" for s in slots) + "). Fix: make them with the same "
                "`cna-local attribute --schedule`, or serve them separately.")
        return cls(slots)

    def masks(self) -> list[NeuronMask]:
        return [s.mask for s in self.slots]

    def multipliers(self) -> list[float]:
        with self._lock:
            return list(self._multipliers)

    def gates(self) -> list[bool]:
        with self._lock:
            return list(self._gates)

    def describe(self) -> list[dict]:
        """GET /neuron-masks: [{"id", "path", "name", "neurons", "multiplier", "default_multiplier", "schedule",
        "gate", "has_gate"}]"""
        current, gates = self.multipliers(), self.gates()
        return [{"id": s.id, "path": s.path, "name": s.name, "neurons": len(s.mask), "multiplier": current[s.id],
                 "default_multiplier": float(s.mask.default_multiplier(gates[s.id])), "schedule": s.mask.schedule, "gate": gates[s.id],
                 "has_gate": s.mask.gate is not None} for s in self.slots]

    def set_server_wide(self, body: Any) -> None:
        """POST /neuron-masks: [{"id": 0, "multiplier": 0, "gate": true}, ...] changes those masks' settings."""
        settings = self.parse(body, field="body")
        with self._lock:
            for mask_id, (value, gate) in settings.items():
                if gate is not None and value is None:
                    value = self._follow(mask_id, self._multipliers[mask_id], self._gates[mask_id], gate)
                if value is not None:
                    self._multipliers[mask_id] = value
                if gate is not None:
                    self._gates[mask_id] = gate

    def for_request(self, body: Any, gate: Any = None) -> tuple[list[float], list[bool]]:
        """The multiplier and gate of every mask for one request: its own where it lists the mask, else the
        server's. gate: the request's top-level "gate", short for a "gate" entry of the one mask served."""
        values, gates = self.multipliers(), self.gates()
        if gate is not None:
            if not self.slots:
                raise RequestError("gate: this server has no mask to gate (start it with --mask FILE).", "gate")
            if len(self.slots) > 1 and gate:
                raise RequestError(f"gate: a gate reads one mask's neurons, and this server composes {len(self.slots)} "
                                   "masks; give \"gate\" per mask in neuron_masks, or serve the mask alone.", "gate")
            if not isinstance(gate, bool):
                raise RequestError(f"gate must be true or false, got {gate!r}.", "gate")
            if gate and self.slots[0].mask.gate is None:
                raise RequestError("gate: mask 0 has no gate (make one with `cna-local attribute`); send \"gate\": "
                                   "false or leave it out.", "gate")
            values = [self._follow(i, v, g, gate) for i, (v, g) in enumerate(zip(values, gates))]
            gates = [gate] * len(self.slots)
        if body is not None:
            for mask_id, (value, gate) in self.parse(body, field="neuron_masks").items():
                if gate is not None and value is None:
                    values[mask_id] = self._follow(mask_id, values[mask_id], gates[mask_id], gate)
                if value is not None:
                    values[mask_id] = value
                if gate is not None:
                    gates[mask_id] = gate
        return values, gates

    def _follow(self, mask_id: int, value: float, was: bool, gate: bool) -> float:
        """A gate switched without a multiplier: a mask at its own strength for one mode takes its own for the
        other (a gated default can be far stronger than what every prompt should get)."""
        mask = self.slots[mask_id].mask
        return mask.default_multiplier(gate) if value == mask.default_multiplier(was) else value

    def parse(self, body: Any, field: str) -> dict[int, tuple[float | None, bool | None]]:
        """Check a list of {"id": int, "multiplier": number, "gate": bool} (multiplier or gate may be left out);
        raise RequestError naming the bad part."""
        example = '[{"id": 0, "multiplier": -1.5}]'
        if not isinstance(body, list):
            raise RequestError(f"{field} must be a list such as {example}, got {type(body).__name__}.", field)
        out: dict[int, tuple[float | None, bool | None]] = {}
        for i, item in enumerate(body):
            where = f"{field}[{i}]"
            if not isinstance(item, dict):
                raise RequestError(f"{where} must be an object such as {{\"id\": 0, \"multiplier\": -1.5}}, got {item!r}.", where)
            shape = "each entry is {\"id\": <mask id>, \"multiplier\": <number>, \"gate\": true|false (optional)}"
            unknown = set(item) - {"id", "multiplier", "gate"}
            if unknown:
                raise RequestError(f"{where} has unknown field(s) {', '.join(sorted(map(str, unknown)))}; {shape}.", where)
            if "id" not in item or ("multiplier" not in item and "gate" not in item):
                missing = "id" if "id" not in item else "multiplier"
                raise RequestError(f"{where} has no \"{missing}\"; {shape}.", f"{where}.{missing}")
            mask_id = item["id"]
            if isinstance(mask_id, bool) or not isinstance(mask_id, int):
                raise RequestError(f"{where}.id must be an integer mask id, got {mask_id!r}. {self._ids_hint()}", f"{where}.id")
            if not 0 <= mask_id < len(self.slots):
                raise RequestError(f"{where}.id: there is no mask {mask_id}. {self._ids_hint()}", f"{where}.id")
            if mask_id in out:
                raise RequestError(f"{where}.id: mask {mask_id} is listed twice; give each mask once.", f"{where}.id")
            gate = item.get("gate")
            if "gate" in item:
                if not isinstance(gate, bool):
                    raise RequestError(f"{where}.gate must be true or false, got {gate!r}.", f"{where}.gate")
                if gate and self.slots[mask_id].mask.gate is None:
                    raise RequestError(f"{where}.gate: mask {mask_id} has no gate (make one with `cna-local attribute`); "
                                       "send \"gate\": false or leave it out.", f"{where}.gate")
                if gate and len(self.slots) > 1:
                    raise RequestError(f"{where}.gate: a gate reads one mask's neurons, and this server composes "
                                       f"{len(self.slots)} masks. Serve the mask alone to gate it.", f"{where}.gate")
            value = None
            if "multiplier" in item:
                value = item["multiplier"]
                if isinstance(value, str):  # JSON text is not a number, even "1.5"
                    raise RequestError(f"{where}.multiplier must be a JSON number, got the string {value!r}.", f"{where}.multiplier")
                try:
                    value = check_multiplier(value, what=f"{where}.multiplier")
                except MultiplierError as exc:
                    raise RequestError(str(exc), f"{where}.multiplier") from None
            out[mask_id] = (value, gate)
        return out

    def _ids_hint(self) -> str:
        if not self.slots:
            return "This server has no masks (start it with --mask FILE)."
        ids = "0" if len(self.slots) == 1 else f"0-{len(self.slots) - 1}"
        return f"This server has mask id{'s' if len(self.slots) > 1 else ''} {ids} (GET /neuron-masks lists them)."


def echo(values: Sequence[float], gates: Sequence[bool | None] | None = None) -> list[dict]:
    """What a response says it ran with: [{"id": 0, "multiplier": -1.5, "gate": true}, ...]; "gate" only for
    masks that have one (None in `gates`)."""
    gates = [None] * len(values) if gates is None else gates
    return [{"id": i, "multiplier": v, **({} if g is None else {"gate": bool(g)})}
            for i, (v, g) in enumerate(zip(values, gates))]
