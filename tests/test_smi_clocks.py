"""benchmarks/smi_clocks.py: per-stage median SM clock and power from nvidia-smi samples and gpu.sh parallel logs."""

from benchmarks.smi_clocks import read_samples, read_stages, summarize

SMI = """timestamp, index, clocks.current.sm [MHz], power.draw [W], power.limit [W], temperature.gpu, utilization.gpu [%]
2026/11/26 10:00:01.000, 0, 1980 MHz, 120.00 W, 700.00 W, 30, 0 %
2026/11/26 10:00:02.000, 0, 1700 MHz, 690.00 W, 700.00 W, 60, 100 %
2026/11/26 10:00:03.000, 0, 1720 MHz, 692.00 W, 700.00 W, 60, 99 %
2026/11/26 10:00:03.500, 1, 1500 MHz, 699.00 W, 700.00 W, 60, 100 %
2026/11/26 10:00:04.000, 0, [N/A], [N/A], 700.00 W, 60, [N/A]
2026/11/26 10:00:05.000, 0, 1600 MHz, 695.00 W, 700.00 W, 60, 100 %
"""
LOG = """== GPU 0: train --modes fp8 (10:00:00)
d20 fp8: 1 tok/s
== GPU 0:  train --modes fp8_sparse (10:00:04)
== GPU 0: done (10:00:06)
"""


def test_stage_medians_take_busy_samples_of_their_gpu_only(tmp_path):
    (tmp_path / "smi.csv").write_text(SMI)
    (tmp_path / "parallel_gpu0.log").write_text(LOG)
    rows = summarize(read_samples(tmp_path / "smi.csv"), read_stages(tmp_path))
    assert [(r["stage"], r["samples"], r["sm_mhz"], r["power_w"]) for r in rows] == [
        ("train --modes fp8", 2, 1710, 691), ("train --modes fp8_sparse", 1, 1600, 695)]
