"""The small judge: a reward model r(prompt, answer) on frozen MiniLM embeddings plus surface features.

Trained with a Bradley-Terry loss, P(b better than a) = sigmoid(r_b - r_a), on a big judge's soft labels. Because
each answer gets its own reward, the incumbent's side of a comparison is computed once and reused for every
candidate, and the pointwise score is P(answer beats a typical training answer) = sigmoid(r - r_reference).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evaluators.answer_features import answer_features, feature_names
from evaluators.base import bounded_version
from evaluators.encoder import EMBEDDING_DIM, Backend, EncoderSettings, LruEmbedder, TextEmbedder, TextEncoder
from evaluators.word_profile import WordProfiles, profile_reward, word_profiles
from shadowjudge.errors import ShadowJudgeError

SPEC_FILE = "judge.json"
WEIGHTS_FILE = "head.npz"
WORDS_KEY = "words"  # the word-profile weights in head.npz, beside the MLP's
FORMAT_VERSION = 1


class JudgeLoadError(ShadowJudgeError):
    """A judge directory that cannot be loaded; says which file and why."""


@dataclass
class JudgeSpec:
    """Everything besides the head weights needed to rebuild a judge; saved next to them as judge.json."""

    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    use_length: bool = True
    prompt_interaction: bool = True
    hidden: int = 64
    feature_mean: list[float] = field(default_factory=list)
    feature_std: list[float] = field(default_factory=list)
    reference_reward: float = 0.0
    # Length-controlled training fits the big judge's length preference as its own term, w * log(1 + characters);
    # a judge that keeps it reproduces the teacher's taste, one that drops it (w = 0) scores content alone.
    length_weight: float = 0.0
    # Buckets of the whole-answer word profile (evaluators.word_profile); 0: no word term.
    word_buckets: int = 0
    serving_backend: str = "onnx"  # "onnx-int8" only when training measured that int8 keeps agreement
    trained_on: str = ""
    # Models whose answers the head was fitted on (both sides of its training pairs): measurements that claim to be
    # on unseen models leave these out.
    trained_models: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def length_reward(self, lengths) -> np.ndarray:
        """The kept length term of the reward for answers of `lengths` characters (zeros when it was dropped)."""
        return self.length_weight * np.log1p(np.asarray(lengths, dtype=np.float64))

    def input_dim(self) -> int:
        return EMBEDDING_DIM * (2 if self.prompt_interaction else 1) + len(feature_names(self.use_length))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "JudgeSpec":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise JudgeLoadError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format_version") != FORMAT_VERSION:
            raise JudgeLoadError(f"judge format {data.get('format_version')} is not {FORMAT_VERSION}")
        data["encoder"] = EncoderSettings(**data["encoder"])
        return cls(**data)


def build_head(spec: JudgeSpec):
    """The trainable part: a small MLP (or a linear layer when hidden == 0) from features to one reward."""
    import torch

    if spec.hidden <= 0:
        return torch.nn.Linear(spec.input_dim(), 1)
    return torch.nn.Sequential(
        torch.nn.Linear(spec.input_dim(), spec.hidden),
        torch.nn.GELU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(spec.hidden, 1),
    )


def head_inputs(spec: JudgeSpec, answer_emb: np.ndarray, prompt_emb: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Concatenate [answer embedding, answer*prompt, standardised features] as the head expects them."""
    parts = [answer_emb]
    if spec.prompt_interaction:
        parts.append(answer_emb * prompt_emb * np.sqrt(EMBEDDING_DIM))
    mean = np.asarray(spec.feature_mean, dtype=np.float32)
    std = np.asarray(spec.feature_std, dtype=np.float32)
    parts.append((features - mean) / std)
    return np.concatenate(parts, axis=1).astype(np.float32)


class RewardHead:
    """The trained part of a judge: the MLP on head inputs, the word-profile term and the kept length term. The one
    place the terms of a reward are added up: serving, training and the experiments all score through it."""

    def __init__(self, spec: JudgeSpec, state: dict[str, np.ndarray]) -> None:
        import torch

        self.spec = spec
        self.mlp = build_head(spec)
        try:
            self.mlp.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items() if k != WORDS_KEY})
        except (RuntimeError, KeyError) as exc:
            raise JudgeLoadError(f"head weights do not match judge.json: {exc}") from exc
        self.mlp.eval()
        self.word_weights: np.ndarray | None = None
        if spec.word_buckets:
            words = state.get(WORDS_KEY)
            if words is None or np.shape(words) != (spec.word_buckets,):
                raise JudgeLoadError(f"judge.json names {spec.word_buckets} word buckets but head.npz has "
                                     f"{'none' if words is None else np.shape(words)}")
            self.word_weights = np.asarray(words, dtype=np.float32)

    def state(self) -> dict[str, np.ndarray]:
        """All trained weights by name, as saved in head.npz."""
        state = {k: v.detach().numpy() for k, v in self.mlp.state_dict().items()}
        if self.word_weights is not None:
            state[WORDS_KEY] = self.word_weights
        return state

    def rewards(self, inputs: np.ndarray, profiles: WordProfiles | None,
                lengths: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rewards of answers given their `head_inputs`, word profiles (needed only with a word term) and lengths."""
        import torch

        with torch.inference_mode():
            rewards = self.mlp(torch.from_numpy(np.asarray(inputs, dtype=np.float32))).squeeze(-1).numpy()
        rewards = rewards.astype(np.float64)
        if self.word_weights is not None:
            if profiles is None:
                raise ValueError("this judge has a word-profile term: pass the answers' word profiles")
            rewards += profile_reward(self.word_weights, profiles)
        return rewards + self.spec.length_reward(lengths)


class SmallJudge:
    """The fine-tuned small judge as an `Evaluator`: pointwise scores and pairwise preferences on CPU."""

    def __init__(self, spec: JudgeSpec, head_state: dict[str, np.ndarray], *, version: str,
                 embedder: TextEmbedder | None = None, cache_size: int = 8192, batch_size: int = 32,
                 backend: Backend | None = None) -> None:
        self.spec = spec
        self.version = bounded_version(version)
        self.reward_head = RewardHead(spec, head_state)
        if embedder is None:
            encoder = TextEncoder(spec.encoder, batch_size=batch_size, backend=backend or spec.serving_backend)
            embedder = LruEmbedder(encoder, cache_size)
        self.embedder = embedder

    # -- persistence -------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SPEC_FILE).write_text(self.spec.to_json())
        np.savez(directory / WEIGHTS_FILE, **self.state())
        return directory

    def state(self) -> dict[str, np.ndarray]:
        """All trained weights by name, as saved in head.npz."""
        return self.reward_head.state()

    @classmethod
    def load(cls, directory: str | Path, *, version: str | None = None, name: str | None = None,
             **kwargs) -> "SmallJudge":
        """The judge saved in `directory`. Its version, unless given, is `small-judge:<name>@<digest of its files>`
        (`name` defaults to the directory's): a registry reuses a version number once a model is deleted and
        registered again, and judgments are keyed by version, so the files must be part of it."""
        directory = Path(directory)
        spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
        for p in (spec_path, weights_path):
            if not p.exists():
                raise JudgeLoadError(f"{directory}: missing {p.name}; not a small-judge directory")
        try:
            spec = JudgeSpec.from_json(spec_path.read_text())
        except (OSError, ValueError, TypeError, KeyError, JudgeLoadError) as exc:
            raise JudgeLoadError(f"{spec_path}: {exc}") from exc
        try:  # arrays only: a head.npz that asks to unpickle objects is not one this code wrote
            with np.load(weights_path, allow_pickle=False) as data:
                state = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            reason = str(exc).split(". ")[0]  # numpy goes on to suggest unpickling a file it does not trust
            raise JudgeLoadError(f"{weights_path}: not readable as head weights (an .npz of arrays): {reason}") from exc
        if version is None:
            digest = hashlib.sha1(spec_path.read_bytes() + weights_path.read_bytes()).hexdigest()[:12]
            version = f"small-judge:{name or directory.name}@{digest}"
        return cls(spec, state, version=version, **kwargs)

    # -- scoring -----------------------------------------------------------------------------------------------
    def rewards_from_embeddings(self, prompts: Sequence[str], answers: Sequence[str],
                                prompt_emb: np.ndarray, answer_emb: np.ndarray) -> np.ndarray:
        feats = answer_features(prompts, answers, self.spec.use_length)
        profiles = word_profiles(answers, self.spec.word_buckets) if self.spec.word_buckets else None
        return self.reward_head.rewards(head_inputs(self.spec, answer_emb, prompt_emb, feats), profiles,
                                        [len(a or "") for a in answers])

    def rewards(self, prompts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """Unnormalised reward of each answer to its prompt; only differences (and r - r_reference) mean much."""
        _check_lengths(prompts, answers)
        if not answers:
            return np.zeros(0)
        prompt_emb = self.embedder.embed(prompts) if self.spec.prompt_interaction else None
        answer_emb = self.embedder.embed(answers)
        if prompt_emb is None:
            prompt_emb = np.zeros_like(answer_emb)
        return self.rewards_from_embeddings(prompts, answers, prompt_emb, answer_emb)

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        r = self.rewards(prompts, answers)
        return _sigmoid(r - self.spec.reference_reward).tolist()

    def compare(self, prompts: Sequence[str], incumbent: Sequence[str], candidate: Sequence[str]) -> list[float]:
        _check_lengths(prompts, incumbent, candidate)
        r = self.rewards(list(prompts) * 2, list(incumbent) + list(candidate))
        n = len(prompts)
        return _sigmoid(r[n:] - r[:n]).tolist()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def _check_lengths(*seqs: Sequence[str]) -> None:
    n = {len(s) for s in seqs}
    if len(n) > 1:
        raise ValueError(f"prompts and answers must have the same length, got {[len(s) for s in seqs]}")
