"""
How a training run stops early. When its numbers go bad: diverged (a non-finite loss or weights) and the
collapse guard (a finite loss that means nothing any more), each one UserError naming the newest checkpoint
to resume from. When asked to: StopSignals, SIGINT/SIGTERM (Ctrl-C, preemption) ending the run after the
current step, with a checkpoint of it (Stopped).
"""

import math
import os
import signal
import threading

import torch
import torch.distributed as dist

from nanochat.common import UserError


LOWER_LRS = "lower the learning rates (--matrix-lr, --embedding-lr, --unembedding-lr)"


def advice(step):
    """What to do after a bad run: a resumed run takes its learning rates from its command line."""
    if step is None:
        return f"{LOWER_LRS} and train again"
    return f"{LOWER_LRS} and resume from it (a resumed run trains with the learning rates on its command line)"


def _kept(step, which=""):
    """Which checkpoint a stopped run leaves to resume from."""
    if step is None:
        return f"no checkpoint{which} was saved"
    return f"the newest checkpoint{which} is step {step} (--resume-from-step {step})"


def diverged(what, step, last_saved):
    return UserError(f"training diverged at step {step} ({what}) and nothing of that step was saved; "
                     f"{_kept(last_saved)}; {advice(last_saved)}")


class CollapseGuard:
    """Stops a run whose loss stayed finite but means nothing any more: for --collapse-steps steps in a row
    the smoothed train loss is --collapse-rise nats above its best so far, or, after warmup, within
    --collapse-margin of ln(vocab), the loss of predicting every token equally likely (where a fresh model
    starts, hence not during warmup). `began` is the first step of the current streak: the checkpointer keeps
    the newest checkpoint saved before it."""

    def __init__(self, args, vocab_size):
        self.steps, self.rise, self.margin = args.collapse_steps, args.collapse_rise, args.collapse_margin
        self.warmup_steps = args.warmup_steps
        self.uniform = math.log(vocab_size)
        self.best = math.inf
        self.began = None

    def too_high(self, loss):
        """None, or why a loss is above the collapse threshold (--collapse-rise above the best smoothed loss):
        the check of a checkpoint's own loss before it is saved."""
        if self.steps and loss > self.best + self.rise:
            return f"more than {self.rise} nats above the best smoothed loss ({self.best:.4f})"
        return None

    def update(self, step, smooth_loss):
        """After step `step`: None, or why the run has collapsed."""
        if self.steps == 0:
            return None
        self.best = min(self.best, smooth_loss)
        if smooth_loss > self.best + self.rise:
            why = f"more than {self.rise} nats above its best ({self.best:.4f})"
        elif step > self.warmup_steps and smooth_loss > self.uniform - self.margin:
            why = f"within {self.margin} of ln(vocab) = {self.uniform:.4f}, the loss of uniform guessing"
        else:
            self.began = None
            return None
        self.began = self.began or step
        if step - self.began + 1 < self.steps:
            return None
        return f"the smoothed loss {smooth_loss:.4f} has stayed {why} for {self.steps} steps (since step {self.began})"


def collapsed(why, step, good_step):
    return UserError(f"training collapsed at step {step} though the loss is finite: {why}; step {step} was not saved; "
                     f"{_kept(good_step, ' from before the collapse')}; {advice(good_step)}, or tune "
                     f"--collapse-steps/--collapse-rise/--collapse-margin")


class Stopped(Exception):
    """A run that SIGINT/SIGTERM stopped after a step; the message is the one line to print, exit_code 128 + the
    signal's number (the shell's convention for a process a signal ended)."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """SIGINT and SIGTERM while the loop runs: the first asks the run to stop once the current step is done
    (every rank learns of it in the same step's all-reduce, so all ranks stop after the same step and save it
    together); a second SIGINT raises KeyboardInterrupt at once, saving nothing. Only the main thread can take
    signals: elsewhere (a run started from a thread) they keep their handlers."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        if int(os.environ.get("RANK", 0)) == 0:  # os.write: print() may be mid-write in the interrupted code
            os.write(2, f"{signal.Signals(signum).name}: stopping after this step and saving it "
                        f"(Ctrl-C again to stop at once without saving)\n".encode())

    def agreed(self, device):
        """After a step: the signal that stops the run, if any rank received one (None: go on)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None
