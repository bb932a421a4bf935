"""A seeded bijection of [0, n) evaluated one index at a time: the global shuffle of the training data.

A balanced Feistel network permutes the 2^(2h) integers of the smallest even-bit power of two >= n; an image
that falls outside [0, n) is fed through again (cycle walking) until it lands inside, which keeps the map a
bijection of [0, n). The domain is < 4n, so a lookup takes fewer than 4 passes on average: O(1) work and memory
per index whatever n is, and every rank computes the same order from (seed, stream, epoch) alone.
"""
import numpy as np

ROUNDS = 4
MIX_1, MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def round_function(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """The splitmix64 finaliser of x + key: a well-mixed 64-bit hash."""
    z = x + key
    z = (z ^ (z >> np.uint64(30))) * MIX_1
    z = (z ^ (z >> np.uint64(27))) * MIX_2
    return z ^ (z >> np.uint64(31))


class Permutation:
    """position -> index, a bijection of [0, n) fixed by `seed` (any list of ints for np.random.SeedSequence)."""

    def __init__(self, n: int, seed):
        if n < 1:
            raise ValueError(f"a permutation needs at least one element; got n={n}")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.SeedSequence(seed).generate_state(ROUNDS, dtype=np.uint64)

    def feistel(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (round_function(right, key) & self.mask)
        return (left << half) | right

    def __call__(self, positions) -> np.ndarray:
        """The indices at `positions` (ints in [0, n)), as an int64 array of the same shape."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n):
            raise ValueError(f"positions must lie in [0, {self.n})")
        with np.errstate(over="ignore"):
            out = self.feistel(positions.astype(np.uint64))
            outside = out >= np.uint64(self.n)
            while outside.any():
                out[outside] = self.feistel(out[outside])
                outside = out >= np.uint64(self.n)
        return out.astype(np.int64)
