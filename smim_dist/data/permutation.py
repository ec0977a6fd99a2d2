"""An epoch's sample order as a seeded bijection of [0, N), evaluated only where it is read.

Drawing ``permutation(N)`` costs 8N bytes in every rank (16 GB at 2 billion samples) before the first batch. A
Feistel network is a bijection of the b-bit integers for any round function; cycle walking (applying it again until
the result falls below N) restricts it to a bijection of [0, N). So sample ``order(p)`` of global position ``p`` is a
pure function of (key, p), computed for the positions a rank reads, a chunk at a time, in memory that does not grow
with N. With the smallest even b that holds N, fewer than 4 x N values exist, so a position walks fewer than 4 times
on average.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
"""Luby-Rackoff: 4 rounds already make a pseudo-random permutation; 6 also mix small domains well"""


def _round(half: np.ndarray, key: np.uint64) -> np.ndarray:
    """SplitMix64's finaliser of (half + key): every input bit moves every output bit."""
    z = half + key
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class FeistelPermutation:
    """``perm(positions)`` maps positions in [0, n) to distinct samples in [0, n); the key is any integers (seed,
    epoch), hashed by NumPy's ``SeedSequence`` into the round keys."""

    def __init__(self, n: int, *key: int):
        n = int(n)
        if not 1 <= n < 2**62:
            raise ValueError(f"a permutation of {n} samples: need 1 <= n < 2**62")
        bits = max(2, (n - 1).bit_length())
        self.n, self.half_bits = n, (bits + 1) // 2
        self.mask = np.uint64((1 << self.half_bits) - 1)
        self.keys = np.random.SeedSequence(list(key)).generate_state(ROUNDS, dtype=np.uint64)

    def _encrypt(self, values: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = values >> shift, values & self.mask
        for key in self.keys:
            left, right = right, left ^ (_round(right, key) & self.mask)
        return (left << shift) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.uint64)
        if positions.size and int(positions.max()) >= self.n:
            raise IndexError(f"position {int(positions.max())} outside a permutation of {self.n}")
        with np.errstate(over="ignore"):
            out = self._encrypt(positions)
            walking = np.flatnonzero(out >= self.n)
            while walking.size:
                out[walking] = self._encrypt(out[walking])
                walking = walking[out[walking] >= self.n]
        return out
