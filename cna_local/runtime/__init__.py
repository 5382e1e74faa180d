"""The runtime half: neuron masks applied inside the patched llama.cpp.

`import cna_local.runtime` needs the patched libllama that `pip install cna-local` builds.
"""

from .binding import PatchedLibraryError
from .composition import compose
from .llama import SteeredLlama
from .steering import NeuronSteering, SteeringError, SteeringState

__all__ = ["NeuronSteering", "PatchedLibraryError", "SteeredLlama", "SteeringError", "SteeringState", "compose"]
