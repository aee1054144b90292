"""Training: a generic accelerate loop with exact resume, schedules, logging, the objectives (stage-2 LM loss,
BLIP-2 stage-1 ITC + ITM + ITG) and the recipe runner."""

from .config import TrainConfig, Until, count_steps, parse_until
from .objectives import EvalConfig, EvalContext, lm_loss, make_eval_fn, register_metric
from .optim import Schedule, make_optimizer, no_decay, param_groups
from .runlog import RunLog, read_log
from .trainer import TrainResult, Trainer, make_accelerator

__all__ = ["EvalConfig", "EvalContext", "RunLog", "Schedule", "TrainConfig", "TrainResult", "Trainer", "Until",
           "count_steps", "lm_loss", "make_accelerator", "make_eval_fn", "make_optimizer", "no_decay",
           "param_groups", "parse_until", "read_log", "register_metric"]
