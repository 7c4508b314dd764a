"""The word profile of a WHOLE answer: hashed unigram and bigram frequencies, one linear term of the reward.

The encoder sees the first and last 64 tokens; what lies between (the body of a long answer) reaches the judge only
through this profile. Frequencies are per 100 tokens (a density, not a count), so a longer answer does not gain
reward from having more words; in cross-validation by model it lifts both Spearman correlations and length-balanced
agreement (README, "The judge"). Hashing keeps the vocabulary open: no fitted dictionary to ship or go stale.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_TOKEN = re.compile(r"[a-z0-9']+|[^\sa-z0-9]")
PER_TOKENS = 100.0


@dataclass(frozen=True)
class WordProfiles:
    """Sparse rows: answer i's hashed buckets are ids[offsets[i]:offsets[i+1]] with frequencies in weights."""

    ids: np.ndarray  # int64
    weights: np.ndarray  # float32, occurrences per PER_TOKENS tokens
    offsets: np.ndarray  # int64, n + 1 entries

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def take(self, rows: np.ndarray) -> "WordProfiles":
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        sizes = ends - starts
        index = np.repeat(starts - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes) + np.arange(sizes.sum())
        return WordProfiles(self.ids[index], self.weights[index], np.concatenate([[0], np.cumsum(sizes)]))


def word_profiles(texts: Sequence[str], buckets: int) -> WordProfiles:
    """Profiles of `texts` over `buckets` hashed unigram/bigram buckets (CRC-32: the same in every process)."""
    bucket_of: dict[str, int] = {}
    ids: list[int] = []
    weights: list[float] = []
    offsets = [0]
    for text in texts:
        tokens = _TOKEN.findall((text or "").lower())
        counts: dict[int, int] = {}
        for gram in tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]:
            bucket = bucket_of.get(gram)
            if bucket is None:
                bucket = bucket_of[gram] = zlib.crc32(gram.encode("utf-8", "surrogatepass")) % buckets
            counts[bucket] = counts.get(bucket, 0) + 1
        scale = PER_TOKENS / max(1, sum(counts.values()))
        ids.extend(counts)
        weights.extend(c * scale for c in counts.values())
        offsets.append(len(ids))
    return WordProfiles(np.asarray(ids, dtype=np.int64), np.asarray(weights, dtype=np.float32),
                        np.asarray(offsets, dtype=np.int64))


def profile_reward(word_weights: np.ndarray, profiles: WordProfiles) -> np.ndarray:
    """sum over an answer's buckets of weight[bucket] * frequency: the word term of each answer's reward."""
    contributions = np.concatenate([[0.0], np.cumsum(word_weights[profiles.ids] * profiles.weights,
                                                     dtype=np.float64)])
    return contributions[profiles.offsets[1:]] - contributions[profiles.offsets[:-1]]


__all__ = ["WordProfiles", "profile_reward", "word_profiles"]
