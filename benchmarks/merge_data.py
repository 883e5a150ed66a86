"""The tasks of the merge-vs-scratch benchmark (``../shared/merge-benchmark-protocol.md``).

Four classification tasks, each with fixed train / validation / test splits and nothing
downloaded:

* ``digits`` (images): scikit-learn's 8×8 digits (shipped with the package), scaled to [0, 1].
* ``images`` (images, the harder one): generated 16×16 glyphs, 40 classes, 5000 samples each.
  A class is a fixed set of four strokes; every sample is drawn at a random offset (±3 px)
  with jittered stroke ends and intensity, on clutter strokes and Gaussian noise. Learning the
  offsets with an MLP is slow, so tuned scratch needs about 10⁴ steps or more (measured by
  ``merge_vs_scratch.py --full``). Split 80/5/15: a small validation set, evaluated often.
* ``text``: generated token sequences. Words follow a Zipf background; each class has its own
  topic distribution over a shared pool of content words (so topics overlap), and each
  document mixes a random share of topic words into the background. Features: bag of words
  (counts / length).
* ``audio``: generated 0.256 s tones at 8 kHz. A class is a harmonic timbre, a pitch band, a
  glide and an amplitude-modulation rate; samples get pitch jitter (neighbouring bands
  overlap), random phases and onset, a distractor tone and noise at a random SNR. Features: a
  log-magnitude spectrogram pooled to 15 frames × 16 log-spaced bands, standardized with the
  training split's statistics.

Every generator is pure numpy seeded with ``numpy.random.default_rng`` (PCG64, the same
stream on every platform): one seed gives the same bytes on a platform (``fingerprint``), and
the same data up to floating-point rounding of ``sin``/``exp``/FFT elsewhere. The parents of
the benchmark see classes ``class_split`` (two disjoint halves) or, in the partly covered
control, ``partial_split`` (part of each half); ``subset`` cuts a split to some classes.

Run as a script it prints each task's shapes, fingerprint and a nearest-centroid baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

SPLIT_SEED = 0
"""Seed of the train / validation / test permutation (fixed for every run)."""
FRACTIONS = (0.6, 0.2, 0.2)
IMAGE_FRACTIONS = (0.8, 0.05, 0.15)
"""The large image task keeps its validation set small: it is evaluated every few hundred steps."""


@dataclass(frozen=True)
class Task:
    """A classification task with fixed splits: float32 inputs ``(n, input_dim)``, int64 labels."""

    name: str
    modality: str
    num_classes: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    description: str

    @property
    def input_dim(self) -> int:
        return int(self.x_train.shape[1])


def _split(
    name: str,
    modality: str,
    x: np.ndarray,
    y: np.ndarray,
    classes: int,
    what: str,
    fractions: tuple[float, float, float] = FRACTIONS,
) -> Task:
    """Fixed train / validation / test split by a seeded permutation (``SPLIT_SEED``)."""
    n = x.shape[0]
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    a = round(n * fractions[0])
    b = a + round(n * fractions[1])
    parts = [np.sort(perm[:a]), np.sort(perm[a:b]), np.sort(perm[b:])]
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    tr, va, te = ((x[i], y[i]) for i in parts)
    return Task(name, modality, classes, *tr, *va, *te, what)


# --- digits ------------------------------------------------------------------------------------


def digits_task() -> Task:
    """scikit-learn's digits (1797 8×8 images, 10 classes), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _split(
        "digits",
        "images",
        d.data / 16.0,
        d.target,
        10,
        "scikit-learn digits, 8x8 pixels in [0, 1], 10 classes",
    )


# --- generated images ------------------------------------------------------------------------


def _draw_segments(
    canvas: np.ndarray,
    x0: np.ndarray,
    y0: np.ndarray,
    x1: np.ndarray,
    y1: np.ndarray,
    value: np.ndarray,
    chunk: int = 8192,
) -> None:
    """Add anti-aliased line segments, one per image: ``canvas`` (n, s, s), endpoints in
    pixel coordinates (n,), intensity (n,). Points sampled densely along each segment are
    splatted bilinearly; ``chunk`` images at a time bound the temporary arrays."""
    n, s, _ = canvas.shape
    t = np.linspace(0.0, 1.0, 4 * s)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        px = x0[lo:hi, None] + (x1 - x0)[lo:hi, None] * t[None, :]
        py = y0[lo:hi, None] + (y1 - y0)[lo:hi, None] * t[None, :]
        length = np.hypot(x1[lo:hi] - x0[lo:hi], y1[lo:hi] - y0[lo:hi]) + 1.0
        w = np.broadcast_to((value[lo:hi] * length / len(t))[:, None], px.shape)
        fx, fy = np.floor(px), np.floor(py)
        ax, ay = px - fx, py - fy
        rows = np.repeat(np.arange(lo, hi), len(t))
        for dx, dy, weight in (
            (0, 0, (1 - ax) * (1 - ay)),
            (1, 0, ax * (1 - ay)),
            (0, 1, (1 - ax) * ay),
            (1, 1, ax * ay),
        ):
            cx = (fx + dx).astype(np.int64).ravel()
            cy = (fy + dy).astype(np.int64).ravel()
            ok = (cx >= 0) & (cx < s) & (cy >= 0) & (cy < s)
            np.add.at(canvas, (rows[ok], cy[ok], cx[ok]), (w * weight).ravel()[ok])


def image_task(
    seed: int = 7,
    *,
    classes: int = 40,
    per_class: int = 5000,
    size: int = 16,
    strokes: int = 4,
    shift: int = 3,
    clutter: int = 2,
    noise: float = 0.25,
) -> Task:
    """Generated glyphs: class = ``strokes`` fixed segments; samples shifted by up to
    ``shift`` px, strokes jittered, ``clutter`` random segments and Gaussian ``noise`` added."""
    rng = np.random.default_rng(seed)
    lo, hi = shift + 1.0, size - shift - 2.0
    glyphs = rng.uniform(lo, hi, size=(classes, strokes, 4))  # x0, y0, x1, y1
    n = classes * per_class
    y = np.repeat(np.arange(classes), per_class)
    canvas = np.zeros((n, size, size), dtype=np.float32)
    off = rng.integers(-shift, shift + 1, size=(n, 2)).astype(np.float64)
    for k in range(strokes):
        seg = glyphs[y, k]
        jitter = rng.normal(0.0, 0.5, size=(n, 4))
        pts = seg + jitter + np.concatenate([off, off], axis=1)
        value = rng.uniform(0.6, 1.2, size=n)
        _draw_segments(canvas, pts[:, 0], pts[:, 1], pts[:, 2], pts[:, 3], value)
    for _ in range(clutter):
        pts = rng.uniform(0.0, size - 1.0, size=(n, 4))
        value = rng.uniform(0.3, 0.9, size=n)
        _draw_segments(canvas, pts[:, 0], pts[:, 1], pts[:, 2], pts[:, 3], value)
    canvas += noise * rng.standard_normal(size=canvas.shape, dtype=np.float32)
    x = canvas.reshape(n, size * size)
    return _split(
        "images",
        "images",
        x,
        y,
        classes,
        f"generated {size}x{size} glyphs, {classes} classes of {strokes} strokes, shift ±{shift} px, "
        f"{clutter} clutter strokes, noise σ={noise}, {n} samples",
        IMAGE_FRACTIONS,
    )


# --- generated text --------------------------------------------------------------------------


def text_task(
    seed: int = 11,
    *,
    classes: int = 10,
    per_class: int = 1000,
    vocab: int = 300,
    length: tuple[int, int] = (16, 48),
    topic_pool: int = 100,
    topic_words: int = 20,
    topic_share: tuple[float, float] = (0.05, 0.25),
) -> Task:
    """Generated documents as bag-of-words features (counts / length). Class topics are
    Dirichlet weights on ``topic_words`` words of a shared ``topic_pool`` (overlapping);
    each document draws a share in ``topic_share`` of its tokens from its class topic and the
    rest from a Zipf background."""
    rng = np.random.default_rng(seed)
    rank = rng.permutation(vocab)
    background = 1.0 / (rank + 10.0)
    background /= background.sum()
    pool = rng.choice(vocab, size=topic_pool, replace=False)
    topics = np.zeros((classes, vocab))
    for c in range(classes):
        words = rng.choice(pool, size=topic_words, replace=False)
        topics[c, words] = rng.dirichlet(np.full(topic_words, 0.7))
    n = classes * per_class
    y = np.repeat(np.arange(classes), per_class)
    max_len = length[1]
    lengths = rng.integers(length[0], length[1] + 1, size=n)
    share = rng.uniform(*topic_share, size=n)
    bg_tokens = rng.choice(vocab, size=(n, max_len), p=background)
    topic_tokens = np.empty((n, max_len), dtype=np.int64)
    for c in range(classes):
        rows = np.flatnonzero(y == c)
        topic_tokens[rows] = rng.choice(vocab, size=(len(rows), max_len), p=topics[c])
    from_topic = rng.random((n, max_len)) < share[:, None]
    tokens = np.where(from_topic, topic_tokens, bg_tokens)
    valid = np.arange(max_len)[None, :] < lengths[:, None]
    x = np.zeros((n, vocab))
    rows = np.broadcast_to(np.arange(n)[:, None], tokens.shape)
    np.add.at(x, (rows[valid], tokens[valid]), 1.0)
    x /= lengths[:, None]
    return _split(
        "text",
        "text",
        x,
        y,
        classes,
        f"generated documents of {length[0]}-{length[1]} tokens over {vocab} words, {classes} "
        f"overlapping topics ({topic_words} of {topic_pool} content words), topic share "
        f"{topic_share[0]}-{topic_share[1]}, bag of words, {n} samples",
    )


# --- generated audio -------------------------------------------------------------------------


def _band_matrix(n_fft: int, rate: int, bands: int, f_lo: float = 80.0) -> np.ndarray:
    """Triangular log-spaced filters (bands × frequency bins), mel-like."""
    freqs = np.fft.rfftfreq(n_fft, 1.0 / rate)
    edges = np.geomspace(f_lo, rate / 2, bands + 2)
    fb = np.zeros((bands, freqs.size))
    for b in range(bands):
        left, mid, right = edges[b], edges[b + 1], edges[b + 2]
        up = (freqs - left) / (mid - left)
        down = (right - freqs) / (right - mid)
        fb[b] = np.clip(np.minimum(up, down), 0.0, None)
    return fb


def audio_task(
    seed: int = 13,
    *,
    classes: int = 10,
    per_class: int = 500,
    rate: int = 8000,
    samples: int = 2048,
    n_fft: int = 256,
    bands: int = 16,
    pitch_jitter: float = 0.12,
    snr_db: tuple[float, float] = (-6.0, 6.0),
    chunk: int = 1024,
) -> Task:
    """Generated tones → pooled log spectrograms. A class: a pitch band, a harmonic timbre, a
    glide and an AM rate; a sample: pitch jitter (±``pitch_jitter``, relative), random phases
    and onset, a distractor tone, white noise at a random SNR in ``snr_db``. Every random
    parameter is drawn first; the waves are then synthesized ``chunk`` samples at a time."""
    rng = np.random.default_rng(seed)
    harmonics = 6
    f0 = np.geomspace(180.0, 900.0, classes)[rng.permutation(classes)]
    timbre = rng.dirichlet(np.ones(harmonics), size=classes)
    glide = rng.uniform(-0.5, 0.5, size=classes)  # octaves over the clip
    am_rate = rng.uniform(0.0, 24.0, size=classes)
    n = classes * per_class
    y = np.repeat(np.arange(classes), per_class)
    pitch = f0[y] * np.exp(rng.uniform(-pitch_jitter, pitch_jitter, size=n))
    amps = timbre[y] * rng.uniform(0.7, 1.3, size=(n, harmonics))
    phases = rng.uniform(0.0, 2 * np.pi, size=(n, harmonics))
    am_phase = rng.uniform(0.0, 2 * np.pi, size=n)
    onset = rng.integers(0, samples // 4, size=n)
    distractor = rng.uniform(150.0, 2500.0, size=n)
    distractor_amp = rng.uniform(0.1, 0.5, size=n)
    distractor_phase = rng.uniform(0.0, 2 * np.pi, size=n)
    snr = 10 ** (rng.uniform(*snr_db, size=n) / 10)

    t = np.arange(samples) / rate
    dur = samples / rate
    hop = n_fft // 2
    frames = (samples - n_fft) // hop + 1
    window = np.hanning(n_fft)
    idx = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
    bank = _band_matrix(n_fft, rate, bands).T
    x = np.empty((n, frames * bands))
    for lo in range(0, n, chunk):
        rows = slice(lo, min(n, lo + chunk))
        # instantaneous frequency f(t) = pitch·2^(glide·t/dur), phase = 2π ∫ f
        g = glide[y[rows]][:, None]
        flat = np.abs(g) < 1e-9
        k = np.log(2.0) * np.where(flat, 1.0, g) / dur
        integral = np.where(flat, t[None, :], (np.exp(k * t[None, :]) - 1.0) / k)
        base = 2 * np.pi * pitch[rows, None] * integral
        wave = np.zeros((base.shape[0], samples))
        for h in range(harmonics):
            wave += amps[rows, h, None] * np.sin((h + 1) * base + phases[rows, h, None])
        am = 1.0 + 0.6 * np.sin(2 * np.pi * am_rate[y[rows]][:, None] * t + am_phase[rows, None])
        env = np.clip((np.arange(samples)[None, :] - onset[rows, None]) / 200.0, 0.0, 1.0)
        wave *= am * env
        wave += distractor_amp[rows, None] * np.sin(
            2 * np.pi * distractor[rows, None] * t + distractor_phase[rows, None]
        )
        power = (wave**2).mean(axis=1, keepdims=True)
        noise = rng.standard_normal(size=wave.shape)  # drawn chunk by chunk, in order
        wave += noise * np.sqrt(power / snr[rows, None])
        spec = np.abs(np.fft.rfft(wave[:, idx] * window, axis=2))  # (rows, frames, bins)
        x[rows] = np.log1p(spec @ bank).reshape(-1, frames * bands)
    task = _split(
        "audio",
        "audio",
        x,
        y,
        classes,
        f"generated {samples / rate:.3f} s tones at {rate} Hz, {classes} classes (pitch band, "
        f"timbre, glide, AM), pitch jitter ±{pitch_jitter}, SNR {snr_db[0]}..{snr_db[1]} dB, "
        f"{frames}x{bands} log spectrogram, {n} samples",
    )
    mean = task.x_train.mean(axis=0)
    std = task.x_train.std(axis=0) + 1e-6

    def norm(a: np.ndarray) -> np.ndarray:
        out: np.ndarray = ((a - mean) / std).astype(np.float32)
        return out

    return dataclasses.replace(
        task,
        x_train=norm(task.x_train),
        x_val=norm(task.x_val),
        x_test=norm(task.x_test),
    )


# --- class splits and helpers ------------------------------------------------------------------


def class_split(num_classes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The parents' disjoint tasks: the lower and the upper half of the classes."""
    half = num_classes // 2
    return tuple(range(half)), tuple(range(half, num_classes))


def partial_split(num_classes: int, share: float = 0.6) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The partly covered control: the first ``share`` of each half; the rest of the child's
    classes is seen by no parent."""
    low, high = class_split(num_classes)
    k = max(1, int(len(low) * share))
    return low[:k], high[:k]


def subset(x: np.ndarray, y: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``classes``, relabelled ``0 .. len(classes) - 1`` in the given order."""
    lookup = np.full(int(y.max()) + 1 if y.size else 0, -1, dtype=np.int64)
    lookup[list(classes)] = np.arange(len(classes))
    mask = np.isin(y, classes)
    return x[mask], lookup[y[mask]]


def fingerprint(task: Task) -> str:
    """sha-256 over every array of the task (shapes, dtypes and bytes), hex."""
    h = hashlib.sha256(task.name.encode())
    for a in (task.x_train, task.y_train, task.x_val, task.y_val, task.x_test, task.y_test):
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def nearest_centroid_accuracy(task: Task, split: str = "val") -> float:
    """Accuracy of the class means of the training split (a cheap linear baseline)."""
    centroids = np.stack(
        [task.x_train[task.y_train == c].mean(axis=0) for c in range(task.num_classes)]
    )
    x = getattr(task, f"x_{split}")
    y = getattr(task, f"y_{split}")
    d = (x**2).sum(1)[:, None] - 2 * x @ centroids.T + (centroids**2).sum(1)[None, :]
    return float((d.argmin(axis=1) == y).mean())


TASKS: dict[str, Callable[[], Task]] = {
    "digits": digits_task,
    "images": image_task,
    "text": text_task,
    "audio": audio_task,
}
"""Task name → generator with the benchmark's settings."""


def main() -> None:
    for name, make in TASKS.items():
        task = make()
        print(
            f"{name:7s} {task.modality:6s} train {task.x_train.shape} val {task.x_val.shape} "
            f"test {task.x_test.shape} classes {task.num_classes} "
            f"nearest-centroid val {nearest_centroid_accuracy(task):.3f} "
            f"sha256 {fingerprint(task)[:16]}"
        )
        print(f"        {task.description}")


if __name__ == "__main__":
    main()
