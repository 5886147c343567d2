"""Run the model training loops as Ray Train jobs (``TorchTrainer``) or in-process.

The loops themselves (:mod:`streamrec.models.train_loop`) know nothing about Ray; this module
wraps one in ``train_loop_per_worker``: each worker builds the model from the config, trains on
its shard (``rank``/``world_size``), and after every epoch rank 0 reports the metrics with a
checkpoint (``save_model`` files: weights + hyper-parameters, loaded back with
``weights_only=True``). The trained model is rebuilt from the last checkpoint in the driver.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from streamrec.errors import ModelError
from streamrec.models.config import RankerConfig, TwoTowerConfig
from streamrec.models.io import load_model, save_model
from streamrec.models.train_loop import (
    RankerData,
    TwoTowerData,
    pick_device,
    train_ranker,
    train_two_tower,
)
from streamrec.pipeline.config import ScalingSettings

logger = logging.getLogger(__name__)

Kind = Literal["two_tower", "ranker"]


def _train(
    kind: Kind,
    model: nn.Module,
    cfg: Any,
    data: Any,
    device: torch.device,
    cb: Any,
    rank: int = 0,
    world_size: int = 1,
) -> list[dict[str, float]]:
    if kind == "two_tower":
        return train_two_tower(model, data, cfg, device, cb, rank=rank, world_size=world_size)
    return train_ranker(model, data, cfg, device, cb, rank=rank, world_size=world_size)


def _build(kind: Kind, cfg: Any, build_kwargs: dict[str, Any]) -> nn.Module:
    model: nn.Module = cfg.build_model(**build_kwargs)
    return model


def _worker_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    kind: Kind = config["kind"]
    cfg = config["cfg"]
    model = _build(kind, cfg, config["build_kwargs"])
    if world > 1:
        model = ray.train.torch.prepare_model(model)

    def report(metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                inner = getattr(model, "module", None)
                core = inner if isinstance(inner, nn.Module) else model
                save_model(core, d, metadata={"epoch": metrics.get("epoch")})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)

    _train(kind, model, cfg, config["data"], device, report, rank, world)


def ensure_ray() -> None:
    """Join Ray once per process: ``RAY_ADDRESS``'s cluster (``ray job submit`` sets it), else a private local one.

    Never a stray ``ray start`` cluster that happens to run on this machine.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or "local",
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )


def fit(
    kind: Kind,
    cfg: TwoTowerConfig | RankerConfig,
    build_kwargs: dict[str, Any],
    data: TwoTowerData | RankerData,
    scaling: ScalingSettings,
    storage_path: str | os.PathLike[str],
    name: str,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train one model and return it (eval mode, CPU) with its per-epoch metrics.

    Args:
        kind: ``two_tower`` or ``ranker``.
        cfg: The model's hyper-parameters (also builds the model).
        build_kwargs: Data-dependent sizes for ``cfg.build_model``.
        data: Training rows.
        scaling: Ray Train scaling; ``use_ray=False`` trains in this process.
        storage_path: Where Ray Train keeps checkpoints and results.
        name: Run name under ``storage_path``.

    Raises:
        ModelError: the Ray Train run failed or left no checkpoint.
    """
    if not scaling.use_ray:
        device = pick_device(scaling.use_gpu)
        model = _build(kind, cfg, build_kwargs)
        history = _train(kind, model, cfg, data, device, None)
        model.to("cpu").eval()
        return model, history

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray()
    use_gpu = scaling.use_gpu
    if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        logger.warning("use_gpu requested but the Ray cluster has no GPU: training on CPU")
        use_gpu = False
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "kind": kind,
            "cfg": cfg,
            "build_kwargs": build_kwargs,
            "data": data,
            "threads": max(1, int(scaling.cpus_per_worker)),
        },
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
        ),
        run_config=RunConfig(storage_path=str(Path(storage_path).resolve()), name=name),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors; surface the cause in one line
        raise ModelError(f"Ray Train job '{name}' failed: {err}") from err
    if result.checkpoint is None:
        raise ModelError(f"Ray Train job '{name}' finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        model = load_model(d, "cpu")
    history = [dict(result.metrics)] if result.metrics else []
    if result.metrics_dataframe is not None:
        history = [{str(k): v for k, v in row.items()} for row in result.metrics_dataframe.to_dict("records")]
    return model, history
