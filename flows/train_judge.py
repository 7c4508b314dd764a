"""Training the small judge as a Prefect flow (e.g. a weekly deployment); the work is evaluators.judge_training,
and, when the labels come from production, evaluators.traffic_labels first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shadowjudge.environment import apply_defaults

apply_defaults()

from prefect import flow, get_run_logger, task  # noqa: E402

CHECKOUT = Path(__file__).resolve().parent.parent  # where `shadowjudge judge train` is run from


def embedding_cache_dir(cache_dir: str | None, config_path: str | None) -> Path:
    """The embedding cache as an absolute path: a relative one would follow the working directory of whichever
    worker runs the flow. It resolves against the config's folder (as the config's own paths do) when the labels
    come from a config, else against the checkout, where the CLI's default cache is."""
    from evaluators.judge_training import DEFAULT_CACHE_DIR

    base = Path(config_path).resolve().parent if config_path else CHECKOUT
    return base / (cache_dir or DEFAULT_CACHE_DIR)


@task(name="label-traffic")
def label_traffic(config_path: str, out_dir: str, route: str | None, max_pairs: int, seed: int) -> dict[str, Any]:
    """The teacher labels a seeded sample of the route's stored pairs into `out_dir` (new pairs only on a rerun)."""
    from evaluators.traffic_labels import label_route_traffic

    return label_route_traffic(config_path, out_dir, route=route, max_pairs=max_pairs, seed=seed).as_dict()


@flow(name="train-judge")
def train_judge_flow(data_dir: str, tracking_uri: str, quick: bool = False, seed: int = 0,
                     registered_name: str = "shadowjudge-judge", label_traffic_config: str | None = None,
                     route: str | None = None, max_pairs: int = 2000,
                     extra_data_dirs: list[str] | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """Train, measure on held-out models, register; champion only if it beats the current champion.

    With `label_traffic_config` (a config path), the labels come from production: the config's teacher first labels
    up to `max_pairs` of the route's stored shadow pairs into `data_dir`, and the judge trains on those.
    `extra_data_dirs` are trained on together with `data_dir` as one set (e.g. the public AlpacaEval set beside
    the route's own labels). `cache_dir` holds the encoder's embeddings between runs (see embedding_cache_dir)."""
    from evaluators.judge_training import train_judge

    logger = get_run_logger()
    labelled = None
    if label_traffic_config:
        labelled = label_traffic(label_traffic_config, data_dir, route, max_pairs, seed)
        logger.info("teacher labelled %d pairs of route %s (%d new, %d reused) into %s", labelled["pairs"],
                    labelled["route"], labelled["teacher_calls"], labelled["reused_verdicts"], data_dir)
    result = train_judge([data_dir, *(extra_data_dirs or [])], tracking_uri, quick=quick, seed=seed,
                         registered_name=registered_name,
                         cache_dir=embedding_cache_dir(cache_dir, label_traffic_config))
    logger.info("registered %s as %s (held-out agreement %.3f)", result.model_uri, result.alias,
                result.metrics.get("agreement", float("nan")))
    return {**result.as_dict(), "traffic_labels": labelled}


if __name__ == "__main__":
    import sys

    train_judge_flow(sys.argv[1], sys.argv[2], quick="--quick" in sys.argv)
