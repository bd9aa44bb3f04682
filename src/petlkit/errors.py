"""Errors petlkit raises on bad input: each names the problem and the fix."""


class PetlError(ValueError):
    """Base class: a user-facing error whose message says what is wrong and what to do."""


class ConfigError(PetlError):
    """A method or run configuration is invalid."""


class TargetError(PetlError):
    """Target modules named by a config match nothing in the model."""


class CheckpointError(PetlError):
    """An adapter checkpoint is missing, corrupt, or was made for another model."""


class NotMergeableError(PetlError):
    """A method whose update is not linear in the weights was asked to merge."""


class NotFoldableError(PetlError):
    """A method was asked to train folded into weights it cannot fold into."""


class TrainingInterrupted(PetlError):
    """Ctrl-C (SIGINT) during training: the finished steps are checkpointed, the run can resume."""


class TrainingDiverged(PetlError):
    """The loss became inf or NaN (a learning rate too high for the method, usually)."""
