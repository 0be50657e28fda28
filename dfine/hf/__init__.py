"""HuggingFace ``DFineForObjectDetection`` interop (the ``[hf]`` extra).

- `config`: ``DFineConfig`` from a dfine config, and the layout facts both sides must share;
- `conversion`: state dicts and whole folders converted both ways, with an output check;
- `folder`: what HF's documented snippet needs beside the weights (image processor, class names), and an HF
  folder read as a checkpoint (``-r`` / ``-t``).
"""
