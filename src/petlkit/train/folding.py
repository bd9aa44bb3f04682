"""TrainConfig.fold: train folded, unfolded, or whichever the first steps show to be faster.

"auto" times real training steps, alternating the two forms (they compute the same function,
methods/folding.py), and keeps the faster one for the rest of the run: the choice depends on
the device, the dtype and the tokens per step, so it is measured where the run is. Nothing is
spent on trial steps; the choice goes into the training log and the checkpoint, so a resumed run
keeps it.
"""

from __future__ import annotations

import statistics

import torch

from petlkit.model import PetlModel

WARMUP = 2  # one step of each form before timing (first-call allocations, kernel choice)
TIMED = 3  # timed steps of each form


class FoldChoice:
    """Applies the fold mode to `petl` and, for "auto", decides from step times."""

    def __init__(self, petl: PetlModel, mode: str, info: dict) -> None:
        """`info`: the run's progress (a resumed run's holds its choice under "fold")."""
        self.petl = petl
        decided = info.get("fold")
        self.times: dict[bool, list[float]] = {False: [], True: []}
        self.steps_seen = 0
        self.reason: str | None = None
        if decided is not None:  # a resumed run keeps its choice
            mode = decided
        elif mode == "auto":
            self.reason = petl.fold_refusal()
            if self.reason is not None:
                mode = "off"
        self.decided: str | None = None if mode == "auto" else mode
        if self.decided is not None:
            info["fold"] = self.decided
        petl.set_folded(self.decided == "on")

    def before_step(self) -> None:
        """While deciding, alternate: unfolded on even steps, folded on odd ones."""
        if self.decided is None:
            self.petl.set_folded(self.steps_seen % 2 == 1)

    def after_step(self, seconds: float, info: dict, record: dict, accelerator) -> None:
        """Record a step's time (the loss read before synchronised the device); at the step that
        decides, the choice goes into `info` (checkpointed) and the step's log `record`. Every
        process takes the same decision, from the mean time over processes."""
        if self.decided is not None:
            return
        if accelerator.num_processes > 1:
            mean = torch.tensor(seconds, device=accelerator.device)
            seconds = accelerator.reduce(mean, "mean").item()
        if self.steps_seen >= WARMUP:
            self.times[self.petl.folded].append(seconds)
        self.steps_seen += 1
        if min(len(t) for t in self.times.values()) < TIMED:
            return
        faster = statistics.median(self.times[True]) < statistics.median(self.times[False])
        self.decided = info["fold"] = "on" if faster else "off"
        self.petl.set_folded(faster)
        record.update(fold=self.decided, **self.medians_ms())

    def medians_ms(self) -> dict[str, float]:
        return {
            ("folded_ms" if form else "unfolded_ms"): round(1000 * statistics.median(t), 2)
            for form, t in self.times.items()
            if t
        }
