"""One training process of a job on several devices: ``python -m workers.rank <launch.json>``, started by torchrun
(workers.distributed starts torchrun and supervises it). Never touches the database: rank 0 reports to the worker
over its socket, and every rank tells the worker how it ended.
"""
from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str]) -> int:
    from workers.distributed import ForwardingCallback, connect

    connection = connect()  # first, so that anything going wrong from here on is reported
    rank = int(os.environ.get("RANK", "0"))
    connection.send(("hello", rank, os.getpid()))
    launch = None
    try:
        from gpt2core.distributed import init_distributed, shutdown_distributed
        from gpt2core.stopping import TrainingDiverged
        from gpt2core.train import Trainer, latest_checkpoint
        from workers.launch import TrainingLaunch

        launch = TrainingLaunch.read(argv[1])
        context = init_distributed()
        try:
            model = launch.model.build()
            dataset, val_tokens, val_mask = launch.data()
            config = launch.train_config()
            callbacks = [ForwardingCallback(connection)] if context.is_main else []
            trainer = Trainer(model, config, dataset.train, val_tokens, callbacks, train_mask=dataset.train_mask,
                              val_mask=val_mask)
            resume_from = latest_checkpoint(config.checkpoint_dir) if config.checkpoint_dir is not None else None
            if resume_from is not None:
                trainer.resume(resume_from)
            if context.is_main:
                import torch.distributed as dist

                backend = dist.get_backend() if dist.is_initialized() else "one process"
                where = f"{launch.devices} {trainer.device.type} processes ({backend})"
                message = (f"Resumed from the checkpoint at step {trainer.step} on {where}" if resume_from is not None
                           else f"Training {trainer.describe_parameters()} for {config.max_steps} steps on {where}; "
                                f"{dataset.train.size:,} training tokens")
                connection.send(("started", {"message": message, "step": trainer.step}))
            try:
                result = trainer.fit()
            except TrainingDiverged as exc:
                connection.send(("diverged", exc.step, str(exc)))
                return 1
            connection.send(("result", result) if context.is_main else ("done",))
            return 0
        finally:
            shutdown_distributed()
    except SystemExit:
        raise
    except BaseException as exc:
        from workers.runtime import error_for

        job_id = launch.job_id if launch is not None else "?"
        error = error_for(exc, f"{job_id} (rank {rank})", launch.user_paths if launch is not None else None)
        try:
            connection.send(("failed", error))
        except OSError:
            pass
        return 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '?')}] %(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv))
