"""Synthetic next-token data, generated on the fly from a seed (nothing to download)."""

from __future__ import annotations

import torch


class PermutationTask:
    """Sequences that follow a fixed hidden permutation of the vocabulary.

    Each sequence starts at a random token and every next token is ``perm[previous]``. A
    model that has learned ``perm`` predicts every token after the first, so the loss can
    fall from ``ln(vocab)`` towards zero: an easy task whose progress is plain to see.
    """

    def __init__(self, vocab_size: int, seq_len: int, seed: int) -> None:
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)
        perm = torch.randperm(vocab_size, generator=self.generator)
        # orbit[t, x] = perm applied t times to x, so a whole sequence is one gather.
        orbit = [torch.arange(vocab_size)]
        for _ in range(seq_len):
            orbit.append(perm[orbit[-1]])
        self.orbit = torch.stack(orbit)

    def batch(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of shape ``[batch, seq_len]``; targets are inputs shifted by one."""
        starts = torch.randint(self.vocab_size, (batch_size,), generator=self.generator)
        tokens = self.orbit[:, starts].T.contiguous().to(device)
        return tokens[:, :-1], tokens[:, 1:]
