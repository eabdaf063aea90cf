"""The ratios lvopt's issues promise, checked by ``lvopt bench`` on the rows it timed.

Part of the benchmark suite (it ships with it: benchmarks/ in a checkout, lvopt/_bench in a
wheel), not of the library: the targets change with the benchmark cases, not with lvopt's API.
"""

from __future__ import annotations

# (case, a, b, bound, what the issue asks): met when ms(b) / ms(a) >= bound. "a at least k times
# faster than b" is (a, b, k); "a at most k times slower than b" is (a, b, 1/k).
CLAIMS = [
    ("adamw_1x", "lvopt AdamW", "torch AdamW fused", 1.05, "AdamW one tensor: >= 1.05x torch fused"),
    ("adamw_1x", "lvopt AdamW", "DeepSpeedCPUAdam", 1.0, "AdamW one tensor: at least as fast as DeepSpeedCPUAdam"),
    ("adamw_gpt2", "lvopt AdamW", "torch AdamW fused", 1.05, "AdamW GPT-2 list: >= 1.05x torch fused"),
    ("adamw_gpt2", "lvopt AdamW", "DeepSpeedCPUAdam", 1.0, "AdamW GPT-2 list: at least as fast as DeepSpeedCPUAdam"),
    ("adamw_bf16", "lvopt AdamW bf16", "lvopt AdamW fp32", 1.15, "bf16: >= 1.15x faster than fp32"),
    ("adamw_1x", "lvopt AdamW track=True", "lvopt AdamW", 1 / 1.05, "telemetry: track=True costs <= 5% (one tensor)"),
    ("adamw_gpt2", "lvopt AdamW track=True", "lvopt AdamW", 1 / 1.05, "telemetry: track=True costs <= 5% (GPT-2 list)"),
    ("adamh", "lvopt AdamH", "eager PyTorch AdamH", 3.0, "AdamH: >= 3x eager PyTorch AdamH"),
    ("adamh", "lvopt AdamH", "lvopt AdamW (same matrix)", 1 / 1.6, "AdamH: <= 1.6x the AdamW step"),
    ("sparse_rows", "lvopt exact", "torch SparseAdam", 8.0, "sparse rows: exact >= 8x SparseAdam"),
    ("sparse_rows", "lvopt lazy", "torch SparseAdam", 8.0, "sparse rows: lazy >= 8x SparseAdam"),
    (
        "sparse_rows",
        "lvopt exact",
        "torch AdamW fused (dense grad)",
        25.0,
        "sparse rows: exact >= 25x fused AdamW on the dense grad",
    ),
    (
        "sparse_rows",
        "lvopt lazy",
        "torch AdamW fused (dense grad)",
        25.0,
        "sparse rows: lazy >= 25x fused AdamW on the dense grad",
    ),
    ("sparse_rows", "lvopt exact", "lvopt lazy", 1 / 1.5, "sparse rows: exact <= 1.5x lazy"),
    (
        "sparse_rows",
        "lvopt exact (lvopt.nn.Embedding grad)",
        "torch SparseAdam",
        8.0,
        "sparse rows, lvopt.nn.Embedding's merged grad: exact >= 8x SparseAdam",
    ),
    (
        "sparse_rows",
        "lvopt exact (lvopt.nn.Embedding grad)",
        "torch AdamW fused (dense grad)",
        25.0,
        "sparse rows, lvopt.nn.Embedding's merged grad: exact >= 25x fused AdamW on the dense grad",
    ),
]
# (case, contender, reference contender's name prefix, minimum GB/s ratio, what the issue asks)
BANDWIDTH_CLAIMS = [
    ("sparse_rows", "lvopt exact", "lvopt AdamW dense", 0.7, "sparse rows: exact bandwidth >= 70% of dense AdamW's"),
    (
        "sparse_rows",
        "lvopt exact (lvopt.nn.Embedding grad)",
        "lvopt AdamW dense",
        0.7,
        "sparse rows, merged grad: exact bandwidth >= 70% of dense AdamW's",
    ),
]


def check_claims(results: list[dict]) -> list[dict]:
    by = {(r["case"], r["name"]): r for r in results if "ms" in r}
    out = []
    for case, fast, slow, bound, text in CLAIMS:
        a, b = by.get((case, fast)), by.get((case, slow))
        if a is None or b is None:
            continue
        ratio = b["ms"] / a["ms"]
        out.append(dict(claim=text, ratio=ratio, bound=bound, met=ratio >= bound))
    for case, name, ref_prefix, bound, text in BANDWIDTH_CLAIMS:
        a = by.get((case, name))
        ref = next((r for (c, n), r in by.items() if c == case and n.startswith(ref_prefix)), None)
        if a is None or ref is None:
            continue
        ratio = a["gbps"] / ref["gbps"]
        out.append(dict(claim=text, ratio=ratio, bound=bound, met=ratio >= bound))
    return out
