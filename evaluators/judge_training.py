"""Distil a big judge's pairwise labels into the small judge, measure it on unseen models, register it.

One call does it all, seeded: split by model, embed every answer once (cached on disk), fit reward heads for each
candidate configuration (all logged to MLflow), keep the best on the validation models, measure it on the held-out
models, register it, and give it the `champion` alias only if it beats the current champion on the same held-out
set (else `challenger`).
"""

from __future__ import annotations

import math
import random
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from evaluators.answer_features import answer_features, feature_names
from evaluators.encoder import EmbeddingCache, EncoderSettings, TextEmbedder
from evaluators.judge_metrics import ReferenceComparisons, longest_wins, pair_metrics, system_metrics
from evaluators.preference_data import (
    REFERENCE_MODEL,
    LabelledPair,
    LeaderboardRow,
    ModelSplit,
    PreferenceData,
    PreferenceDataError,
    load_preference_data,
    load_preference_sets,
    split_by_model,
)
from evaluators.small_judge import (
    WORDS_KEY,
    JudgeLoadError,
    JudgeSpec,
    RewardHead,
    SmallJudge,
    build_head,
    head_inputs,
)
from evaluators.word_profile import WordProfiles, word_profiles
from shadowjudge.errors import InputError

if TYPE_CHECKING:
    from evaluators.judge_registry import RegisteredJudge

DEFAULT_CACHE_DIR = Path(".shadowjudge/cache")
DEFAULT_EXPERIMENT = "shadowjudge-judge-training"
SELECTION_METRIC = "agreement"  # the fallback when a set has no leaderboard rows to rank models by


def selection_key(metrics: dict[str, float]) -> tuple[bool, float]:
    """What head selection and the champion contest maximise: how well the judge ranks unseen models, the mean of
    its Spearman correlations with the leaderboard's win_rate and lc_win_rate. The product decides between models,
    so ranking them is the job; pair agreement alone rewards leaning on length (the teacher's bias), which ranks
    long, weak models high.

    (ranks, score): a judge whose Spearman is undefined (no leaderboard rows, or every win rate tied, as a collapsed
    judge's 0.5 for every pair) is scored by pair agreement, which is on another scale, so it loses to any judge
    that ranks; two judges that cannot rank are compared on agreement."""
    rhos = [metrics.get(k, float("nan")) for k in ("spearman_win_rate", "spearman_lc_win_rate")]
    rhos = [r for r in rhos if np.isfinite(r)]
    if rhos:
        return True, float(np.mean(rhos))
    return False, float(metrics.get(SELECTION_METRIC, float("-inf")))


def selection_score(metrics: dict[str, float]) -> float:
    """The number `selection_key` compares (logged with every candidate beside `selection_ranks`): the mean
    Spearman, or pair agreement."""
    return selection_key(metrics)[1]


@dataclass(frozen=True)
class HeadConfig:
    """One candidate reward head; training compares several and keeps the best on validation models."""

    name: str
    use_length: bool = True
    prompt_interaction: bool = True
    hidden: int = 64
    epochs: int = 30
    lr: float = 2e-3
    weight_decay: float = 1e-2
    batch_size: int = 512
    # Length-controlled training: the loss gets its own term w * (log length b - log length a), so the big judge's
    # taste for long answers is explained by w instead of being learned into the reward. At inference the term is
    # dropped (content alone), or kept with `keep_length_term` (the teacher's taste, length made explicit).
    length_controlled: bool = False
    keep_length_term: bool = False
    # A linear term on the whole answer's word profile (evaluators.word_profile) over this many hashed buckets.
    word_buckets: int = 0
    word_weight_decay: float = 1e-4


@dataclass(frozen=True)
class TrainSettings:
    encoder: EncoderSettings = field(default_factory=lambda: EncoderSettings(pooling="layer-mean"))
    # Spearman with win_rate / lc_win_rate, 5-fold cross-validation by model over seed 0's 39 training models
    # (128 tokens): with length features 0.55 / 0.29 (it learns the teacher's length bias and ranks long, weak
    # models high); length-controlled without length features 0.77 / 0.65 (64 units, 30 epochs) and 0.78 / 0.68
    # (256 units, 60 epochs); keeping the fitted length term at inference 0.57 / 0.34; longest-wins 0.46 / 0.16.
    # With the whole answer's word profile: 0.79 / 0.79 (256 units, 30 epochs; chosen) and 0.78 / 0.79 (64 units).
    # Over all 49 models (judge_experiments): 0.84 / 0.79 with the word profile, 0.81 / 0.71 without (256 units);
    # with the encoder's layers averaged (pooling "layer-mean") 0.84 / 0.81, balanced agreement 0.75 vs 0.74.
    heads: tuple[HeadConfig, ...] = (
        HeadConfig("mlp256-nolength-lc", use_length=False, hidden=256, weight_decay=5e-2, epochs=60,
                   length_controlled=True),
        HeadConfig("mlp-nolength-lc-words", use_length=False, length_controlled=True, word_buckets=2 ** 18),
        HeadConfig("mlp256-nolength-lc-words", use_length=False, hidden=256, weight_decay=5e-2,
                   length_controlled=True, word_buckets=2 ** 18),
    )
    heldout_fraction: float = 0.2
    # Heads are chosen by cross-validation by model over the training models (`selection_folds` folds: every
    # training model is judged once by a head that never saw it), or, with 0 folds, on a validation share of them.
    selection_folds: int = 5
    validation_fraction: float = 0.0
    max_prompts: int | None = None
    int8_check_pairs: int = 1500  # held-out pairs re-judged with the int8 encoder; 0 skips (serve fp32 ONNX)


# The demo's judge. With the mini set's 11 models the head cannot learn much beyond length, so it gets no explicit
# length features: in 4-fold cross-validation by model on the mini set (160 prompts, 64 tokens) that ranks models
# better (Spearman vs win_rate 0.76 vs 0.72, vs lc_win_rate 0.74 vs 0.69) and leans less on length (prefers the
# longer answer 84% vs 88%) for 2 points less agreement with the length-biased labels.
QUICK = TrainSettings(
    encoder=EncoderSettings(max_tokens=64),
    max_prompts=160,
    heads=(HeadConfig("mlp-nolength", use_length=False, epochs=40),),
    heldout_fraction=0.25,
    selection_folds=0,
    validation_fraction=0.0,
    int8_check_pairs=0,
)
FULL = TrainSettings()


@dataclass
class TrainResult:
    run_id: str
    registered_name: str
    version: str
    model_uri: str
    alias: str
    head: str
    metrics: dict[str, float]
    champion_metrics: dict[str, float] | None
    heldout_models: list[str]
    duration_s: float
    alias_reason: str = ""  # why the judge got its alias

    def as_dict(self) -> dict:
        return asdict(self)


class ChampionUnusable(InputError):
    """The registered champion will not load: a training would fail at its contest, after all its work."""


Progress = Callable[[str, int, int], None]  # (stage, done, total)


# -- embedding the corpus ------------------------------------------------------------------------------------------
@dataclass
class EmbeddedAnswers:
    """Every answer of a dataset embedded once: rows indexed by (prompt_id, model)."""

    index: dict[tuple[str, str], int]
    prompts: list[str]
    answers: list[str]
    answer_emb: np.ndarray
    prompt_emb: np.ndarray
    features: np.ndarray  # with length features first; sliced for heads that do not use them
    lengths: np.ndarray
    _profiles: dict[int, WordProfiles] = field(default_factory=dict, repr=False)

    def rows(self, keys: Sequence[tuple[str, str]]) -> np.ndarray:
        return np.asarray([self.index[k] for k in keys], dtype=np.int64)

    def word_profiles(self, buckets: int) -> WordProfiles:
        """Every answer's word profile, computed once per bucket count."""
        if buckets not in self._profiles:
            self._profiles[buckets] = word_profiles(self.answers, buckets)
        return self._profiles[buckets]


def embed_answers(data: PreferenceData, keys: Sequence[tuple[str, str]], embedder: TextEmbedder) -> EmbeddedAnswers:
    keys = list(dict.fromkeys(keys))
    prompts = [data.prompts[pid] for pid, _ in keys]
    answers = [data.outputs[k] for k in keys]
    prompt_ids = sorted({pid for pid, _ in keys})
    prompt_vectors = dict(zip(prompt_ids, embedder.embed([data.prompts[p] for p in prompt_ids])))
    return EmbeddedAnswers(
        index={k: i for i, k in enumerate(keys)},
        prompts=prompts,
        answers=answers,
        answer_emb=embedder.embed(answers),
        prompt_emb=np.stack([prompt_vectors[pid] for pid, _ in keys]),
        features=answer_features(prompts, answers, use_length=True),
        lengths=np.asarray([len(a) for a in answers], dtype=np.int64),
    )


def feature_columns(use_length: bool) -> slice:
    """Columns of EmbeddedAnswers.features a head uses (length features come first)."""
    n_length = len(feature_names(True)) - len(feature_names(False))
    return slice(0, None) if use_length else slice(n_length, None)


def answer_rewards(emb: EmbeddedAnswers, spec: JudgeSpec, state: dict[str, np.ndarray]) -> np.ndarray:
    """A head's reward for every embedded answer at once, from the precomputed embeddings, features and word
    profiles (no encoder involved)."""
    inputs = head_inputs(spec, emb.answer_emb, emb.prompt_emb, emb.features[:, feature_columns(spec.use_length)])
    profiles = emb.word_profiles(spec.word_buckets) if spec.word_buckets else None
    return RewardHead(spec, state).rewards(inputs, profiles, emb.lengths)


# -- fitting a head ------------------------------------------------------------------------------------------------
def fit_head(emb: EmbeddedAnswers, pairs: Sequence[LabelledPair], config: HeadConfig, encoder: EncoderSettings,
             seed: int, *, progress: Progress | None = None, trained_on: str = "") -> tuple[JudgeSpec, dict]:
    """Train one reward head with the Bradley-Terry loss on soft labels; returns its spec and weights."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only add barrier waits (10x slower on a busy machine)
    try:
        return _fit_head(emb, pairs, config, encoder, seed, progress, trained_on)
    finally:
        torch.set_num_threads(threads)


def _fit_head(emb: EmbeddedAnswers, pairs: Sequence[LabelledPair], config: HeadConfig, encoder: EncoderSettings,
              seed: int, progress: Progress | None, trained_on: str) -> tuple[JudgeSpec, dict]:
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    feats = emb.features[:, feature_columns(config.use_length)]
    a = torch.from_numpy(emb.rows([(p.prompt_id, p.model_a) for p in pairs]))
    b = torch.from_numpy(emb.rows([(p.prompt_id, p.model_b) for p in pairs]))
    seen = np.unique(np.concatenate([a.numpy(), b.numpy()]))  # training answers only: no held-out statistics
    spec = JudgeSpec(
        encoder=encoder,
        use_length=config.use_length,
        prompt_interaction=config.prompt_interaction,
        hidden=config.hidden,
        feature_mean=feats[seen].mean(0).tolist(),
        feature_std=np.maximum(feats[seen].std(0), 1e-3).tolist(),
        trained_on=trained_on,
        trained_models=sorted({m for p in pairs for m in (p.model_a, p.model_b)}),
        word_buckets=config.word_buckets,
    )
    x = torch.from_numpy(head_inputs(spec, emb.answer_emb, emb.prompt_emb, feats))
    y = torch.tensor([p.p_b_better for p in pairs], dtype=torch.float32)
    head = build_head(spec)
    params = [{"params": head.parameters(), "weight_decay": config.weight_decay}]
    log_len = torch.from_numpy(np.log1p(emb.lengths.astype(np.float32)))
    length_weight = torch.zeros(1, requires_grad=True)
    max_lr = [config.lr]
    if config.length_controlled:
        length_weight.data[:] = _fit_length_weight(log_len[b] - log_len[a], y)
        params.append({"params": [length_weight], "weight_decay": 0.0})
        max_lr.append(config.lr * 5)
    profiles = emb.word_profiles(config.word_buckets) if config.word_buckets else None
    words = None
    if profiles is not None:
        words = torch.zeros(config.word_buckets, 1, requires_grad=True)
        params.append({"params": [words], "weight_decay": config.word_weight_decay})
        max_lr.append(config.lr * 5)
    opt = torch.optim.AdamW(params, lr=config.lr)
    steps_per_epoch = max(1, math.ceil(len(pairs) / config.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=config.epochs * steps_per_epoch)
    head.train()
    for epoch in range(config.epochs):
        order = torch.from_numpy(rng.permutation(len(pairs)))
        for start in range(0, len(pairs), config.batch_size):
            idx = order[start:start + config.batch_size]
            ra = head(x[a[idx]]).squeeze(-1)
            rb = head(x[b[idx]]).squeeze(-1)
            logit = rb - ra
            if config.length_controlled:
                logit = logit + length_weight * (log_len[b[idx]] - log_len[a[idx]])
            if words is not None:
                logit = logit + _word_term(words, profiles, b[idx]) - _word_term(words, profiles, a[idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            progress(f"head {config.name}", epoch + 1, config.epochs)
    head.eval()
    if config.length_controlled and config.keep_length_term:
        spec.length_weight = float(length_weight.detach())
    state = {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}
    if words is not None:
        state[WORDS_KEY] = words.detach().squeeze(1).numpy().copy()
    rewards = RewardHead(spec, state).rewards(x.numpy(), profiles, emb.lengths)  # inputs built above
    # Pointwise score 0.5 = as good as a typical training answer (all models, both sides of every pair).
    spec.reference_reward = float(np.mean(rewards[seen]))
    return spec, state


def _word_term(words, profiles: WordProfiles, rows):
    """The word-profile term of the reward for answers `rows` (differentiable in `words`)."""
    import torch

    part = profiles.take(rows.numpy())
    return torch.nn.functional.embedding_bag(torch.from_numpy(part.ids), words, torch.from_numpy(part.offsets[:-1]),
                                             mode="sum", per_sample_weights=torch.from_numpy(part.weights)
                                             ).squeeze(-1)


def _fit_length_weight(log_len_diff, labels) -> float:
    """The 'longer wins' logistic fit on its own, P(b better) = sigmoid(w * log length ratio): the starting point of
    the length term in length-controlled training."""
    import torch

    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=0.5, max_iter=50)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(w * log_len_diff, labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(w.detach())


# -- measuring a judge ---------------------------------------------------------------------------------------------
def quality_report(judge: SmallJudge, data: PreferenceData, pairs: Sequence[LabelledPair], models: Sequence[str],
                   *, chunk: int = 512, progress: Progress | None = None) -> dict:
    """Pair agreement on `pairs` (overall and per annotator) and system-level Spearman over `models` (each judged
    against the reference on every prompt), for the judge and for the 'longest answer wins' baseline: of plain win
    rates, and of length-controlled ones computed as the leaderboard computes lc_win_rate."""
    pred = _compare_in_chunks(judge, data, [(p.prompt_id, p.model_a, p.model_b) for p in pairs], chunk, progress)
    len_a = np.asarray([len(data.answer(p.prompt_id, p.model_a)) for p in pairs])
    len_b = np.asarray([len(data.answer(p.prompt_id, p.model_b)) for p in pairs])
    labels = np.asarray([p.p_b_better for p in pairs])
    base = longest_wins(len_a, len_b)
    report: dict = {
        "instance": pair_metrics(pred, labels, len_a, len_b).as_dict(),
        "instance_baseline_longest": pair_metrics(base, labels, len_a, len_b).as_dict(),
        "instance_by_annotator": {},
    }
    annotators = np.asarray([p.annotator for p in pairs])
    for name in sorted(set(annotators.tolist())):
        m = annotators == name
        report["instance_by_annotator"][name] = {
            "judge": pair_metrics(pred[m], labels[m], len_a[m], len_b[m]).as_dict(),
            "baseline_longest": pair_metrics(base[m], labels[m], len_a[m], len_b[m]).as_dict(),
        }
    system = system_win_rates(judge, data, models, chunk=chunk, progress=progress)
    if system:
        longest = system.longest_answer_wins()
        judged, baseline = system.win_rates(), longest.win_rates()
        judged_lc, baseline_lc = system.length_controlled_win_rates(), longest.length_controlled_win_rates()
        report["system"] = system_metrics(judged, data.leaderboard).as_dict()
        report["system_baseline_longest"] = system_metrics(baseline, data.leaderboard).as_dict()
        report["system_length_controlled"] = system_metrics(judged_lc, data.leaderboard).as_dict()
        report["system_length_controlled_baseline_longest"] = system_metrics(baseline_lc, data.leaderboard).as_dict()
        # The teacher's own labels through the same GLM: how closely that gives back the published lc_win_rate on
        # these models, which is what a judge that reproduced its teacher exactly would score.
        labelled = [i for i, p in enumerate(pairs) if p.model_a == REFERENCE_MODEL and p.model_b in judged]
        teacher_lc = reference_comparisons(
            [(pairs[i].prompt_id, pairs[i].model_a, pairs[i].model_b) for i in labelled], labels[labelled],
            len_a[labelled], len_b[labelled]).length_controlled_win_rates()
        if teacher_lc:
            report["system_teacher_length_controlled"] = system_metrics(teacher_lc, data.leaderboard).as_dict()
        report["win_rates"] = {
            m: {"judge": round(judged[m], 2), "longest": round(baseline[m], 2),
                "judge_length_controlled": round(judged_lc[m], 2),
                "teacher_length_controlled": round(teacher_lc[m], 2) if m in teacher_lc else None,
                **_leaderboard_figures(data.leaderboard.get(m))}
            for m in sorted(judged, key=lambda k: -judged[k])
        }
    return report


def _leaderboard_figures(row: LeaderboardRow | None) -> dict[str, float | None]:
    """A model's published win rates beside the judge's; null for a model the leaderboard does not list."""
    return {"leaderboard_win_rate": None if row is None else round(row.win_rate, 2),
            "leaderboard_lc_win_rate": None if row is None or row.lc_win_rate is None else round(row.lc_win_rate, 2)}


def measure(judge: SmallJudge, data: PreferenceData, pairs: Sequence[LabelledPair], models: Sequence[str],
            *, chunk: int = 512, progress: Progress | None = None) -> dict[str, float]:
    """`quality_report` flattened to MLflow metrics: agreement..., baseline_..., spearman_..."""
    report = quality_report(judge, data, pairs, models, chunk=chunk, progress=progress)
    out = dict(report["instance"])
    out.update({f"baseline_{k}": v for k, v in report["instance_baseline_longest"].items()})
    out.update(report.get("system", {}))
    out.update({f"baseline_{k}": v for k, v in report.get("system_baseline_longest", {}).items()})
    out.update({f"lc_{k}": v for k, v in report.get("system_length_controlled", {}).items()})
    out.update({f"baseline_lc_{k}": v for k, v in report.get("system_length_controlled_baseline_longest", {}).items()})
    if len(report["instance_by_annotator"]) > 1:  # e.g. GPT-4's labels and a route's teacher, trained on together
        for name, by_annotator in report["instance_by_annotator"].items():
            key = re.sub(r"[^\w.\- /]", "_", name) or "unnamed"  # what MLflow accepts in a metric name
            out[f"agreement_by_annotator/{key}"] = by_annotator["judge"]["agreement"]
    return out


def system_win_rates(judge: SmallJudge, data: PreferenceData, models: Sequence[str], *,
                     reference: str = REFERENCE_MODEL, chunk: int = 512, progress: Progress | None = None
                     ) -> ReferenceComparisons | None:
    """Each model judged against the reference on all shared prompts, whether or not the leaderboard lists it (its
    win rate is a figure of its own; only the Spearman needs a leaderboard row)."""
    models = [m for m in models if m != reference]
    triples = [(pid, reference, m) for m in models for pid in sorted(data.prompts)
               if (pid, reference) in data.outputs and (pid, m) in data.outputs]
    if not triples:
        return None
    pred = _compare_in_chunks(judge, data, triples, chunk, progress)
    return reference_comparisons(triples, pred, [len(data.answer(p, a)) for p, a, _ in triples],
                                 [len(data.answer(p, b)) for p, _, b in triples])


def reference_comparisons(triples: Sequence[tuple[str, str, str]], preferences: Sequence[float],
                          len_reference: Sequence[int], len_model: Sequence[int]) -> ReferenceComparisons:
    """Group (prompt, reference, model) judgments by model."""
    prefs: dict[str, dict[str, float]] = {}
    deltas: dict[str, dict[str, float]] = {}
    for (pid, _, m), p, lr, lm in zip(triples, preferences, len_reference, len_model):
        prefs.setdefault(m, {})[pid] = float(p)
        deltas.setdefault(m, {})[pid] = float(lm - lr)
    return ReferenceComparisons(prefs, deltas)


def _compare_in_chunks(judge: SmallJudge, data: PreferenceData, triples: Sequence[tuple[str, str, str]],
                       chunk: int, progress: Progress | None) -> np.ndarray:
    out: list[float] = []
    for start in range(0, len(triples), chunk):
        part = triples[start:start + chunk]
        out += judge.compare([data.prompts[p] for p, _, _ in part], [data.answer(p, a) for p, a, _ in part],
                             [data.answer(p, b) for p, _, b in part])
        if progress:
            progress("judging", min(start + chunk, len(triples)), len(triples))
    return np.asarray(out)


class _PrecomputedEmbedder:
    """Serves embeddings already computed for the corpus; encodes nothing."""

    def __init__(self, emb: EmbeddedAnswers, fallback: TextEmbedder) -> None:
        from evaluators.encoder import text_key

        self._key = text_key
        self._rows = {text_key(t): v for t, v in zip(emb.answers, emb.answer_emb)}
        self._rows.update({text_key(t): v for t, v in zip(emb.prompts, emb.prompt_emb)})
        self._fallback = fallback

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        keys = [self._key(t) for t in texts]
        if all(k in self._rows for k in keys):
            return np.stack([self._rows[k] for k in keys]) if keys else np.zeros((0, 384), np.float32)
        return self._fallback.embed(texts)


# -- the one command -----------------------------------------------------------------------------------------------
def train_judge(data_dir: str | Path | Sequence[str | Path], tracking_uri: str, *, quick: bool, seed: int = 0,
                registered_name: str = "shadowjudge-judge", experiment: str = DEFAULT_EXPERIMENT,
                settings: TrainSettings | None = None, cache_dir: str | Path = DEFAULT_CACHE_DIR,
                progress: Progress | None = None, contest: bool = True) -> TrainResult:
    """Train, measure on held-out models, register; `champion` only if it beats the current champion (without
    `contest`, whatever the champion is, e.g. one that no longer loads), and never without held-out figures.

    `data_dir` may be several directories, trained on as one set (`load_preference_sets`)."""
    import mlflow
    import torch

    from evaluators import judge_registry as reg

    started = time.monotonic()
    settings = settings or (QUICK if quick else FULL)
    reg.check_registered_name(registered_name)
    if not 0 <= seed < 2 ** 32:
        raise InputError(f"seed {seed}: must be between 0 and 2**32 - 1")
    cache = EmbeddingCache(Path(cache_dir), settings.encoder)
    found = reg.find_alias(tracking_uri, registered_name, reg.CHAMPION)  # a registry that cannot be used fails here
    champion = _load_champion(tracking_uri, found, cache) if found and contest else None
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    data = load_preference_sets([data_dir] if isinstance(data_dir, (str, Path)) else data_dir)
    if settings.max_prompts:
        data = data.sample_prompts(settings.max_prompts, seed)
    if not data.pairs:
        raise PreferenceDataError(f"{data.source}: no labelled pairs whose two answers are both in outputs")
    _require_decided(data.pairs, f"{data.source}: every labelled pair is a tie (p_b_better 0.5)")
    split = split_by_model(data, settings.heldout_fraction, seed)
    _require_decided(split.train_pairs(data), f"{data.source}: every label of the training models "
                     f"({', '.join(split.train_models)}) is a tie (p_b_better 0.5)")
    fit_split, validation = _validation_split(data, split, settings.validation_fraction, seed)

    keys = sorted({(p.prompt_id, m) for p in data.pairs for m in (p.model_a, p.model_b)}
                  | {k for k in data.outputs if k[1] == REFERENCE_MODEL or k[1] in split.heldout_models})
    todo = cache.missing([data.outputs[k] for k in keys]) + cache.missing(list(data.prompts.values()))
    done = 0

    def encoded(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("embedding", done, todo)

    cache.progress = encoded
    emb = embed_answers(data, keys, cache)
    cache.save()
    embedder = _PrecomputedEmbedder(emb, cache)

    ensure = reg.ensure_experiment(tracking_uri, experiment)
    with reg.tracking(tracking_uri), tempfile.TemporaryDirectory(prefix="shadowjudge-train-") as workdir:
        with mlflow.start_run(experiment_id=ensure, run_name=f"train-{'quick' if quick else 'full'}-seed{seed}") as run:
            mlflow.log_params({
                "data_dir": data.source, "quick": quick, "seed": seed, "n_pairs": len(data.pairs),
                "unlabelled_rows_skipped": data.unlabelled_rows, "n_prompts": len(data.prompts),
                "heldout_models": ",".join(split.heldout_models),
                "validation_models": ",".join(validation.heldout_models) if validation else "",
                **{f"encoder_{k}": v for k, v in asdict(settings.encoder).items()},
            })
            chosen = _select_head(data, emb, split, fit_split, validation, settings, embedder, seed, progress,
                                  data.source)
            mlflow.log_param("chosen_head", chosen.name)
            # Refit the chosen head on all training models (validation models included), measure on held-out.
            spec, state = fit_head(emb, split.train_pairs(data), chosen, settings.encoder, seed,
                                   progress=progress, trained_on=data.source)
            judge = SmallJudge(spec, state, version="candidate", embedder=embedder)
            metrics = measure(judge, data, split.heldout_pairs(data), split.heldout_models, progress=progress)
            mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
            if settings.int8_check_pairs > 0:
                int8 = int8_keeps_agreement(judge, data, split.heldout_pairs(data), settings.int8_check_pairs, seed,
                                            progress=progress)
                mlflow.log_metrics(int8)
                judge.spec.serving_backend = "onnx-int8" if int8["int8_ok"] else "onnx"
            mlflow.log_param("serving_backend", judge.spec.serving_backend)

            champion_metrics = None
            if not _measured(metrics):
                wins, reason = False, ("no finite held-out agreement or ranking to crown it on (are the held-out "
                                       "models' labels all ties?)")
            elif not contest:
                wins, reason = True, "crowned without a contest (contest=False, --no-contest)"
            elif champion is None:
                wins, reason = True, "no champion yet"
            else:
                if champion.spec.encoder == settings.encoder:
                    champion.embedder = embedder
                else:
                    champion.embedder = EmbeddingCache(Path(cache_dir), champion.spec.encoder)
                # Only models neither judge trained on, judged against each other or a reference: the champion may
                # have been fitted on some of this split's held-out models (another seed, other data), which would
                # flatter it.
                seen_by_champion = set(champion.spec.trained_models)
                unseen = [m for m in split.heldout_models if m not in seen_by_champion]
                mlflow.log_param("contest_models", ",".join(unseen) or "none unseen by the champion")
                wins, reason = False, "the champion trained on every held-out model: no contest"
                if unseen:
                    contest_pairs = ModelSplit(split.train_models, tuple(unseen)).heldout_pairs(data)
                    new_metrics = metrics
                    if len(unseen) < len(split.heldout_models):
                        new_metrics = measure(judge, data, contest_pairs, unseen)
                        mlflow.log_metrics({f"contest_{k}": v for k, v in new_metrics.items() if np.isfinite(v)})
                    champion_metrics = measure(champion, data, contest_pairs, unseen)
                    mlflow.log_metrics({f"champion_{k}": v for k, v in champion_metrics.items() if np.isfinite(v)})
                    wins = _beats(new_metrics, champion_metrics)
                    reason = f"{'beat' if wins else 'did not beat'} the champion on {len(unseen)} unseen models"

            judge_dir = judge.save(Path(workdir) / "judge")
            registered = reg.log_and_register(judge_dir, registered_name, tracking_uri)
            alias = reg.CHAMPION if wins else reg.CHALLENGER
            reg.set_alias(tracking_uri, registered, alias)
            mlflow.set_tags({"alias": alias, "alias_reason": reason, "registered_version": registered.version})
            run_id = run.info.run_id
    return TrainResult(
        run_id=run_id, registered_name=registered_name, version=registered.version, model_uri=registered.uri,
        alias=alias, head=chosen.name, metrics=metrics, champion_metrics=champion_metrics,
        heldout_models=list(split.heldout_models), duration_s=time.monotonic() - started, alias_reason=reason,
    )


def _load_champion(tracking_uri: str, champion: RegisteredJudge, embedder: TextEmbedder) -> SmallJudge:
    """The champion, loaded before any training (with `embedder` until the contest gives it the right one): one whose
    files are gone or will not load would otherwise fail every training at its contest, after all the work."""
    from evaluators.factory import load_small_judge

    try:
        return load_small_judge(f"models:/{champion.name}@champion", tracking_uri, embedder=embedder)
    except JudgeLoadError as exc:
        raise ChampionUnusable(
            f"{exc}. Training measures its judge against the champion, so it stops before training: point the "
            f"alias 'champion' of '{champion.name}' at a version that loads (MLflow UI, or MlflowClient()."
            f"set_registered_model_alias), or train with --no-contest (contest=False) to crown the new judge "
            "without one"
        ) from None


def _require_decided(pairs: Sequence[LabelledPair], message: str) -> None:
    """Refuse, before any training, labels that never say which answer is better: a judge fitted on ties learns
    nothing, and measured on them has no agreement to show."""
    if not any(abs(p.p_b_better - 0.5) > 1e-9 for p in pairs):
        raise PreferenceDataError(f"{message}: nothing to learn which answer is better from")


def _measured(metrics: dict[str, float]) -> bool:
    """Whether the held-out figures can crown a judge: finite pair agreement and selection score."""
    return math.isfinite(metrics.get("agreement", float("nan"))) and math.isfinite(selection_score(metrics))


def _select_head(data: PreferenceData, emb: EmbeddedAnswers, split: ModelSplit, fit_split: ModelSplit,
                 validation: ModelSplit | None, settings: TrainSettings, embedder: TextEmbedder, seed: int,
                 progress: Progress | None, data_dir: str) -> HeadConfig:
    """The head configuration with the best `selection_key` on training models it did not see (each one a
    nested MLflow run); the held-out models play no part."""
    import mlflow

    if len(settings.heads) == 1:
        return settings.heads[0]
    from evaluators.judge_experiments import cross_validate

    train_only = replace(data, pairs=split.train_pairs(data))
    parent = mlflow.active_run()
    experiment_id = parent.info.experiment_id if parent else None  # else nested runs land in "Default"
    best: tuple[tuple[bool, float], HeadConfig] | None = None
    # Labels from a route's traffic may cover only two or three candidate models: no more folds than models.
    folds = min(settings.selection_folds, len(train_only.judged_models()))
    for config in settings.heads:
        with mlflow.start_run(run_name=config.name, nested=True, experiment_id=experiment_id):
            mlflow.log_params(asdict(config))
            if folds > 1:
                found = cross_validate(train_only, emb, config, settings.encoder, folds=folds, seed=seed)
                prefix = "cv_"
            elif validation:
                spec, state = fit_head(emb, fit_split.train_pairs(data), config, settings.encoder, seed,
                                       trained_on=data_dir)
                candidate = SmallJudge(spec, state, version=f"candidate:{config.name}", embedder=embedder)
                found = measure(candidate, data, validation.heldout_pairs(data), validation.heldout_models)
                prefix = "val_"
            else:
                found = {}
                prefix = ""
            key = selection_key(found) if found else (False, 0.0)
            mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in found.items()
                                if isinstance(v, (int, float)) and np.isfinite(v)}
                               | {"selection_ranks": float(key[0]), "selection_score": key[1]})
            if progress:
                progress("choosing a head", settings.heads.index(config) + 1, len(settings.heads))
            if best is None or key > best[0]:
                best = (key, config)
    assert best is not None
    return best[1]


def int8_keeps_agreement(judge: SmallJudge, data: PreferenceData, pairs: Sequence[LabelledPair], n: int, seed: int,
                         *, tolerance: float = 0.005, progress: Progress | None = None) -> dict[str, float]:
    """Re-judge a seeded sample of held-out pairs with the int8 ONNX encoder; int8 is served only if agreement
    with the labels drops by at most `tolerance` (and that is logged either way)."""
    from evaluators.encoder import LruEmbedder, TextEncoder

    sample = random.Random(seed).sample(list(pairs), min(n, len(pairs)))
    quantised = SmallJudge(judge.spec, judge.state(),
                           version="int8-check",
                           embedder=LruEmbedder(TextEncoder(judge.spec.encoder, backend="onnx-int8"), 4 * n + 1024))
    triples = [(p.prompt_id, p.model_a, p.model_b) for p in sample]
    fp32 = _compare_in_chunks(judge, data, triples, 256, None)
    int8 = _compare_in_chunks(quantised, data, triples, 256,
                              progress and (lambda _s, d, t: progress("int8 check", d, t)))
    labels = np.asarray([p.p_b_better for p in sample])
    decided = np.abs(labels - 0.5) > 1e-9
    agree32 = float(np.mean((fp32 > 0.5)[decided] == (labels > 0.5)[decided]))
    agree8 = float(np.mean((int8 > 0.5)[decided] == (labels > 0.5)[decided]))
    return {"int8_check_pairs": float(len(sample)), "int8_check_fp32_agreement": agree32,
            "int8_check_int8_agreement": agree8, "int8_decision_flips": float(np.mean((fp32 > 0.5) != (int8 > 0.5))),
            "int8_max_abs_diff": float(np.max(np.abs(fp32 - int8))) if len(sample) else 0.0,
            "int8_ok": float(agree8 >= agree32 - tolerance)}


def _beats(new: dict[str, float], old: dict[str, float]) -> bool:
    """A strictly better held-out `selection_key`; ties keep the champion in place."""
    return selection_key(new) > selection_key(old)


def _validation_split(data: PreferenceData, split: ModelSplit, fraction: float,
                      seed: int) -> tuple[ModelSplit, ModelSplit | None]:
    """Carve validation models out of the training models, for choosing among head configurations."""
    train = list(split.train_models)
    n = round(len(train) * fraction)
    if fraction <= 0 or n < 1 or len(train) - n < 1:
        return split, None
    val = sorted(random.Random(seed + 1).sample(train, n))
    fit = tuple(m for m in train if m not in val)
    return ModelSplit(fit, tuple(val)), ModelSplit(fit, tuple(val))


def evaluate_judge(judge: SmallJudge, data_dir: str | Path, *, prompts: int | None = None, seed: int = 0,
                   include_seen: bool = False, progress: Progress | None = None) -> dict:
    """`quality_report` on the models of a directory the judge never trained on (all of them with `include_seen`).

    Pairs count when their judged side (model_b) is unseen; the reference on the other side may have been seen, as
    in training. Models the judge was fitted on would flatter it, so they are left out and listed."""
    data = load_preference_data(data_dir, require_labels=False)
    if prompts is not None:
        data = data.sample_prompts(prompts, seed)
    seen = set() if include_seen else set(judge.spec.trained_models)
    all_models = sorted({m for _, m in data.outputs})
    models = [m for m in all_models if m not in seen or m == REFERENCE_MODEL]
    judged = [m for m in models if m != REFERENCE_MODEL]
    if not any(m != REFERENCE_MODEL for m in all_models):
        raise PreferenceDataError(f"{data_dir}: no outputs of a model other than the reference {REFERENCE_MODEL}: "
                                  "nothing to measure")
    if not judged:
        raise PreferenceDataError(f"{data_dir}: every judged model in it was in the judge's training set "
                                  f"({len(seen)} models); pass include_seen to measure on them anyway")
    pairs = [p for p in data.pairs if p.model_b not in seen]
    report = quality_report(judge, data, pairs, models, progress=progress)
    return {"data": str(data_dir), "n_prompts": len(data.prompts), "n_models": len(judged),
            "models_measured": ("all models, seen in training included" if include_seen
                                else "only models the judge never trained on" if seen
                                else "all models (the judge does not record which models it trained on)"),
            "unseen_models": judged,
            "excluded_seen_models": sorted(m for m in all_models if m in seen and m != REFERENCE_MODEL),
            "unlabelled_rows_skipped": data.unlabelled_rows,
            "duplicate_label_rows_skipped": data.duplicate_label_rows,
            "label_rows_without_answers": dict(sorted(data.rows_without_answers.items())),
            "warnings": report_warnings(data, judged, report), **report}


def report_warnings(data: PreferenceData, models: Sequence[str], report: dict) -> list[str]:
    """Why figures of a `quality_report` over `models` are null or rest on fewer rows than the files hold: a set
    that cannot be measured must say so, not exit 0 with nulls."""
    out = []
    if data.rows_without_answers:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(data.rows_without_answers.items()))
        out.append(f"{sum(data.rows_without_answers.values())} label rows skipped because their prompt or an answer "
                   f"is not in the data ({reasons})")
    if data.duplicate_label_rows:
        out.append(f"{data.duplicate_label_rows} label rows repeat an earlier row and were counted once")
    if not report["instance"]["n"]:
        out.append("no labelled pair (with a label other than a tie) judges a measured model: pair agreement cannot "
                   "be computed")
    system = report.get("system")
    unranked = sorted(set(models) - set(data.leaderboard))
    if not any(m == REFERENCE_MODEL for _, m in data.outputs):
        out.append(f"no outputs of the reference model {REFERENCE_MODEL}: system-level win rates cannot be computed")
    elif system is None:
        out.append(f"no prompt has answers of both the reference model {REFERENCE_MODEL} and a measured model: "
                   "system-level win rates cannot be computed")
    elif system["n_models"] < 3:
        out.append(f"{int(system['n_models'])} measured models have a leaderboard row, Spearman needs 3: the system "
                   "Spearman figures cannot be computed")
    elif not np.isfinite(system["spearman_win_rate"]):
        out.append("the judge gives every measured model the same win rate: the system Spearman figures are undefined")
    if unranked and system is not None:
        out.append(f"no leaderboard row for {len(unranked)} measured models (win rates reported, left out of the "
                   f"Spearman): {', '.join(unranked)}")
    return out


__all__ = ["FULL", "QUICK", "HeadConfig", "TrainResult", "TrainSettings", "evaluate_judge", "fit_head", "measure",
           "quality_report", "train_judge"]
