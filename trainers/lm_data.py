"""Corpora for the language-model task: the bytes of a UTF-8 text file, a pre-tokenized ``.bin`` of uint16 ids, its
download, and a generated corpus whose entropy rate is known exactly (an order-2 Markov source), so that how far a
model is from the best possible loss can be measured.

Every failure to read a corpus is a :class:`DatasetUnavailable` that names the file, the problem and the fixes.
"""

from __future__ import annotations

import bisect
import math
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from launcher.errors import DatasetUnavailable
from trainers.core.files import atomic_write

__all__ = ["Corpus", "MarkovSource", "read_corpus", "download_text", "BYTES"]

#: Byte-level vocabulary: every byte value is a token.
BYTES = 256


@dataclass(frozen=True)
class Corpus:
    """The token ids of a corpus (int64), its vocabulary size, and whether a token is a byte (for bits per byte)."""

    tokens: torch.Tensor
    vocab_size: int
    byte_level: bool
    source: str

    def split(self, val_fraction: float, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(training tokens, held-out tokens): the end of the corpus is held out; each part holds one window at least."""
        n = len(self.tokens)
        held_out = max(seq_len + 1, int(n * val_fraction))
        if n - held_out < seq_len + 1:
            raise DatasetUnavailable(
                f"{self.source} has {n:,} tokens, too few for a training window of data.seq_len={seq_len} plus an "
                f"evaluation part of {held_out:,} (data.val_fraction={val_fraction:g}); give a longer corpus or a "
                "smaller data.seq_len.", same_on_every_rank=True)
        return self.tokens[: n - held_out], self.tokens[n - held_out:]


def _problem(path: Path, what: str) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"The corpus {path} {what}. Give data.path a UTF-8 text file (its bytes are the tokens) or a .bin file of "
        "uint16 token ids; or let it be downloaded (data.download=true with data.url); or train on a generated corpus "
        "with data.synthetic=true.", same_on_every_rank=True)


def read_corpus(path: str | Path, vocab_size: int = 0) -> Corpus:
    """The tokens of ``path``: the bytes of a UTF-8 text, or the ids of a uint16 ``.bin`` file."""
    path = Path(path)
    if not path.is_file():
        raise _problem(path, "does not exist" if not path.exists() else "is not a file")
    data = path.read_bytes()
    if not data:
        raise _problem(path, "is empty")
    if path.suffix == ".bin":
        if len(data) % 2:
            raise _problem(path, f"has {len(data)} bytes, not a whole number of uint16 token ids")
        ids = torch.from_numpy(np.frombuffer(data, dtype=np.uint16).astype(np.int64))
        largest = int(ids.max())
        if vocab_size and largest >= vocab_size:
            raise _problem(path, f"holds token id {largest}, not below data.vocab_size={vocab_size}")
        return Corpus(ids, vocab_size or largest + 1, False, str(path))
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _problem(path, f"is not UTF-8 text (byte {e.start}: {e.reason}); for other encodings convert it first "
                       "(iconv), or pre-tokenize it into a .bin file") from None
    return Corpus(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64), BYTES, True, str(path))


def download_text(url: str, path: str | Path, timeout_s: float = 60.0) -> None:
    """Fetch ``url`` into ``path`` (written whole or not at all); DatasetUnavailable when offline."""
    path = Path(path)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            data = response.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout) as e:
        raise DatasetUnavailable(
            f"Could not download the corpus from {url} ({type(e).__name__}: {e}); this machine appears to be offline. "
            f"Put a text file at {path} yourself (data.path), or train on a generated corpus with data.synthetic=true "
            "(or data.synthetic_fallback=true).") from e
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(data))
    except OSError as e:
        raise DatasetUnavailable(f"Could not write the downloaded corpus to {path} ({e}); give data.path a writable "
                                 "place.") from e


class MarkovSource:
    """A random order-2 Markov source over ``symbols`` printable characters, each pair of previous characters (a, b)
    picking the next from its own distribution. Like text, it has structure at every order: the distributions after
    (a, b) vary around one that depends on b alone, so a model improves step by step (unigram, then bigram, then the
    full context) instead of waiting on a plateau until it finds both characters at once. Its entropy rate is
    computed exactly: the loss no model can beat on its text."""

    ALPHABET = b"etaoinshrdlucmfwygpbvkxjqz .,;\n!?'"

    def __init__(self, seed: int = 0, symbols: int = 16, concentration: float = 0.5, spread: float = 4.0) -> None:
        g = np.random.default_rng(seed)
        self.symbols = symbols
        self.chars = np.frombuffer(self.ALPHABET[:symbols], dtype=np.uint8)
        after_b = g.dirichlet([concentration] * symbols, size=symbols)  # [b] -> next: the bigram structure
        # [a, b] -> next, drawn around after_b[b] (lower spread: farther from it); the small floor keeps every
        # Dirichlet parameter positive.
        self.transitions = np.stack([[g.dirichlet(spread * after_b[b] + 0.02) for b in range(symbols)]
                                     for _ in range(symbols)])

    def stationary(self) -> np.ndarray:
        """The stationary distribution over pairs (a, b), by power iteration on the pair chain."""
        k = self.symbols
        pairs = np.full((k, k), 1.0 / (k * k))
        for _ in range(10_000):
            nxt = np.einsum("ab,abc->bc", pairs, self.transitions)
            if np.abs(nxt - pairs).max() < 1e-14:
                break
            pairs = nxt
        return pairs

    def entropy_rate(self) -> float:
        """H = sum over pairs (a, b) of pi(a, b) * H(next | a, b), in nats per symbol."""
        p = self.transitions
        conditional = -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)
        return float((self.stationary() * conditional).sum())

    def generate(self, length: int, seed: int = 1) -> bytes:
        g = np.random.default_rng(seed)
        first = g.integers(0, self.symbols, 2)
        # Plain lists and bisect: numpy's per-call overhead would make this loop several times slower.
        cumulative = self.transitions.cumsum(-1).reshape(self.symbols * self.symbols, self.symbols).tolist()
        draws, last = g.random(length).tolist(), self.symbols - 1
        out = [int(first[0]), int(first[1])]
        a, b = out
        for i in range(2, length):
            a, b = b, min(bisect.bisect_left(cumulative[a * self.symbols + b], draws[i]), last)
            out.append(b)
        return self.chars[np.asarray(out[:length], dtype=np.int64)].tobytes()


def synthetic_corpus(length: int, seed: int = 0) -> Corpus:
    """``length`` bytes of the default Markov source (fixed, not tied to run.seed: the data stays the data)."""
    source = MarkovSource(seed)
    text = source.generate(length)
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.int64)
    return Corpus(tokens, BYTES, True, f"a generated corpus ({length:,} bytes, entropy rate "
                  f"{source.entropy_rate():.3f} nats)")


def bits(nats: float) -> float:
    return nats / math.log(2)
