"""benchmarks.contention's summary: the shares are ratios of medians, per thread policy,
and the default policy's are the headline keys (the measuring itself is smoke-tested in
test_benchmarks_smoke.py). No timing is asserted."""

import json

from benchmarks.contention import CONDITIONS, DEFAULT_VARIANT, summarize


def test_shares_are_ratios_of_medians_per_policy(capsys):
    ips = {("quiet", "auto"): [100.0, 300.0, 200.0], ("one_busy", "auto"): [90.0, 80.0, 10.0],
           ("two_busy", "auto"): [50.0, 40.0, 60.0],
           ("quiet", "fixed"): [250.0, 250.0, 250.0], ("one_busy", "fixed"): [25.0, 20.0, 30.0],
           ("two_busy", "fixed"): [5.0, 5.0, 5.0]}
    out = summarize(ips, {"quiet": [2, 2, 2], "one_busy": [1, 1, 1]}, ["auto", "fixed"], 3)
    assert DEFAULT_VARIANT == "auto" and set(CONDITIONS) == {"quiet", "one_busy", "two_busy"}
    assert out["one_busy_share"] == 0.4 and out["two_busy_share"] == 0.25  # 80/200, 50/200
    assert out["shares"]["fixed"] == {"one_busy_share": 0.1, "two_busy_share": 0.02}
    assert out["quiet_vs_fixed"] == {"auto": 0.8, "fixed": 1.0}
    assert out["threads_chosen"]["one_busy"] == [1, 1, 1]
    json.dumps(out)  # the summary line is JSON
    assert "one_busy" in capsys.readouterr().out
