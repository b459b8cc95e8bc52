"""One training loop for every gem3d network: AdamW, EMA, bf16 autocast, DDP, atomic checkpoints, exact resume.

    from gem3d.training import TrainConfig, train
    result = train(model, loss_fn, batch_source, TrainConfig(steps=1000), "out/vae.pt",
                   kind="vae", model_args=args, extra={"scale_factor": 0.18})

See gem3d.training.loop for the caller's contract and gem3d.training.checkpoint for the file layout.
"""

from gem3d.training.checkpoint import inference_state_dict, load_checkpoint, save_checkpoint, sha256_of
from gem3d.training.distributed import (
    DistInfo,
    distributed_env,
    init_distributed,
    launch_command,
    shutdown_distributed,
    unwrap_model,
)
from gem3d.training.ema import EMA
from gem3d.training.loop import TrainResult, train
from gem3d.training.train_config import TrainConfig

__all__ = [
    "EMA",
    "DistInfo",
    "TrainConfig",
    "TrainResult",
    "distributed_env",
    "inference_state_dict",
    "init_distributed",
    "launch_command",
    "load_checkpoint",
    "save_checkpoint",
    "sha256_of",
    "shutdown_distributed",
    "train",
    "unwrap_model",
]
