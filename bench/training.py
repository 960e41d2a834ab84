"""The ``training`` section: optimizer steps/s of the FPT step vs full fine-tuning, fp32 and bf16 autocast, on CPU."""

from __future__ import annotations

import copy
import logging
import time

from bench.config import SuiteConfig
from bench.prepare import Prepared

log = logging.getLogger("bench.training")


def bench_training(cfg: SuiteConfig, prep: Prepared, deadline: float = float("inf")) -> dict:
    """Optimizer steps/s: the FPT step (heads, positions, norms train) vs full fine-tuning, fp32 and bf16."""
    import torch
    from fpt_deploy.serving.runtimes.sessions import physical_cores
    from fpt_deploy.training.loop import autocast, loss_and_correct

    from fpt_deploy.backbones import load_backbone
    from fpt_deploy.model import FPT
    from fpt_deploy.tasks import get_task

    torch.set_num_threads(cfg.threads or physical_cores())
    task = get_task("mnist")
    data = task.load_data("train")
    x = torch.from_numpy(data.inputs[: cfg.train_batch])
    y = torch.from_numpy(data.labels[: cfg.train_batch])
    base = load_backbone(prep.checkpoint_info["backbone"])
    device = torch.device("cpu")
    from fpt_deploy.cpu import cpu_features

    rows, skipped = [], {}
    native_bf16 = cpu_features().native_bf16
    if not native_bf16:
        skipped["bf16 autocast"] = "no native bf16 on this CPU (neither avx512_bf16 nor amx_bf16): emulated"
    for bf16 in (False, True) if native_bf16 else (False,):
        for mode in ("fpt", "full fine-tuning"):
            if time.perf_counter() > deadline:
                skipped[f"{mode}, {'bf16 autocast' if bf16 else 'fp32'}"] = "the suite's time budget was spent"
                continue
            torch.manual_seed(0)
            model = FPT(task, copy.deepcopy(base)).train()
            if mode != "fpt":
                for p in model.parameters():
                    p.requires_grad_(True)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.Adam(params, lr=1e-3)

            def step(model=model, params=params, optimizer=optimizer, bf16=bf16) -> float:
                with autocast(device, bf16):
                    logits = model(x)
                loss = loss_and_correct(logits, y)[0]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                return loss.detach().item()

            step()  # warm-up: allocations, Adam state
            steps, t0 = 0, time.perf_counter()
            seconds = min(cfg.train_seconds, deadline - t0)
            while steps < 1 or (steps < cfg.train_timed_steps and time.perf_counter() - t0 < seconds):
                loss = step()
                steps += 1
            seconds = time.perf_counter() - t0
            rows.append(
                {
                    "mode": mode,
                    "precision": "bf16 autocast" if bf16 else "fp32",
                    "steps": steps,
                    "steps_per_s": steps / seconds,
                    "rows_per_s": steps * cfg.train_batch / seconds,
                    "trainable_params": sum(p.numel() for p in params),
                    "last_loss": loss,
                }
            )
            log.info("training %-16s %-13s %.2f steps/s", mode, rows[-1]["precision"], rows[-1]["steps_per_s"])
    return {
        "task": "mnist",
        "batch": cfg.train_batch,
        "backbone": prep.checkpoint_info["backbone"],
        "steps": rows,
        "skipped": skipped,
    }
