"""Where a sweep's variants build: ``--device`` for every variant's build, and the GPUs each Ray task declares.

* ``--device auto|cpu|cuda|cuda:N`` is handed to each variant's build exactly as ``medlite build --device``
  (default: the variant recipe's ``device``, else auto — as before the option existed).
* **Ray**: each task declares ``--gpus-per-variant`` GPUs (default 1 when the variant's device is CUDA, else 0),
  so Ray places GPU builds on nodes with a free GPU. Ray hides the GPUs from a task that declares none
  (``CUDA_VISIBLE_DEVICES`` empty) and shows a task the GPUs it was given as ``cuda:0``, ``cuda:1``…, so a CUDA
  variant needs at least one declared GPU; a fraction (0.5) lets two builds share a card on purpose.
* **local**: a CUDA build sizes each phase against the whole card (``medlite.devices.check_fits``), so two
  local workers on one card would each count on memory the other holds: local GPU builds run one at a time
  (``--jobs`` above 1 with a CUDA device is refused; several GPUs: the Ray executor, one variant per GPU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from medlite.errors import MedliteError


def is_cuda(spelling: Optional[str]) -> bool:
    """True for ``cuda`` / ``cuda:N`` (a parsed spelling)."""
    return bool(spelling) and str(spelling).startswith("cuda")


@dataclass(frozen=True)
class Placement:
    """The sweep's ``--device`` (None: each recipe's own) and ``--gpus-per-variant`` (None: the default)."""

    executor: str
    device: Optional[str] = None
    gpus: Optional[float] = None

    def device_of(self, recipe_device: Optional[str]) -> Optional[str]:
        """The device spelling a variant builds with (``--device`` wins over the recipe's ``device``)."""
        return self.device or recipe_device

    def gpus_of(self, recipe_device: Optional[str]) -> float:
        """GPUs a variant's Ray task declares (0 with the local executor)."""
        if self.executor != "ray":
            return 0.0
        if self.gpus is not None:
            return self.gpus
        return 1.0 if is_cuda(self.device_of(recipe_device)) else 0.0

    def key_suffix(self, recipe_device: Optional[str]) -> str:
        """Added to a variant's resume key: a CUDA build is another artifact version than a CPU one."""
        return "cuda" if is_cuda(self.device_of(recipe_device)) else ""


def placement(args) -> Placement:
    """``--device`` / ``--gpus-per-variant`` checked against the executor (one line each; nothing built yet)."""
    from medlite.devices import parse_device

    spec = getattr(args, "device", None)
    device = parse_device(spec) if spec is not None else None
    gpus = getattr(args, "gpus_per_variant", None)
    if gpus is not None and args.executor != "ray":
        raise MedliteError("--gpus-per-variant is what each Ray task declares: use it with --executor ray "
                           "(local GPU builds run one at a time)")
    if gpus is not None and (gpus < 0 or (gpus > 1 and gpus != math.floor(gpus))):
        raise MedliteError(f"--gpus-per-variant {gpus:g}: Ray takes a fraction of one GPU (0 to 1) or a whole "
                           "number of GPUs")
    return Placement(args.executor, device, None if gpus is None else float(gpus))


def check_variants(place: Placement, recipe_devices: dict, jobs: int) -> None:
    """Every variant's device against the executor, before any build (``recipe_devices``: name → recipe
    ``device``); locally, a CUDA device this machine lacks is one line now rather than one failed row each."""
    cuda = {n: place.device_of(d) for n, d in recipe_devices.items() if is_cuda(place.device_of(d))}
    for name, d in recipe_devices.items():
        dev, gpus = place.device_of(d), place.gpus_of(d)
        where = "--device" if place.device else f"variant {name}: device"
        if place.executor == "ray" and is_cuda(dev) and gpus == 0:
            raise MedliteError(f"{where} {dev} with --gpus-per-variant 0: Ray hides the GPUs from a task that "
                               "declares none; declare a GPU (or a fraction of one) per variant")
        if place.executor == "ray" and dev and dev.startswith("cuda:") and int(dev[5:]) >= max(1, math.ceil(gpus)):
            raise MedliteError(f"{where} {dev}: a Ray task sees only the {max(1, math.ceil(gpus)):g} GPU(s) it "
                               "declares, as cuda:0…; use --device cuda")
        if place.executor == "ray" and dev == "cpu" and gpus > 0:
            raise MedliteError(f"{where} cpu with --gpus-per-variant {gpus:g}: the tasks would hold GPUs they "
                               "never use")
    if place.executor == "local" and cuda:
        if jobs > 1:
            raise MedliteError(f"--jobs {jobs} with a CUDA device ({sorted(set(cuda.values()))[0]}): local GPU "
                               "builds run one at a time (each sizes its phases for the whole card); use --jobs 1, "
                               "or --executor ray to place one variant per GPU")
        from medlite.devices import resolve_device

        for name, dev in cuda.items():
            resolve_device(dev, where="--device" if place.device else f"variant {name}: device")
