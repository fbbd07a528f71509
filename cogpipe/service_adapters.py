"""The LoRAs on the inference service's pipeline, and how a job's LoRA becomes the active one.

Two ways, chosen by whether the transformer is compiled:

- `Resident` (eager): every LoRA is a diffusers adapter, named by its content; a switch is
  `set_adapters` (the base model: `disable_lora`), so nothing moves and nothing reloads, and a
  video equals `cogpipe generate`'s with that LoRA to the bit;
- `Slot` (compiled; diffusers' LoRA hot-swap): one adapter, padded to `max_rank` when the
  first LoRA loads, whose weights the next LoRA's overwrite in place
  (`load_lora_weights(..., hotswap=True)`) and whose scalings are tensors filled per job. The
  compiled blocks meet the same modules, shapes and attributes whatever LoRA or scale is
  active, so a switch never recompiles; resident adapters instead would each be a new graph,
  and past torch's recompile limit the blocks would silently run eager. The base model is the
  slot disabled: one more graph, compiled the first time a base job runs.

Both raise `RequestError` (422) for a file that is not a LoRA of this model, before a job
ever needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SLOT = "slot"  # the one adapter name of a compiled service


class RequestError(Exception):
    """A request the service refuses: the HTTP status and the reason, one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Lora:
    """A LoRA the service knows: its request name, file and content hash."""

    name: str
    path: Path
    sha256: str

    @property
    def adapter(self) -> str:
        """Named by content (never generate's "lora"): one file under two names loads once."""
        return f"sha_{self.sha256[:16]}"


def lora_layout(path: Path) -> tuple[int, set[str]]:
    """(rank, the module names it adapts) of a LoRA file, from its tensors' shapes."""
    from safetensors import safe_open

    rank, modules = 0, set()
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            if ".lora_A." in key:
                rank = max(rank, f.get_slice(key).get_shape()[0])
                modules.add(key.split(".lora_A.")[0].removeprefix("transformer."))
    return rank, modules


def _load(pipe, lora: Lora, adapter: str, hotswap: bool = False) -> None:
    pipe.load_lora_weights(
        str(lora.path.parent), weight_name=lora.path.name, adapter_name=adapter, hotswap=hotswap
    )


def _refuse(lora: Lora, e: Exception) -> RequestError:
    return RequestError(422, f"{lora.path}: not a LoRA of this model: {e}"[:400])


class Resident:
    """Every LoRA an adapter of its own; `set_adapters` per job (eager pipelines)."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    def add(self, lora: Lora) -> None:
        """Load the file as an adapter unless one of that content is resident.

        Raises:
            RequestError: 422, the file is not a LoRA of this model.
        """
        if lora.adapter in getattr(self.pipe.transformer, "peft_config", {}):
            return
        try:
            _load(self.pipe, lora, lora.adapter)
        except Exception as e:  # wrong model, rank mismatch, not a LoRA file
            if lora.adapter in getattr(self.pipe.transformer, "peft_config", {}):
                self.pipe.delete_adapters(lora.adapter)
            raise _refuse(lora, e) from None

    def activate(self, lora: Lora | None, scale: float) -> None:
        """Make `lora` the pipeline's LoRA at `scale`, or none (the base model exactly)."""
        if not getattr(self.pipe.transformer, "peft_config", None):
            return  # no LoRA loaded yet: the base model
        if lora is None:
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters([lora.adapter], [scale])


class Slot:
    """One hot-swapped adapter padded to `max_rank` (compiled pipelines)."""

    def __init__(self, pipe, max_rank: int) -> None:
        self.pipe, self.max_rank = pipe, max_rank
        self.created = False  # the first LoRA makes the slot
        self.current: Lora | None = None  # whose weights it holds (None: unknown, swap again)
        self.modules: set[str] = set()  # what the slot adapts (the first LoRA's modules)
        self.units: list[tuple[object, float]] = []  # (LoRA layer, alpha/rank of `current`)
        # prepares the first LoRA for swaps (rank padded, scalings made tensors) as it loads
        pipe.enable_lora_hotswap(target_rank=max_rank, check_compiled="ignore")

    def add(self, lora: Lora) -> None:
        """Check the file fits the slot by swapping it in; the first LoRA creates the slot.

        Raises:
            RequestError: 422, its rank is over `max_rank`, it adapts a module the slot does
                not, or it is not a LoRA of this model.
        """
        try:
            rank, modules = lora_layout(lora.path)
        except Exception as e:  # not a safetensors file
            raise _refuse(lora, e) from None
        if rank > self.max_rank:
            raise RequestError(
                422,
                f"{lora.path}: rank {rank} is over this service's "
                f"--max-rank {self.max_rank}; restart it with a larger one",
            )
        if not self.created:
            self._swap(lora, hotswap=False)
            self.created, self.modules = True, modules
            return
        if extra := sorted(modules - self.modules):
            raise RequestError(
                422,
                f"{lora.path}: adapts {extra[0]} (and {len(extra) - 1} "
                "more) that the first LoRA does not; a compiled service swaps "
                "LoRAs of the same target modules",
            )
        self._swap(lora, hotswap=True)  # a trial swap: a file that will not swap fails now

    def activate(self, lora: Lora | None, scale: float) -> None:
        """Swap `lora`'s weights into the slot unless there, and set its scale; None: the base.

        Raises:
            RequestError: 422, the file no longer loads (changed since `add`).
        """
        if not self.created:
            return  # no LoRA loaded yet: the base model
        if lora is None:
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        if self.current is None or lora.sha256 != self.current.sha256:
            self._swap(lora, hotswap=True)
        for layer, unit in self.units:
            layer.scaling[SLOT].fill_(unit * scale)  # a tensor: its value is not compiled in

    def _swap(self, lora: Lora, hotswap: bool) -> None:
        self.current = None  # until the swap is through
        try:
            _load(self.pipe, lora, SLOT, hotswap=hotswap)
        except Exception as e:
            raise _refuse(lora, e) from None
        self.current = lora
        self.units = [(m, float(m.scaling[SLOT])) for m in self._layers()]

    def _layers(self) -> list:
        from peft.tuners.lora import LoraLayer

        return [
            m
            for m in self.pipe.transformer.modules()
            if isinstance(m, LoraLayer) and SLOT in m.scaling
        ]
