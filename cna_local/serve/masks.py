"""The server's masks: numbered in the order given, each with a server-wide multiplier that a request may
override for itself (the shape of llama-server's `--lora` / `"lora": [{"id", "scale"}]`).

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
        self._multipliers = [float(s.mask.multiplier) for s in self.slots]

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

    def describe(self) -> list[dict]:
        """GET /neuron-masks: [{"id", "path", "name", "neurons", "multiplier", "default_multiplier", "schedule"}]"""
        current = self.multipliers()
        return [{"id": s.id, "path": s.path, "name": s.name, "neurons": len(s.mask), "multiplier": current[s.id],
                 "default_multiplier": float(s.mask.multiplier), "schedule": s.mask.schedule} for s in self.slots]

    def set_server_wide(self, body: Any) -> None:
        """POST /neuron-masks: [{"id": 0, "multiplier": 0}, ...] changes the multipliers of those masks."""
        settings = self.parse(body, field="body")
        with self._lock:
            for mask_id, value in settings.items():
                self._multipliers[mask_id] = value

    def for_request(self, body: Any) -> list[float]:
        """The multiplier of every mask for one request: its own where it lists the mask, else the server's."""
        values = self.multipliers()
        if body is not None:
            for mask_id, value in self.parse(body, field="neuron_masks").items():
                values[mask_id] = value
        return values

    def parse(self, body: Any, field: str) -> dict[int, float]:
        """Check a list of {"id": int, "multiplier": number}; raise RequestError naming the bad part."""
        example = '[{"id": 0, "multiplier": -1.5}]'
        if not isinstance(body, list):
            raise RequestError(f"{field} must be a list such as {example}, got {type(body).__name__}.", field)
        out: dict[int, float] = {}
        for i, item in enumerate(body):
            where = f"{field}[{i}]"
            if not isinstance(item, dict):
                raise RequestError(f"{where} must be an object such as {{\"id\": 0, \"multiplier\": -1.5}}, got {item!r}.", where)
            unknown = set(item) - {"id", "multiplier"}
            if unknown:
                raise RequestError(f"{where} has unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
                                   "each entry is {\"id\": <mask id>, \"multiplier\": <number>}.", where)
            if "id" not in item or "multiplier" not in item:
                missing = "id" if "id" not in item else "multiplier"
                raise RequestError(f"{where} has no \"{missing}\"; each entry is {{\"id\": <mask id>, \"multiplier\": <number>}}.", f"{where}.{missing}")
            mask_id = item["id"]
            if isinstance(mask_id, bool) or not isinstance(mask_id, int):
                raise RequestError(f"{where}.id must be an integer mask id, got {mask_id!r}. {self._ids_hint()}", f"{where}.id")
            if not 0 <= mask_id < len(self.slots):
                raise RequestError(f"{where}.id: there is no mask {mask_id}. {self._ids_hint()}", f"{where}.id")
            if mask_id in out:
                raise RequestError(f"{where}.id: mask {mask_id} is listed twice; give each mask once.", f"{where}.id")
            value = item["multiplier"]
            if isinstance(value, str):  # JSON text is not a number, even "1.5"
                raise RequestError(f"{where}.multiplier must be a JSON number, got the string {value!r}.", f"{where}.multiplier")
            try:
                out[mask_id] = check_multiplier(value, what=f"{where}.multiplier")
            except MultiplierError as exc:
                raise RequestError(str(exc), f"{where}.multiplier") from None
        return out

    def _ids_hint(self) -> str:
        if not self.slots:
            return "This server has no masks (start it with --mask FILE)."
        ids = "0" if len(self.slots) == 1 else f"0-{len(self.slots) - 1}"
        return f"This server has mask id{'s' if len(self.slots) > 1 else ''} {ids} (GET /neuron-masks lists them)."


def echo(values: Sequence[float]) -> list[dict]:
    """What a response says it ran with: [{"id": 0, "multiplier": -1.5}, ...]."""
    return [{"id": i, "multiplier": v} for i, v in enumerate(values)]
