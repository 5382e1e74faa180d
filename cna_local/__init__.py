"""cna-local: Contrastive Neuron Attribution steering for local LLMs.

Data flow: prompts -> activations -> scores -> mask file -> runtime.
"""

__version__ = "0.1.0"
