"""A PyTorch-native recurrent language model: ``forward(x) -> logits``, no positions, no mask, no cache.

``hfbridge.adapters.to_hf_api`` wraps it; ``generate`` then recomputes the whole sequence at every step.
"""

from __future__ import annotations

import torch
from torch import nn


class GRULanguageModel(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 64, num_layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.rnn = nn.GRU(dim, dim, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(x))
        return self.head(hidden)
