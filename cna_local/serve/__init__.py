"""Serve a model with its neuron masks where people chat: an OpenAI-compatible HTTP server with a strength
per request, a page with live sliders at `/`, built on llama-cpp-python's server types.

    cna-local serve --model model.gguf --mask refusal.gguf

masks.py   the masks, their server-wide multipliers, and the checks of what clients send
worker.py  one model, one thread: requests in arrival order, each at its own strength
app.py     the FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /neuron-masks, /
page.html  the browser page (self-contained: no CDN, works offline)
"""

from .app import create_app
from .masks import MaskRegistry, RequestError

__all__ = ["MaskRegistry", "RequestError", "create_app"]
