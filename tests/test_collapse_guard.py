"""The collapse guard's two rules (README, "training collapsed at step N though the loss is finite"), each on
its own: the smoothed loss --collapse-rise above its best, and, after warmup, within --collapse-margin of
ln(vocab); either must hold for --collapse-steps steps in a row."""

import math
from types import SimpleNamespace

from nanochat.guards import CollapseGuard

VOCAB = 512  # ln(512) = 6.2383


def guard(steps=3, rise=1.5, margin=0.1, warmup_steps=2):
    return CollapseGuard(SimpleNamespace(collapse_steps=steps, collapse_rise=rise, collapse_margin=margin,
                                         warmup_steps=warmup_steps), VOCAB)


def feed(g, losses):
    """g.update over steps 1, 2, ...: the list of what it returned."""
    return [g.update(step, loss) for step, loss in enumerate(losses, start=1)]


def test_rise_above_the_best_for_n_steps_in_a_row_is_a_collapse():
    # best 2.0 at step 3; 3.6 is 1.6 nats above it; a dip back to 3.4 (1.4 above) breaks the streak
    out = feed(guard(), [5.0, 3.0, 2.0, 3.6, 3.6, 3.4, 3.6, 3.6, 3.6])
    assert out[:8] == [None] * 8
    assert out[8] == "the smoothed loss 3.6000 has stayed more than 1.5 nats above its best (2.0000) for 3 steps " \
                     "(since step 7)"
    # the rise rule holds during warmup too (only the ln(vocab) rule waits for it)
    assert feed(guard(warmup_steps=100), [2.0, 3.6, 3.6, 3.6])[-1].endswith("for 3 steps (since step 2)")
    # far below ln(vocab) and never above best + rise: never a collapse
    assert feed(guard(), [5.0, 4.0, 3.4, 4.8, 4.8, 4.8, 4.8]) == [None] * 7


def test_loss_near_ln_vocab_after_warmup_is_a_collapse():
    near = math.log(VOCAB) - 0.05  # within the 0.1 margin, and never rising above its best
    out = feed(guard(warmup_steps=2), [near] * 5)
    assert out[:4] == [None] * 4  # steps 1-2 are warmup; the streak begins at step 3
    assert out[4] == "the smoothed loss 6.1883 has stayed within 0.1 of ln(vocab) = 6.2383, the loss of uniform " \
                     "guessing for 3 steps (since step 3)"
    # a fresh model starts there: during warmup it is no collapse
    assert feed(guard(warmup_steps=10), [near] * 10) == [None] * 10
    # just outside the margin: no collapse
    assert feed(guard(warmup_steps=2), [math.log(VOCAB) - 0.15] * 8) == [None] * 8
    # a loss that leaves the band for one step restarts the count
    assert feed(guard(warmup_steps=0), [near, near, 5.0, near, near])[-1] is None


def test_collapse_steps_zero_never_stops():
    assert feed(guard(steps=0, warmup_steps=0), [2.0] + [math.log(VOCAB)] * 10) == [None] * 11
