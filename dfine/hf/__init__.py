"""HuggingFace ``DFineForObjectDetection`` interop (the ``[hf]`` extra).

- `config`: ``DFineConfig`` from a dfine config, and the layout facts both sides must share;
- `conversion`: state dicts and whole folders converted both ways, with an output check.
"""
